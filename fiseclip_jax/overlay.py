"""Heat-map overlays of anomaly maps on their images (anomalib-style pictures a person reads)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of a perceptually ordered map (dark blue -> cyan -> yellow -> red).
_ANCHORS = np.array([[0.0, 0.0, 0.5], [0.0, 0.3, 1.0], [0.0, 0.9, 1.0], [0.5, 1.0, 0.5],
                     [1.0, 0.9, 0.0], [1.0, 0.3, 0.0], [0.5, 0.0, 0.0]])


def colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> uint8 [H, W, 3] colours."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(_ANCHORS) - 1)
    i = np.minimum(v.astype(int), len(_ANCHORS) - 2)
    t = (v - i)[..., None]
    return np.round(255 * ((1 - t) * _ANCHORS[i] + t * _ANCHORS[i + 1])).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float,
            alpha: float = 0.5) -> Image.Image:
    """Blend the colourised map (scaled by the category's vmin..vmax) over the image, at the map's size."""
    size = anomaly_map.shape[::-1]
    base = np.asarray(Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BILINEAR), np.float32)
    scaled = (anomaly_map - vmin) / max(vmax - vmin, 1e-12)
    heat = colorize(scaled).astype(np.float32)
    return Image.fromarray(((1 - alpha) * base + alpha * heat).round().astype(np.uint8))


def side_by_side(image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float,
                 mask: np.ndarray | None = None) -> Image.Image:
    """Image | overlay (| ground-truth mask when given), all at the map's size."""
    ov = overlay(image, anomaly_map, vmin=vmin, vmax=vmax)
    panels = [Image.fromarray(image).convert("RGB").resize(ov.size, Image.Resampling.BILINEAR), ov]
    if mask is not None:
        m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize(ov.size, Image.Resampling.NEAREST)
        panels.append(m.convert("RGB"))
    out = Image.new("RGB", (ov.size[0] * len(panels), ov.size[1]))
    for k, p in enumerate(panels):
        out.paste(p, (k * ov.size[0], 0))
    return out


def triptych(image: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray, *, vmin: float,
             vmax: float) -> Image.Image:
    """Image | ground-truth mask (black when there is none) | overlay, all at the map's size (the
    report's gallery)."""
    ov = overlay(image, anomaly_map, vmin=vmin, vmax=vmax)
    gt = np.zeros(anomaly_map.shape, bool) if mask is None else np.asarray(mask) > 0
    panels = [Image.fromarray(image).convert("RGB").resize(ov.size, Image.Resampling.BILINEAR),
              Image.fromarray(gt.astype(np.uint8) * 255).resize(ov.size, Image.Resampling.NEAREST).convert("RGB"),
              ov]
    out = Image.new("RGB", (ov.size[0] * 3, ov.size[1]))
    for k, p in enumerate(panels):
        out.paste(p, (k * ov.size[0], 0))
    return out
