"""What the report adds to evaluate on an MVTec-sized category: pixel curves and thresholds
(`curves.pixel_analysis`) next to the pixel metrics they accompany (`metrics.pixel_metrics`), in one
process on the same maps; time and peak numpy memory (tracemalloc) of each, and their ratio.

    python benchmarks/report_cost.py [--images 83] [--size 518]

Maps and masks as in benchmarks/metrics_speed.py (synthetic; no weights involved).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from metrics_speed import make_case

from fiseclip_jax import metrics
from fiseclip_jax.curves import pixel_analysis


def measure(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=83)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args()
    masks, maps = make_case(args.images, args.size)
    inputs = (masks.nbytes + maps.nbytes) / 2**20
    print(f"{args.images} maps at {args.size}x{args.size}: {masks.size:,} pixels, {masks.mean():.2%} defect; "
          f"maps + masks {inputs:.0f} MiB")
    base = measure(lambda: metrics.pixel_metrics(masks, maps))
    extra = measure(lambda: pixel_analysis(masks, maps, fpr=0.01))
    print(f"pixel_metrics (AUROC, AP, F1, AUPRO): {base[0]:.2f} s, peak {base[1]:.0f} MiB")
    print(f"pixel_analysis (curves, thresholds):  {extra[0]:.2f} s, peak {extra[1]:.0f} MiB")
    print(f"ratio analysis / metrics: time {extra[0] / base[0]:.2f}, peak memory {extra[1] / base[1]:.2f}")


if __name__ == "__main__":
    main()
