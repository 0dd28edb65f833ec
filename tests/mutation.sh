#!/usr/bin/env bash
# Mutation testing of the glue and method modules (issue 18). Not part of CI: hours of CPU.
#
#   pip install "mutmut==3.8.1"        # or: pip install -e ".[mutation]"
#   nice -n 19 tests/mutation.sh                       # every module below, one after the other
#   nice -n 19 tests/mutation.sh rscin postprocess     # some of them
#
# Each module is mutated in its own scratch copy of the repository ($MUTATION_DIR, default a new
# temporary folder), whose pyproject.toml gets a [tool.mutmut] section naming that module and a fast
# test selection; mutmut then runs, per mutant, only the selected tests that call the mutated function.
# Workers are forked from a server that has imported the heavy libraries but started no XLA backend
# (JAX is not fork-safe once a backend runs, and a parent's jit cache would hide the mutants).
# Functions under a decorator (the two @jax.jit kernels) are not mutated by mutmut; lines raising
# FiseclipError or warning are skipped (their wording is a message, not a computation).
#
# Environment: MUTATION_JOBS (parallel workers, default 2), MUTATION_TIMEOUT (seconds per module,
# default 7200; mutants left unchecked are counted as such), MUTATION_DIR, MUTATION_SAMPLE (a glob on
# the mutant number: "*0" runs the mutants numbered ...0, a systematic 10 % sample spread over every
# function; default: all), MUTATION_MUTANTS (space-separated mutant names as `mutmut results` prints them,
# e.g. fiseclip_jax.rscin.x_rscin__mutmut_8: only those of each module are run, the sample is ignored; to
# re-check earlier survivors against new tests).
# Prints one line per module: killed / survived / other, and the killed share; the survivors'
# diffs go to $MUTATION_DIR/<module>/survivors.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
JOBS=${MUTATION_JOBS:-2}
TIMEOUT=${MUTATION_TIMEOUT:-7200}
OUT=${MUTATION_DIR:-$(mktemp -d -t fiseclip-mutation-XXXX)}
mkdir -p "$OUT"

# module -> its source file(s) and a fast test selection
declare -A SOURCES=(
  [rscin]="fiseclip_jax/rscin.py"
  [postprocess]="fiseclip_jax/postprocess.py"
  [matching]="fiseclip_jax/matching.py"
  [prompts]="fiseclip_jax/prompts.py"
  [detect]="fiseclip_jax/detect.py"
  [tta]="fiseclip_jax/methods/tta.py"
  [methods]="fiseclip_jax/methods/__init__.py fiseclip_jax/methods/base.py fiseclip_jax/methods/common.py fiseclip_jax/methods/anoclip.py fiseclip_jax/methods/fiseclip.py fiseclip_jax/methods/musc.py"
)
declare -A TESTS=(
  [rscin]="tests/test_matching.py tests/test_musc_authors.py"
  [postprocess]="tests/test_postprocess.py tests/test_variants.py"
  [matching]="tests/test_matching.py tests/test_methods.py"
  [prompts]="tests/test_prompts.py tests/test_text_cache.py tests/test_methods.py"
  [detect]="tests/test_methods.py tests/test_glue.py tests/test_properties.py"
  [tta]="tests/test_tta.py tests/test_tta_authors.py"
  [methods]="tests/test_methods.py tests/test_glue.py tests/test_variants.py tests/test_plugins.py tests/test_method_options.py tests/test_tiles.py"
)
ORDER=(rscin postprocess matching prompts detect tta methods)
MODULES=("$@")
[ ${#MODULES[@]} -eq 0 ] && MODULES=("${ORDER[@]}")

found=$(python -c "import importlib.metadata as m; print(m.version('mutmut'))" 2>/dev/null || echo none)
[ "$found" = "3.8.1" ] || echo "warning: written for mutmut 3.8.1, found $found" >&2

toml_list() { printf '"%s", ' "$@" | sed 's/, $//'; }

total_k=0; total_s=0
for mod in "${MODULES[@]}"; do
  [ -n "${SOURCES[$mod]:-}" ] || { echo "unknown module $mod; known: ${ORDER[*]}" >&2; exit 2; }
  dir="$OUT/$mod"
  rm -rf "$dir" && mkdir -p "$dir"
  cp -r "$ROOT/fiseclip_jax" "$ROOT/tests" "$ROOT/examples" "$ROOT/pyproject.toml" "$dir/"
  # the libraries the workers need, imported once by the fork server (no XLA backend is started)
  printf '%s\n' numpy scipy jax jax.numpy optax flax chex PIL.Image sklearn.metrics regex hypothesis torch transformers \
    > "$dir/preload.txt"
  # shellcheck disable=SC2086
  cat >> "$dir/pyproject.toml" <<TOML

[tool.mutmut]
source_paths = ["fiseclip_jax"]
also_copy = ["examples"]
only_mutate = [$(toml_list ${SOURCES[$mod]})]
pytest_add_cli_args_test_selection = [$(toml_list ${TESTS[$mod]})]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-W", "ignore"]
do_not_mutate_patterns = ["raise FiseclipError", "warnings\\\\.warn", "FiseclipError\\\\("]
process_isolation = "forkserver"
forkserver_warmup = "import"
preload_modules_file = "$dir/preload.txt"
TOML
  start=$(date +%s)
  sample=() sample_re=".*"
  if [ -n "${MUTATION_MUTANTS:-}" ]; then  # these mutants only (this module's)
    prefixes=$(for f in ${SOURCES[$mod]}; do f=${f%.py}; f=${f%/__init__}; printf '%s.x\n' "${f//\//.}"; done)
    sample=($(printf '%s\n' $MUTATION_MUTANTS | grep -F -f <(echo "$prefixes") || true))
    [ ${#sample[@]} -gt 0 ] || { echo "$mod: none of MUTATION_MUTANTS"; continue; }
    sample_re="($(printf '%s\n' "${sample[@]}" | sed 's/.*__mutmut_//' | sort -u | paste -sd'|'))"
  elif [ -n "${MUTATION_SAMPLE:-}" ]; then
    sample=("fiseclip_jax.*__mutmut_${MUTATION_SAMPLE}") sample_re="${MUTATION_SAMPLE//\*/.*}"
  fi
  (cd "$dir" && timeout "$TIMEOUT" python -m mutmut run --max-children "$JOBS" "${sample[@]}" > run.log 2>&1) || true
  (cd "$dir" && python -m mutmut results --all true > results.txt 2>&1) || true
  (cd "$dir" && for m in $(grep ": survived" results.txt | sed 's/:.*//'); do python -m mutmut show "$m"; done \
     > survivors.txt 2>&1) || true
  k=$(grep -c ": killed" "$dir/results.txt" || true)
  s=$(grep -c ": survived" "$dir/results.txt" || true)
  pattern=": (no tests|timeout|suspicious|not checked|skipped|segfault|caught by type check)"
  if [ -n "${MUTATION_MUTANTS:-}" ]; then  # the mutants not asked for are "not checked": leave them out
    other=$(grep -E "$pattern" "$dir/results.txt" | sed 's/:.*//; s/^ *//' | grep -cxF -f <(printf '%s\n' "${sample[@]}") || true)
  elif [ -n "${MUTATION_SAMPLE:-}" ]; then  # the mutants outside the sample are "not checked": leave them out
    other=$(grep -E "$pattern" "$dir/results.txt" | sed 's/:.*//' | grep -c "__mutmut_${sample_re}\$" || true)
  else
    other=$(grep -E -c "$pattern" "$dir/results.txt" || true)
  fi
  total_k=$((total_k + k)); total_s=$((total_s + s))
  pct=$(python -c "print(f'{100 * $k / max($k + $s, 1):.1f}')")
  echo "$mod: killed $k, survived $s, other $other (no tests / timeout / unchecked), killed $pct % of checked" \
       "[$(( $(date +%s) - start )) s] -> $dir"
  grep -E "$pattern" "$dir/results.txt" | grep "__mutmut_${sample_re}:" \
    | sed 's/^ */  /' | head -20 || true
done
echo "total: killed $total_k, survived $total_s," \
     "killed $(python -c "print(f'{100 * $total_k / max($total_k + $total_s, 1):.1f}')") % of checked mutants"
