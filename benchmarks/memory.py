"""Peak memory of `fiseclip-jax detect` against the number of images: it should stay flat.

Generates N synthetic 900×900 JPEG images, runs the detect command on them in a fresh process
per case (random tiny weights at 32 px, so decoding and bookkeeping dominate, not the model),
and prints the peak resident memory of that process. Also prints what MuSc, which must hold
every image's features before it scores, keeps per image for real model geometries.

    python benchmarks/memory.py                      # anoclip and fiseclip, 50 and 500 images
    python benchmarks/memory.py --counts 50 200 --methods anoclip
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys
from fiseclip_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_images(folder: Path, n: int, side: int = 900) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    base = ((xx + yy) * 255 / (2 * side)).astype(np.uint8)
    for i in range(len(list(folder.glob("*.jpg"))), n):
        img = np.stack([base, base[::-1], base.T], -1) + rng.integers(0, 8, (side, side, 3), np.uint8)
        Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=90)


def peak(folder: Path, method: str, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, "detect", str(folder), "--method", method, "--weights", "random:tiny",
           "--size", "32", "--batch-size", "16", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return json.loads(res.stdout.strip().splitlines()[-1])


def musc_feature_bytes(preset: str, size: int) -> int:
    """Bytes MuSc keeps per image: 4 matching blocks of patch tokens plus the CLS embedding (float32)."""
    from fiseclip_jax.clip.config import get_config

    cfg = get_config(preset)
    patches = (size // cfg.vision.patch_size) ** 2
    return 4 * (4 * patches * cfg.vision.width + cfg.embed_dim)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--methods", nargs="+", default=["anoclip", "fiseclip"])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fiseclip_memory_") as tmp:
        tmp = Path(tmp)
        print("| method | images (900x900) | peak RSS MiB |\n|---|---|---|")
        for n in sorted(args.counts):
            folder = tmp / f"images{n}"
            make_images(folder, n)
            for method in args.methods:
                r = peak(folder, method, tmp / f"out-{method}-{n}")
                print(f"| {method} | {n} | {r['peak_mib']:.0f}{'' if r['rc'] == 0 else ' (rc ' + str(r['rc']) + ')'} |",
                      flush=True)
    print("\nMuSc keeps every image's features until it scores (float32, 4 blocks + CLS):")
    for preset, size in (("ViT-B/16", 224), ("ViT-L/14@336", 336), ("ViT-L/14@336", 518)):
        mib = musc_feature_bytes(preset, size) / 2 ** 20
        print(f"  {preset} at {size}: {mib:.1f} MiB per image ({mib * 200 / 1024:.1f} GiB for 200 images)")


if __name__ == "__main__":
    main()
