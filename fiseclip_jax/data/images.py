"""Reading images and ground-truth masks into numpy (SPEC §5).

`load_image` always returns uint8 RGB [H, W, 3]:
  * RGB as stored; grayscale (L, 1) repeated over the channels;
  * palette (P, PA) through its palette;
  * alpha (RGBA, LA, PA) dropped — colours kept as stored, not composited;
  * 16-bit grayscale (I;16*, or I with values in 0..65535) scaled to 8 bit by
    round(v * 255 / 65535), never clipped;
  * CMYK, YCbCr, ... through PIL's conversion to RGB.
EXIF orientation is not applied: pixels are used as stored, like the reference code.

`load_mask` returns bool [H, W]. A pixel is foreground when any channel is
nonzero (MVTec masks are 0/255, VisA masks may use 1 or colours). With `size`,
the 0/255 mask is resized to size x size (or h x w) with PIL's bilinear filter
(8 bit, antialiased when shrinking — the path torchvision's Resize takes on the
PIL masks of the MuSc / AnomalyCLIP code), then binarised at > 0.5 (SPEC §5), or
with rule "strict" only pixels that stay exactly 1.0 (255) count (MuSc on MVTec),
or with rule "resize>0" every nonzero pixel (MuSc on VisA: `mask > 0`).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .core import DataError
from ..errors import FiseclipError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _open(path, what: str = "image") -> Image.Image:
    """Open and fully decode; any failure becomes a DataError naming the file."""
    path = os.fspath(path)
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from None
    return img


def _sixteen_to_eight(values: np.ndarray, path: str) -> np.ndarray:
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"image {path}: 32-bit integer values outside 0..65535 are not supported")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def load_image(path) -> np.ndarray:
    """Read an image file as uint8 RGB [H, W, 3] (conversions in the module docstring)."""
    path = os.fspath(path)
    img = _open(path)
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        gray = _sixteen_to_eight(np.asarray(img), path)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "F":
        raise DataError(f"image {path}: floating-point (mode F) images are not supported")
    if mode != "RGB":
        try:
            img = img.convert("RGB")  # drops alpha; palettes and L/1/CMYK/YCbCr expanded
        except (OSError, ValueError) as err:
            raise DataError(f"image {path}: cannot convert mode {mode} to RGB: {err}") from None
    out = np.asarray(img, dtype=np.uint8)
    if out.ndim != 3 or out.shape[-1] != 3:
        raise DataError(f"image {path}: unexpected decoded shape {out.shape}")
    return np.ascontiguousarray(out)


def _foreground(img: Image.Image) -> np.ndarray:
    """bool [H, W]: any colour channel nonzero (alpha ignored)."""
    mode = img.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        img = img.convert("RGB") if mode != "PA" else img.convert("RGBA").convert("RGB")
    elif mode == "CMYK" or mode == "YCbCr":
        img = img.convert("RGB")
    values = np.asarray(img)  # P gives palette indices: nonzero index = foreground
    if values.ndim == 3:
        return np.any(values != 0, axis=-1)
    return values != 0


MASK_RULES = ("resize>0.5", "strict", "resize>0")


def load_mask(path, size=None, *, strict: bool = False, rule: str | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool [H, W], or resized to `size` (an int: square; or (h, w)).

    rule, for a resized mask: "resize>0.5" (default), "strict" (only pixels that stay fully white,
    MuSc on MVTec; `strict=True` says the same) or "resize>0" (any nonzero, MuSc on VisA)."""
    path = os.fspath(path)
    rule = rule or ("strict" if strict else "resize>0.5")
    if rule not in MASK_RULES:
        raise FiseclipError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    mask = _foreground(_open(path, "mask"))
    if size is None:
        return mask
    h, w = (size, size) if np.ndim(size) == 0 else size
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise FiseclipError(f"mask size must be positive, got {size}")
    pil = Image.fromarray(mask.astype(np.uint8) * 255)  # mode L
    resized = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR))
    if rule == "strict":
        return resized == 255
    if rule == "resize>0":
        return resized > 0
    return resized.astype(np.float64) / 255.0 > 0.5


def image_size(path, what: str = "image") -> tuple[int, int]:
    """(height, width) from the header, after PIL's `verify` (chunk CRCs for PNG)."""
    path = os.fspath(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            img.verify()
    except FileNotFoundError:
        raise DataError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read {what} {path}: {err}") from None
    return height, width
