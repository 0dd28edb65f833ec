"""bf16 vs fp32: how much the maps move and how much faster it runs, on real MVTec bottle images.

Random weights (no pretrained ones exist here), so only the agreement of the two dtypes means
something, not the maps themselves. Same images, same weights, one process:

    python benchmarks/bf16.py                          # ViT-B/16 at 224, 8 bottle test images
    python benchmarks/bf16.py --preset ViT-B-16-plus-240 --size 240 --n-images 16

Prints per method: Pearson correlation of all map pixels (bf16 vs fp32), max |Δ| of the maps
relative to their range, Pearson of the image scores, and the time of one `detect` call per dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_ad"


def timed(fn, repeats):
    out = jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--preset", default="ViT-B/16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["fiseclip", "anoclip", "musc"])
    args = ap.parse_args(argv)

    import fiseclip_jax as fj
    from fiseclip_jax.data import list_mvtec, load_image

    if not (Path(args.root) / "bottle" / "test").is_dir():
        sys.exit(f"MVTec AD bottle not found under {args.root}: nothing to measure")
    cat = list_mvtec(args.root, ["bottle"])[0]
    step = max(1, len(cat.samples) // args.n_images)
    paths = [s.path for s in cat.samples[::step][: args.n_images]]
    pixels = fj.preprocess([load_image(p) for p in paths], args.size)
    params, cfg, _ = fj.resolve_weights(f"random:{args.preset}")
    print(f"# bf16 vs fp32, random {args.preset} at {args.size}, {len(paths)} MVTec bottle test images, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; random weights: only the agreement means "
          "something\n")
    print("| method | maps Pearson | max |Δ| / range | scores Pearson | fp32 s | bf16 s | fp32/bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name in args.methods:
        method = fj.methods.get(name)
        if name == "fiseclip":
            method = method.with_run_options(batch_size=0)
        results = {}
        for dtype in ("float32", "bfloat16"):
            c = cfg.replace(dtype=dtype)
            text = fj.text_features_full(params, c, "bottle", method.prompts) if method.prompts else \
                np.zeros((2, cfg.embed_dim), np.float32)
            det, t = timed(lambda: fj.detect(params, c, pixels, text, method), args.repeats)
            results[dtype] = (np.asarray(det.anomaly_maps, np.float64), np.asarray(det.image_scores, np.float64), t)
        (m32, s32, t32), (m16, s16, t16) = results["float32"], results["bfloat16"]
        pearson = np.corrcoef(m32.ravel(), m16.ravel())[0, 1]
        rel = np.abs(m32 - m16).max() / max(m32.max() - m32.min(), 1e-12)
        sp = np.corrcoef(s32, s16)[0, 1] if s32.std() > 0 and s16.std() > 0 else float("nan")
        print(f"| {name} | {pearson:.6f} | {rel:.2e} | {sp:.4f} | {t32:.2f} | {t16:.2f} | {t32 / t16:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
