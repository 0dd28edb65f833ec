"""Screenshot report.html in headless Chromium and check the picture is not blank; makes docs/report.png.

    python benchmarks/screenshot.py                  # evaluate examples/ -> report.html -> docs/report.png
    python benchmarks/screenshot.py --html R.html --out shot.png [--no-install]

Without --html it evaluates the synthetic examples (examples/bottle with examples/bottle_masks; never
MVTec images, whose licence keeps them out of the repository) with random:tiny weights at 64 px into
a temporary folder: the numbers are meaningless, the page shows what a report looks like. Chromium is
`chromium` (or chromium-browser / google-chrome) on PATH; when missing it is installed with apt-get
(Debian's `chromium` package) if this runs as root, unless --no-install. Exit 0 and one line of
figures when the screenshot is not blank; 1 when it is blank; 2 when no Chromium can be had.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium(install: bool = True, timeout: int = 900) -> str | None:
    """A Chromium executable, installing Debian's package with apt-get (root only) when missing; None if
    there is none and it cannot be installed."""
    found = find_chromium()
    if found or not install or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout, check=False)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return find_chromium()


def screenshot(browser: str, html: Path, png: Path, width: int = 1280, height: int = 2000,
               timeout: int = 180) -> Path:
    """The top `width` x `height` pixels of the page, as Chromium renders it headless."""
    with tempfile.TemporaryDirectory(prefix="fiseclip-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
               Path(html).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-500:]}")
    return png


def blank_stats(png: Path) -> dict:
    """How much is drawn: share of pixels that are not near-white, number of distinct colours."""
    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"))
    inked = float(np.mean(rgb.min(axis=2) < 235))
    colours = len(np.unique(rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 200_000)], axis=0))
    return {"size": f"{rgb.shape[1]}x{rgb.shape[0]}", "inked": inked, "colours": colours,
            "blank": inked < 0.02 or colours < 20}


def example_report(work: Path) -> Path:
    """report.html of examples/ (synthetic images and masks) with random:tiny weights at 64 px."""
    sys.path.insert(0, str(ROOT))
    from fiseclip_jax.cli import main

    rc = main(["evaluate", "--dataset", "folder", "--root", str(ROOT / "examples" / "bottle"), "--masks",
               str(ROOT / "examples" / "bottle_masks"), "--weights", "random:tiny", "--size", "64",
               "--fpr", "0.2", "--gallery", "2", "--out", str(work), "--no-progress"])
    if rc:
        raise SystemExit(f"evaluate failed ({rc})")
    return work / "fiseclip" / "folder" / "report.html"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--html", default=None, help="page to screenshot (default: a report of examples/)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2700)
    ap.add_argument("--no-install", action="store_true", help="never apt-get install chromium")
    args = ap.parse_args(argv)
    browser = ensure_chromium(install=not args.no_install)
    if browser is None:
        print("screenshot: no chromium and it could not be installed (needs root and Debian's package)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="fiseclip-report-") as work:
        html = Path(args.html) if args.html else example_report(Path(work))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shot = screenshot(browser, html, Path(work) / "shot.png", args.width, args.height)
        with Image.open(shot) as im:  # palette PNG: a fraction of the bytes, the same picture to the eye
            im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    stats = blank_stats(out)
    print(f"screenshot {out}: {stats['size']}, {100 * stats['inked']:.1f}% of pixels drawn, "
          f"{stats['colours']} colours, {'BLANK' if stats['blank'] else 'not blank'} ({browser})")
    return 1 if stats["blank"] else 0


if __name__ == "__main__":
    sys.exit(main())
