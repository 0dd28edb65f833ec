"""The README's first command, phase by phase, with a cold and a warm cache folder.

    python benchmarks/startup.py                                  # fiseclip and anoclip, random:ViT-B/16
    python benchmarks/startup.py --methods fiseclip --repeats 2
    python benchmarks/startup.py --methods anoclip --full-context # + AnoCLIP prompts at 77 tokens, as before

Each run is a fresh process doing what `fiseclip-jax detect examples/bottle --method M
--weights random:ViT-B/16 --out X` does, in the CLI's order. "cold" starts from an empty
cache folder ($FISECLIP_CACHE), "warm" is the next run on the folder the cold run filled.
Phases are disjoint wall-clock seconds:

    import    importing the package (what `detect` imports)
    weights   making / loading the weights
    prompts   text features, without compilation (0 when read from the cache folder)
    compile   tracing, lowering and XLA compilation (text tower + detection; with a warm
              persistent cache, XLA programs are read instead of compiled)
    images    reading the images and running detection, without compilation
    writing   scores.csv, overlays, run.json
    total     the child process's wall clock, as seen by the parent (includes Python start)
    cpu       the child's user + system CPU seconds, all threads: on a shared machine wall
              clock follows the other jobs, CPU seconds much less

`encoded` is the number of sentences run through the text tower; `(xla)` the part of
`compile` spent in XLA (or reading its persistent cache), the rest being tracing and lowering. `--full-context` adds,
in one process, AnoCLIP's 924 sentences at the full 77-token context in 128-row chunks
(the path before context bucketing) against today's path: the prompt speed-up as a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PHASES = ("import", "weights", "prompts", "compile", "images", "writing")


class CompileClock:
    """Seconds spent compiling, as the union of JAX's compile event spans (nested jits counted once)."""

    def __init__(self):
        self.spans = []

    def __call__(self, event, start, end, **_):
        if event in COMPILE_EVENTS:
            self.spans.append((start, end, event))

    def total(self, events=COMPILE_EVENTS) -> float:
        out, last = 0.0, float("-inf")
        for start, end, _ in sorted(s for s in self.spans if s[2] in events):
            start = max(start, last)
            if end > start:
                out, last = out + end - start, end
        return out


def child(args) -> None:
    """One README job in this process; prints a JSON dict of phase seconds."""
    t0 = time.perf_counter()
    import jax

    from fiseclip_jax import cli, prompts, runner
    from fiseclip_jax.cli.common import method_from_args
    from fiseclip_jax.clip.checkpoint import resolve_weights
    t_import = time.perf_counter() - t0

    clock = CompileClock()
    jax.monitoring.register_event_time_span_listener(clock)
    encoded = []
    embed = prompts._embed_sentences

    def counting_embed(params, cfg, sentences):
        encoded.append(len(sentences))
        return embed(params, cfg, sentences)

    prompts._embed_sentences = counting_embed
    spent = {"detect": 0.0}

    def timed_iter(fn):  # the run's detection (image reading included): a generator, timed per step
        def wrapper(*a, **kw):
            it = fn(*a, **kw)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    spent["detect"] += time.perf_counter() - t
                yield item
        return wrapper

    runner.iter_detect = timed_iter(runner.iter_detect)

    ns = cli.build_parser().parse_args(
        ["detect", args.folder, "--method", args.method, "--weights", args.weights, "--out", args.out,
         "--no-progress"] + (["--no-cache"] if args.no_cache else []))
    cli.configure_caches(ns)
    config = method_from_args(ns)

    t = time.perf_counter()
    params, cfg, is_random = resolve_weights(ns.weights, seed=ns.seed)
    jax.block_until_ready(params)
    t_weights = time.perf_counter() - t

    x0, c0, t = clock.total(COMPILE_EVENTS[2:]), clock.total(), time.perf_counter()
    class_name = runner.infer_class_name(Path(ns.dir))[0]
    jax.block_until_ready(prompts.text_features_full(params, cfg, class_name, config.prompts))
    t_prompts, c_prompts = time.perf_counter() - t, clock.total() - c0

    c0, t = clock.total(), time.perf_counter()
    runner.run_detect(params, cfg, ns.dir, config, out=ns.out, encode_batch=ns.batch_size or 8, progress=False,
                      random_weights=is_random, weights=ns.weights, seed=ns.seed)
    t_run, c_run = time.perf_counter() - t, clock.total() - c0
    images = spent["detect"] - c_run
    print(json.dumps({"import": t_import, "weights": t_weights, "prompts": t_prompts - c_prompts,
                      "compile": c_prompts + c_run, "images": images, "writing": t_run - spent["detect"],
                      "xla": clock.total(COMPILE_EVENTS[2:]) - x0, "encoded": sum(encoded)}))


def run_child(method, cache, args) -> dict:
    env = dict(os.environ, FISECLIP_CACHE=str(cache), PYTHONPATH=str(ROOT))
    if args.no_xla_cache:  # jax's own switch: text features still cached, XLA programs not
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", "--method", method, "--weights", args.weights,
               "--folder", args.folder, "--out", out] + (["--no-cache"] if args.no_cache else [])
        t, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        wall, now = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"child failed ({method}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["total"] = wall
    row["cpu"] = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
    return row


def full_context_comparison(weights) -> str:
    """AnoCLIP's 924 'bottle' sentences: the old 77-token path vs today's, one process, cold compiles."""
    import jax
    import numpy as np

    from fiseclip_jax import prompts
    from fiseclip_jax.clip.checkpoint import resolve_weights
    from fiseclip_jax.clip.modeling import encode_text
    from fiseclip_jax.clip.tokenizer import tokenize

    params, cfg, _ = resolve_weights(weights)
    normal, abnormal = prompts.ANOCLIP_OBJECT.sentences("bottle")
    sentences = normal + abnormal

    def full_context():  # as before context bucketing: 77 tokens, 128-row chunks
        ids = tokenize(sentences, cfg.text.context_length)
        ids = np.concatenate([ids, np.repeat(ids[:1], -len(ids) % 128, 0)])
        return np.concatenate([np.asarray(encode_text(params, cfg, ids[i:i + 128]))
                               for i in range(0, len(ids), 128)])[: len(sentences)]

    t = time.perf_counter()
    new = prompts._embed_sentences(params, cfg, sentences)
    t_new = time.perf_counter() - t
    t = time.perf_counter()
    old = jax.block_until_ready(full_context())
    t_old = time.perf_counter() - t
    err = float(np.abs(new - old).max() / np.abs(old).max())
    return (f"AnoCLIP prompts ({len(sentences)} sentences, {weights}), compile included: 77-token context "
            f"{t_old:.1f} s, bucketed {t_new:.1f} s, speed-up {t_old / t_new:.1f}x; max |diff| / max |x| = {err:.1e}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["fiseclip", "anoclip"])
    ap.add_argument("--weights", default="random:ViT-B/16")
    ap.add_argument("--folder", default=str(ROOT / "examples" / "bottle"))
    ap.add_argument("--repeats", type=int, default=1, help="cold+warm pairs per method, each on a new cache folder")
    ap.add_argument("--no-cache", action="store_true", help="run the children with --no-cache (both rows cold)")
    ap.add_argument("--no-xla-cache", action="store_true",
                    help="turn off JAX's persistent compilation cache only (does it pay?)")
    ap.add_argument("--full-context", action="store_true", help="also time AnoCLIP prompts at 77 tokens vs bucketed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    cols = PHASES + ("total", "cpu")
    tag = " no-cache" if args.no_cache else " no-xla" if args.no_xla_cache else ""
    print(f"{'job':<22}" + "".join(f"{c:>9}" for c in cols) + f"{'encoded':>9}{'(xla)':>9}")
    for method in args.methods:
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="fiseclip-cache-") as cache:
                for state in ("cold", "warm"):
                    row = run_child(method, cache, args)
                    print(f"{method + ' ' + state + tag:<22}" + "".join(f"{row[c]:>9.1f}" for c in cols)
                          + f"{row['encoded']:>9d}{row['xla']:>9.1f}", flush=True)
    if args.full_context:
        print(full_context_comparison(args.weights))


if __name__ == "__main__":
    main()
