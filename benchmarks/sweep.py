"""A 12-configuration FiSeCLIP grid on MVTec AD bottle test: `sweep` against 12 separate `evaluate` runs,
and a second sweep with the feature cache warm.

    python benchmarks/sweep.py                                   # random:ViT-B/16 at 224, all 83 images
    python benchmarks/sweep.py --n-images 24                     # a spread subset (shared CPU)
    python benchmarks/sweep.py --weights random:tiny --size 32   # smoke run

The grid changes only scoring fields (theta × fusion_weight × image_score), so a sweep encodes
each image once and scores 12 times (theta changes the matching: 3 matchings, 12 fusions); 12
`evaluate` runs encode and match 12 times. The three arms run in one process, one after the other,
each after `jax.clear_caches()`, with the persistent XLA cache on in a fresh folder as the CLI has
it (`--no-xla-cache`: off, every arm compiles everything it runs). So the warm sweep finds the
features and the matchings (`--cache`) and the compiled programs of the cold sweep, as a second
`fiseclip-jax sweep --cache DIR` would. evaluate writes no overlays (sweep writes none).
Printed: seconds of each arm and the ratios; the targets of issue 14 are ≥ 4× (sweep vs 12 runs)
and ≥ 2× (warm-cache sweep vs cold sweep).

With random weights (no pretrained CLIP here) every metric in the tables is MEANINGLESS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_default_matmul_precision", "float32")

import fiseclip_jax as fj  # noqa: E402
from fiseclip_jax import cache as fj_cache  # noqa: E402
from fiseclip_jax.data import list_mvtec  # noqa: E402
from fiseclip_jax.evaluate import evaluate  # noqa: E402
from fiseclip_jax.features import FeatureCache  # noqa: E402
from fiseclip_jax.sweep import grid_points, parse_grid, sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"
GRID = ["theta=0.4,0.5,0.6", "fusion_weight=0.3,0.7", "image_score=sum,max"]


def subset(root: Path, n: int | None, dest: Path) -> tuple[Path, Path, int]:
    """bottle/test as a folder dataset of symlinks (every k-th image for a subset, defects and normals
    alike), its masks beside it: (images folder, masks folder, number of images)."""
    cat = list_mvtec(root, ["bottle"])[0]
    samples = list(cat.samples)
    if n is not None and n < len(samples):
        step = len(samples) / n
        samples = [samples[int(i * step)] for i in range(n)]
    for s in samples:
        defect = Path(s.path).parent.name
        (dest / "bottle" / defect).mkdir(parents=True, exist_ok=True)
        os.symlink(s.path, dest / "bottle" / defect / Path(s.path).name)
        if s.mask_path:
            (dest / "masks" / defect).mkdir(parents=True, exist_ok=True)
            os.symlink(s.mask_path, dest / "masks" / defect / Path(s.mask_path).name)
    return dest / "bottle", dest / "masks", len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--weights", default="random:ViT-B/16")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--n-images", type=int, default=None, help="a spread subset of the 83 test images")
    ap.add_argument("--batch-size", type=int, default=16, help="FiSeCLIP matching batch (default 16)")
    ap.add_argument("--no-xla-cache", action="store_true", help="no persistent XLA cache (every arm compiles)")
    args = ap.parse_args()

    params, cfg, _ = fj.resolve_weights(args.weights, seed=0)
    size = args.size or cfg.vision.image_size
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    os.environ["FISECLIP_CACHE"] = str(work / "user-cache")  # text features: cold for the first arm only
    if not args.no_xla_cache:
        fj_cache.enable_compilation_cache()  # as the CLI does (configure_caches)
    try:
        images, masks, n = subset(Path(args.root), args.n_images, work / "data")
        base = fj.methods.get("fiseclip", batch_size=args.batch_size)
        grid = parse_grid(GRID)
        points = grid_points(base, grid)
        print(f"{len(points)} configurations x {n} images of bottle/test, {args.weights} at {size}px, persistent "
              f"XLA cache {'off' if args.no_xla_cache else 'on'} (random weights: every metric is MEANINGLESS)",
              flush=True)
        kw = dict(masks=masks, size=size, progress=False, weights=args.weights, categories=["bottle"])

        jax.clear_caches()
        t0 = time.perf_counter()
        separate = {}
        for k, p in enumerate(points, 1):
            res = evaluate(params, cfg, "folder", images, p.method, out=work / "ev" / p.row,
                           overlays_per_category=0, **kw)
            separate[p.row] = res["mean"]["metrics"]
            print(f"  evaluate {k}/{len(points)}: {time.perf_counter() - t0:.1f} s", flush=True)
        t_separate = time.perf_counter() - t0

        def timed_sweep(out):
            """One sweep arm with a new FeatureCache on the shared folder: (rows, seconds, (misses, hits))."""
            jax.clear_caches()
            fc = FeatureCache(work / "feats")
            t0 = time.perf_counter()
            rows = sweep(params, cfg, "folder", images, base, grid, out=work / out, cache=fc, **kw)
            return rows, time.perf_counter() - t0, (fc.misses, fc.hits)

        cold, t_cold, cold_stats = timed_sweep("sw1")
        warm, t_warm, warm_stats = timed_sweep("sw2")

        worst = max(abs(r["mean"]["metrics"][m] - separate[r["row"]][m])
                    for rows in (cold, warm) for r in rows for m in separate[r["row"]])
        print(f"\n12 x evaluate          {t_separate:8.1f} s")
        print(f"sweep, cold cache      {t_cold:8.1f} s   (feature cache misses/hits {cold_stats[0]}/{cold_stats[1]})")
        print(f"sweep, warm cache      {t_warm:8.1f} s   (feature cache misses/hits {warm_stats[0]}/{warm_stats[1]})")
        print(f"ratio 12 x evaluate / sweep      {t_separate / t_cold:5.2f}x  (target >= 4x)")
        print(f"ratio sweep cold / sweep warm    {t_cold / t_warm:5.2f}x  (target >= 2x)")
        print(f"largest metric difference sweep vs evaluate: {worst:.2e}")
        print("\nablation.md of the cold sweep (random weights: MEANINGLESS numbers):\n")
        print((work / "sw1" / "ablation.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
