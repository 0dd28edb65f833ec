"""Time the pixel metrics on an MVTec-sized category: 100 maps at 518x518 (SPEC §6).

    python benchmarks/metrics_speed.py [--images 100] [--size 518]

Masks are random blobs (about 2% defect pixels, a third of the images defect-free);
maps are float32 noise plus a bump on the defects, like a real detector's output.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from fiseclip_jax import metrics


def make_case(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    seeds = rng.random((n_images, size, size)) < 2e-4
    seeds[: n_images // 3] = False  # defect-free images
    masks = ndimage.binary_dilation(seeds, structure=np.ones((1, 3, 3), bool), iterations=6)
    maps = rng.normal(size=masks.shape).astype(np.float32)
    maps += 1.5 * ndimage.uniform_filter(masks.astype(np.float32), size=(1, 9, 9))
    return masks, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=518)
    args = parser.parse_args()
    masks, maps = make_case(args.images, args.size)
    print(f"{args.images} maps at {args.size}x{args.size}: {masks.size:,} pixels, "
          f"{masks.mean():.2%} defect")
    for name, fn in [
        ("aupro (exact)", lambda: metrics.aupro(masks, maps)),
        ("aupro_legacy (200 thresholds)", lambda: metrics.aupro_legacy(masks, maps)),
        ("pixel_metrics (AUROC, AP, F1, exact AUPRO)", lambda: metrics.pixel_metrics(masks, maps)),
    ]:
        start = time.perf_counter()
        value = fn()
        print(f"{name:45s} {time.perf_counter() - start:6.2f} s   {value}")


if __name__ == "__main__":
    main()
