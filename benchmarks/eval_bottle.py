"""Wall time of `fiseclip_jax.evaluate` on MVTec AD bottle (83 test images), every method, per stage.

    python benchmarks/eval_bottle.py                              # random:ViT-B/16 at 224
    python benchmarks/eval_bottle.py --weights random:tiny --size 32 --methods musc anoclip

For each method it runs `evaluate` end to end (what `fiseclip-jax evaluate` does; its own
timers give detect / mask loading / metrics / writing), then times the stages inside
`detect_category` separately, the way it batches them: load (decode + resize + normalise),
encode (`encode_features`), match/score (`score_features`); the first call of each jitted
stage is timed apart as compilation.

With random weights (the default: no pretrained CLIP here) every accuracy figure printed
is MEANINGLESS: the tables only show that the pipeline runs and how long it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"
METHODS = ["fiseclip", "musc", "anoclip", "anoclip+"]


def _ready(tree):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = _ready(fn(*args))
    return out, time.perf_counter() - t0


def stage_times(params, cfg, paths, class_name, config, size, encode_batch=8) -> dict:
    """load / encode / score seconds, batched as `detect_category` batches them."""
    from fiseclip_jax.clip.preprocess import preprocess
    from fiseclip_jax.data import load_image
    from fiseclip_jax.detect import encode_features, score_features
    from fiseclip_jax.methods import as_text
    from fiseclip_jax.prompts import text_features_full

    n = len(paths)
    t0 = time.perf_counter()
    pixels = np.stack([preprocess([load_image(p)], size, "bicubic")[0] for p in paths])
    out = {"load": time.perf_counter() - t0}

    if config.prompts is not None:
        text = text_features_full(params, cfg, class_name, config.prompts)
    else:
        text = as_text(jnp.zeros((2, cfg.embed_dim)))
    group = config.group(n, encode_batch)
    whole = group is None
    group = encode_batch if whole else group
    batches = []
    for lo in range(0, n, group):
        x = pixels[lo: lo + group]
        valid = np.arange(group) < len(x)
        batches.append((np.concatenate([x, np.repeat(x[-1:], group - len(x), 0)]), valid))

    encode = jax.jit(encode_features, static_argnames=("cfg", "method"))
    score = jax.jit(score_features, static_argnames=("method", "size"))
    _, first = _timed(encode, params, cfg, jnp.asarray(batches[0][0]), config)
    feats, t_enc = [], 0.0
    for x, _ in batches:
        f, t = _timed(encode, params, cfg, jnp.asarray(x), config)
        feats.append(f)
        t_enc += t
    out["encode"], out["encode_compile"] = t_enc, max(first - t_enc / len(batches), 0.0)

    if whole:
        trimmed = [jax.tree.map(lambda a: a[: int(v.sum())], f) for f, (_, v) in zip(feats, batches)]
        calls = [(jax.tree.map(lambda *a: jnp.concatenate(a), *trimmed), jnp.ones(n, bool))]
    else:
        calls = [(f, jnp.asarray(v)) for f, (_, v) in zip(feats, batches)]
    _, first = _timed(score, calls[0][0], text, calls[0][1], config, size)
    t_score = sum(_timed(score, f, text, v, config, size)[1] for f, v in calls)
    out["score"], out["score_compile"] = t_score, max(first - t_score / len(calls), 0.0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="MVTec AD root (default: ../shared/data/mvtec_ad)")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--weights", default="random:ViT-B/16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--methods", nargs="+", default=None, help=f"default: {METHODS}")
    ap.add_argument("--out", default=None, help="evaluate outputs (default: a temporary folder)")
    args = ap.parse_args(argv)

    from fiseclip_jax import methods as registry
    from fiseclip_jax.cli.common import RANDOM_BANNER
    from fiseclip_jax.clip.checkpoint import resolve_weights
    from fiseclip_jax.evaluate import evaluate, list_categories

    methods = args.methods or METHODS
    t0 = time.perf_counter()
    if not (Path(args.root) / args.category / "test").is_dir():
        sys.exit(f"MVTec AD {args.category} not found under {args.root}: nothing to benchmark")
    params, cfg, is_random = _ready(resolve_weights(args.weights, seed=0))
    t_weights = time.perf_counter() - t0
    out = Path(args.out or tempfile.mkdtemp(prefix="eval_bottle_"))
    cat = list_categories("mvtec", args.root, [args.category])[0]
    paths = [s.path for s in cat.samples]
    print(f"# evaluate on MVTec AD {args.category} ({len(paths)} test images), {args.weights} at {args.size}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores visible "
          "(shared with other processes: timings are indicative); weights loaded in "
          f"{t_weights:.1f} s; outputs in {out}\n")

    rows, accuracy = [], []
    for method in methods:
        config = registry.get(method)
        t0 = time.perf_counter()
        results = evaluate(params, cfg, "mvtec", args.root, config, categories=[args.category], size=args.size,
                           out=out, weights=args.weights, progress=False, overwrite=True)
        total = time.perf_counter() - t0
        base = out / results["method"] / "mvtec"
        timing = json.loads((base / "run.json").read_text())["timing_s"][args.category]
        st = stage_times(params, cfg, paths, cat.class_name, config, args.size)
        rows.append([method, total, timing["detect"], st["load"], st["encode"], st["encode_compile"],
                     st["score"], st["score_compile"], timing["masks"], timing["metrics"], timing["write"],
                     len(paths) / (st["load"] + st["encode"] + st["score"])])
        accuracy.append([method] + [results["categories"][args.category]["percent"].get(m)
                                    for m in results["metric_names"]])
        print(f"{method}: evaluate {total:.1f} s", flush=True)

    head = ["method", "evaluate", "detect", "load", "encode", "enc.compile", "match/score", "score.compile",
            "masks", "metrics", "write", "img/s warm"]
    print("\nSeconds per stage. evaluate = the whole call (compilation included); detect = detect_category "
          "inside it (load + encode + score + compile); load/encode/match/score re-timed warm, "
          "compilation apart\n(near 0 where the evaluate call already compiled the same function); "
          "masks/metrics/write = evaluate's own timers. img/s warm = images / (load + encode + match/score).\n")
    print("| " + " | ".join(head) + " |\n|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in rows:
        print("| " + " | ".join([r[0]] + [f"{v:.2f}" for v in r[1:-1]] + [f"{r[-1]:.1f}"]) + " |")
    names = results["metric_names"]
    print(f"\nAccuracy (percent){' -- MEANINGLESS, random weights' if is_random else ''}:\n")
    print("| method | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for a in accuracy:
        print("| " + " | ".join([a[0]] + ["n/a" if v is None else f"{v:.1f}" for v in a[1:]]) + " |")
    if is_random:
        print("\n" + RANDOM_BANNER.format(spec=args.weights))


if __name__ == "__main__":
    main()
