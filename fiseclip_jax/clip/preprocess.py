"""Image preprocessing to CLIP-normalised NHWC pixels (SPEC §1, §8)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .config import CLIP_MEAN, CLIP_STD
from ..errors import FiseclipError

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image or a uint8 array [H, W], [H, W, 3] or [H, W, 4]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise FiseclipError(f"array images must be uint8 HWC, got dtype {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr).convert("RGB")
    raise FiseclipError(f"array images must be [H, W], [H, W, 1|3|4], got shape {arr.shape}")


def resize_square(image, size: int, resample: str = "bicubic") -> np.ndarray:
    """uint8 [size, size, 3]: the whole image resized to a square with PIL (antialiased).

    This is the references' pipeline (resize to S×S, then a centre crop of S that is a
    no-op); `resample="bilinear"` reproduces AnoVL (SPEC §8).
    """
    if resample not in RESAMPLE:
        raise FiseclipError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    return np.asarray(to_pil(image).resize((size, size), RESAMPLE[resample]))


def normalize(images_uint8) -> np.ndarray:
    """uint8 [..., 3] -> float32 CLIP-normalised."""
    x = np.asarray(images_uint8, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def preprocess(images: Sequence, size: int, resample: str = "bicubic") -> np.ndarray:
    """PIL images or uint8 HWC arrays -> float32 [B, size, size, 3], CLIP-normalised."""
    if isinstance(images, (Image.Image, np.ndarray)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
        images = [images]
    return normalize(np.stack([resize_square(im, size, resample) for im in images]))
