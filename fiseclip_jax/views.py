"""The 22 test-time views AnoCLIP averages its image score over (SPEC §4.4).

Follows the AnoVL authors' `utils.aug` (github hq-deng/AnoVL), applied to the
CLIP-normalised `[B, H, W, 3]` pixels exactly as their data loader yields them:

- rotations and translations: torch `affine_grid` + `grid_sample`, bilinear,
  reflection padding, `align_corners=True`; rotation theta
  [[cos a, -sin a, 0], [sin a, cos a, 0]] (a > 0 turns the content
  counter-clockwise on screen), translation theta [[1, 0, tx], [0, 1, ty]]
  (the output at p samples the input at p + t, so content moves by -t);
- hflip: reverse the width axis (kornia `hflip`);
- grayscale: kornia `rgb_to_grayscale` (0.299, 0.587, 0.114) on the
  *normalised* values, repeated to 3 channels (no de-normalisation);
- rot90 x k: kornia `rotate(90 k degrees)` about the centre, counter-clockwise,
  which on a square image is `np.rot90(k)` over (H, W) up to float rounding.

The order is the reference's construction order (it then shuffles the views,
which the mean over views ignores). Everything is pure jnp with static
thetas, so it composes with `jit` and `vmap`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from .clip.config import CLIP_MEAN, CLIP_STD

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LUMA_WEIGHTS",
    "ROTATION_ANGLES",
    "TRANSLATIONS",
    "VIEW_NAMES",
    "affine_sample",
    "anoclip_views",
    "grayscale",
    "rotation_theta",
    "translation_theta",
]

# kornia `rgb_to_grayscale` default weights for float images (used by AnoVL).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# Reference order (AnoVL `aug`): angles in radians, translations in [-1, 1] grid units.
ROTATION_ANGLES = tuple(s * m * math.pi / 16 for s, m in
                        [(-1, 4), (-1, 3), (-1, 2), (-1, 1), (1, 1), (1, 2), (1, 3), (1, 4)])
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2),
                (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))

_ANGLE_NAMES = ("-pi/4", "-3pi/16", "-pi/8", "-pi/16", "+pi/16", "+pi/8", "+3pi/16", "+pi/4")

VIEW_NAMES: tuple[str, ...] = (
    ("original",)
    + tuple(f"rotate({a})" for a in _ANGLE_NAMES)
    + tuple(f"translate({tx:+.1f},{ty:+.1f})" for tx, ty in TRANSLATIONS)
    + ("hflip", "grayscale", "rot90x1", "rot90x2", "rot90x3")
)
assert len(VIEW_NAMES) == 22  # 1 + 8 + 8 + 1 + 1 + 3 (SPEC §4.4)


def rotation_theta(angle: float) -> np.ndarray:
    """[2, 3] float32 `affine_grid` theta of a rotation by `angle` radians about the centre."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0]], np.float32)


def translation_theta(tx: float, ty: float) -> np.ndarray:
    """[2, 3] float32 `affine_grid` theta sampling the input at (x + tx, y + ty)."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty]], np.float32)


# [16, 2, 3] static thetas: 8 rotations then 8 translations.
_AFFINE_THETAS = np.stack([rotation_theta(a) for a in ROTATION_ANGLES]
                          + [translation_theta(tx, ty) for tx, ty in TRANSLATIONS])


# ------------------------------------------------------------------ affine sampling
def _base_coords(n: int, align_corners: bool) -> np.ndarray:
    """[n] float32 normalised centres of the output pixels, as torch `affine_grid`."""
    if n <= 1:
        return np.zeros(max(n, 1), np.float32)
    coords = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    if not align_corners:  # torch: range * (n - 1) / n, two float32 ops
        coords = coords * np.float32(n - 1) / np.float32(n)
    return coords


def _source_index(coord, n: int, align_corners: bool):
    """Normalised coords -> pixel coords in [0, n-1] with reflection, as torch's CPU `grid_sample`.

    Reflection folds about the first/last pixel centres (align_corners=True) or
    the image borders (False); written as torch's vectorised kernel does it
    (trunc/min form) so float32 rounding matches closely.
    """
    if align_corners:
        if n <= 1:  # a single pixel: everything reflects onto it
            return jnp.zeros_like(coord)
        coord = (coord + 1) * ((n - 1) / 2)
        low, twice_span = 0.0, 2.0 * (n - 1)
    else:
        coord = (coord + 1) * (n / 2) - 0.5
        low, twice_span = -0.5, 2.0 * n
    dist = jnp.abs(coord - low)
    extra = dist - jnp.trunc(dist / twice_span) * twice_span
    reflected = jnp.minimum(extra, twice_span - extra) + low
    return jnp.clip(reflected, 0, n - 1)


def affine_sample(pixels, theta, align_corners: bool = True):
    """Warp `pixels [B, H, W, C]` by `theta [2, 3]` (output -> input normalised coords).

    Equals `F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=ac),
    mode="bilinear", padding_mode="reflection", align_corners=ac)`; AnoVL uses
    ac=True (SPEC §4.4). `align_corners` is a static Python bool. Matches torch
    up to float32 rounding of the source coordinates (~1e-5 on 16-px white noise).
    """
    _, height, width, _ = pixels.shape
    dtype = pixels.dtype if jnp.issubdtype(pixels.dtype, jnp.floating) else jnp.float32
    theta = jnp.asarray(theta, dtype)
    xs = jnp.asarray(_base_coords(width, align_corners), dtype)[None, :]
    ys = jnp.asarray(_base_coords(height, align_corners), dtype)[:, None]
    gx = (theta[0, 0] * xs + theta[0, 1] * ys) + theta[0, 2]  # [H, W], affine_grid's sum order
    gy = (theta[1, 0] * xs + theta[1, 1] * ys) + theta[1, 2]
    ix = _source_index(gx, width, align_corners)
    iy = _source_index(gy, height, align_corners)

    x0f, y0f = jnp.floor(ix), jnp.floor(iy)
    wx, wy = (ix - x0f)[..., None], (iy - y0f)[..., None]  # weight of the +1 neighbour
    x0, y0 = x0f.astype(jnp.int32), y0f.astype(jnp.int32)
    # ix <= W-1, so x0 + 1 only leaves the image where its weight is 0.
    x1, y1 = jnp.minimum(x0 + 1, width - 1), jnp.minimum(y0 + 1, height - 1)
    pixels = jnp.asarray(pixels, dtype)
    top = pixels[:, y0, x0, :] * (1 - wx) + pixels[:, y0, x1, :] * wx
    bottom = pixels[:, y1, x0, :] * (1 - wx) + pixels[:, y1, x1, :] * wx
    return top * (1 - wy) + bottom * wy


# ------------------------------------------------------------------ colour
def grayscale(pixels, mean=None, std=None, weights=LUMA_WEIGHTS):
    """Luminance of `pixels [..., 3]` repeated to 3 channels.

    Default (mean=std=None) is AnoVL's: kornia `rgb_to_grayscale` applied
    straight to the CLIP-normalised values. With `mean`/`std` given (e.g.
    CLIP_MEAN, CLIP_STD) the pixels are de-normalised first and the grey
    image re-normalised, i.e. a grayscale of the actual photograph.
    """
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    x = pixels
    if mean is not None:
        mean, std = jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)
        x = x * std + mean
    w = jnp.asarray(weights, x.dtype)
    gray = x[..., 0:1] * w[0] + x[..., 1:2] * w[1] + x[..., 2:3] * w[2]
    gray = jnp.broadcast_to(gray, x.shape)
    if mean is not None:
        gray = (gray - mean) / std
    return gray


# ------------------------------------------------------------------ the 22 views
def anoclip_views(pixels, *, align_corners: bool = True, mean=None, std=None):
    """All 22 views of `pixels [B, H, W, 3]` -> `[22, B, H, W, 3]`, in VIEW_NAMES order (SPEC §4.4).

    `mean`/`std` only change the grayscale view (see `grayscale`); the default
    follows AnoVL. Images must be square (AnoCLIP uses 240 x 240), since the
    rot90 views keep the image size.
    """
    pixels = jnp.asarray(pixels)
    _, height, width, _ = pixels.shape
    if height != width:
        raise ValueError(f"anoclip_views needs square images, got {height}x{width}")
    warp = functools.partial(affine_sample, align_corners=align_corners)
    affine = jax.vmap(warp, in_axes=(None, 0))(pixels, _AFFINE_THETAS)  # [16, B, H, W, 3]
    others = [
        jnp.flip(pixels, axis=2),  # hflip: width axis
        grayscale(pixels, mean, std),
        *(jnp.rot90(pixels, k, axes=(1, 2)) for k in (1, 2, 3)),  # counter-clockwise
    ]
    return jnp.concatenate([pixels[None].astype(affine.dtype), affine,
                            jnp.stack(others).astype(affine.dtype)], axis=0)
