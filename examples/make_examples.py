"""Generate the synthetic example images shipped in examples/bottle/ (masks in examples/bottle_masks/).

Top views of a bottle-like object drawn procedurally (the project made them, so they
may be redistributed with it): 6 good images, and 4 with defects (a crack, a
contamination blob, a broken rim, a scratch), each with its ground-truth mask.

    python examples/make_examples.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 192
HERE = Path(__file__).resolve().parent
IMAGES, MASKS = HERE / "bottle", HERE / "bottle_masks"


def bottle(rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    cx, cy = SIZE / 2 + rng.normal(0, 2), SIZE / 2 + rng.normal(0, 2)
    r = np.hypot(xx - cx, yy - cy)
    img = np.full((SIZE, SIZE), 25.0)
    img = np.where(r < 80, 150 - 0.4 * r, img)  # outer wall
    img = np.where((r > 52) & (r < 60), 200.0, img)  # bright rim
    img = np.where(r < 40, 60 + 0.5 * r, img)  # opening
    img += rng.normal(0, 4, img.shape)
    rgb = np.stack([img * 0.95, img, img * 0.9], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def defect(img: Image.Image, kind: str, rng: np.random.Generator):
    mask = Image.new("L", img.size, 0)
    d, m = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    c = SIZE // 2
    if kind == "crack":
        pts = [(c + 20, c - 65), (c + 30, c - 45), (c + 24, c - 30), (c + 36, c - 12)]
        d.line(pts, fill=(240, 240, 235), width=3)
        m.line(pts, fill=255, width=3)
    elif kind == "contamination":
        box = (c - 70, c + 10, c - 48, c + 30)
        d.ellipse(box, fill=(70, 50, 30))
        m.ellipse(box, fill=255)
    elif kind == "broken_rim":
        d.pieslice((c - 62, c - 62, c + 62, c + 62), -15, 15, fill=(25, 25, 25))
        m.pieslice((c - 62, c - 62, c + 62, c + 62), -15, 15, fill=255)
    else:  # scratch
        pts = [(c - 60, c + 50), (c - 20, c + 62)]
        d.line(pts, fill=(10, 10, 10), width=2)
        m.line(pts, fill=255, width=2)
    return img, mask


def main():
    rng = np.random.default_rng(0)
    for d in (IMAGES / "good", IMAGES / "defect", MASKS / "defect"):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        bottle(rng).save(IMAGES / "good" / f"{i:03d}.png", optimize=True)
    for i, kind in enumerate(("crack", "contamination", "broken_rim", "scratch")):
        img, mask = defect(bottle(rng), kind, rng)
        img.save(IMAGES / "defect" / f"{i:03d}_{kind}.png", optimize=True)
        mask.save(MASKS / "defect" / f"{i:03d}_{kind}.png", optimize=True)


if __name__ == "__main__":
    main()
