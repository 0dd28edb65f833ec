"""Wide images as two square tiles, AnoVL's VisA protocol (SPEC §4.4; hq-deng/AnoVL vis_test.py).

The image is resized so its short side is S (aspect kept), cut into two S×S tiles at the two ends of
its long side (left and right for a landscape image, top and bottom for a portrait one), each tile is
scored as a square image, and the two tile maps are put back where they came from and averaged where
they overlap. A square image gives two identical tiles. A long side over 2·S would leave a gap between
the tiles and is refused.

`resize_short_side` is numpy/PIL (before the model); `TileLayout` splits and merges with static
shapes, pure JAX, so it runs inside jit.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

from .clip.preprocess import RESAMPLE, normalize, to_pil
from .postprocess import upsample_bilinear
from .errors import FiseclipError

TILES = 2


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to `short`: torchvision's `Resize(int)` rule, the long side
    int(short · long / short_side) (truncated, as torchvision computes it)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def resize_short_side(image, short: int, resample: str = "bilinear") -> np.ndarray:
    """uint8 [h, w, 3]: the image resized with PIL (antialiased) so its short side is `short`
    (torchvision `Resize(short)` on a PIL image, AnoVL's VisA transform)."""
    if resample not in RESAMPLE:
        raise FiseclipError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    pil = to_pil(image)
    h, w = short_side_size(pil.height, pil.width, short)
    return np.asarray(pil.resize((w, h), RESAMPLE[resample]))


def prepare_tiled(image, short: int, resample: str = "bilinear") -> np.ndarray:
    """float32 [h, w, 3] CLIP-normalised, short side `short`: the model input of a tiled method."""
    return normalize(resize_short_side(image, short, resample))


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """Two S×S tiles of an [H, W] image (static, hashable: it rides in jit as a static value)."""

    height: int
    width: int
    align_corners: bool = True  # of the tiles' bilinear upsampling (AnoVL: True)

    def __post_init__(self):
        short, long = sorted((self.height, self.width))
        if long > TILES * short:
            raise FiseclipError(f"an image of {self.height}x{self.width} is too long for {TILES} tiles of "
                             f"{short}x{short} (long side over {TILES}x the short side)")

    @classmethod
    def of(cls, size, align_corners: bool = True) -> "TileLayout":
        """The layout of a model input of `size` (H, W) (an int: square)."""
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return cls(int(h), int(w), align_corners)

    @property
    def tile(self) -> int:
        return min(self.height, self.width)

    @property
    def axis(self) -> int:
        """The long axis of an [..., H, W] array: -1 (width) unless the image is portrait."""
        return -2 if self.height > self.width else -1

    @property
    def offset(self) -> int:
        """Where the second tile starts on the long axis (AnoVL's `diff` = W − H)."""
        return max(self.height, self.width) - self.tile

    def split(self, pixels):
        """[B, H, W, C] -> [B, 2, S, S, C]: first and last S along the long side."""
        axis = 1 if self.height > self.width else 2
        s, o = self.tile, self.offset
        first = lax.slice_in_dim(pixels, 0, s, axis=axis)
        second = lax.slice_in_dim(pixels, o, o + s, axis=axis)
        return jnp.stack([first, second], axis=1)

    def merge(self, maps):
        """[..., 2, S, S] tile maps -> [..., H, W]: each tile in its place, averaged where both cover."""
        s, o = self.tile, self.offset
        axis = self.axis
        lead = maps.ndim - 3
        pad_first = [(0, 0)] * lead + ([(0, o), (0, 0)] if axis == -2 else [(0, 0), (0, o)])
        pad_second = [(0, 0)] * lead + ([(o, 0), (0, 0)] if axis == -2 else [(0, 0), (o, 0)])
        total = jnp.pad(maps[..., 0, :, :], pad_first) + jnp.pad(maps[..., 1, :, :], pad_second)
        cover = np.pad(np.ones((s, s), np.float32), pad_first[lead:]) + np.pad(np.ones((s, s), np.float32),
                                                                               pad_second[lead:])
        return total / jnp.asarray(cover)

    def upsample_merge(self, grids):
        """[..., 2, g, g] patch-grid maps -> [..., H, W]: each tile upsampled bilinearly to S×S, then merged."""
        return self.merge(upsample_bilinear(grids, self.tile, self.align_corners))


__all__ = ["TILES", "TileLayout", "prepare_tiled", "resize_short_side", "short_side_size"]
