"""Anomaly-map post-processing: bilinear upsampling, Gaussian blur, mean filter, min-max (SPEC §4.3, §4.4, §5).

All functions act on the last two axes of `maps [..., h, w]`, are pure JAX and
jit-able; sizes, sigmas and modes are static Python values. Interpolation and
blur operators are built once in numpy from those static values, so they match
the torch / scipy references exactly rather than approximately.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------ bilinear
def _bilinear_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
    """[n_out, n_in] float32 1-D linear interpolation, torch `upsample_bilinear2d` index rules."""
    # float32 arithmetic as torch's CPU kernel (opmath float for float32 maps).
    dst = np.arange(n_out, dtype=np.float32)
    if align_corners:
        scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0.0)
        src = scale * dst
    else:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = i0 + (i0 < n_in - 1)
    lam1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    lam0 = np.float32(1.0) - lam1
    mat = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(mat, (rows, i0), lam0)
    np.add.at(mat, (rows, i1), lam1)
    return mat


def upsample_bilinear(maps, size, align_corners: bool = True):
    """[..., h, w] -> [..., H, W] bilinear, equal to torch F.interpolate(mode="bilinear") (SPEC §5).

    `size` is an int (square) or (H, W). No antialiasing. Default align_corners=True because
    both reference implementations use it for their maps: MuSc (xrli-U/MuSc, models/musc.py,
    `F.interpolate(..., mode='bilinear', align_corners=True)`) and AnoVL / AnoCLIP
    (hq-deng/AnoVL, vl_test.py, same call after the 3×3 replicate mean filter).
    """
    maps = jnp.asarray(maps, jnp.float32)
    h, w = maps.shape[-2:]
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    ry = jnp.asarray(_bilinear_matrix(h, out_h, align_corners))
    rx = jnp.asarray(_bilinear_matrix(w, out_w, align_corners))
    return jnp.einsum("Hh,...hw,Ww->...HW", ry, maps, rx, precision=_HIGHEST)


# ------------------------------------------------------------------ gaussian
def _reflect_index(n: int, pad: int) -> np.ndarray:
    """[n + 2 pad] indices of scipy.ndimage mode "reflect" (d c b a | a b c d | d c b a), any pad."""
    k = np.arange(-pad, n + pad) % (2 * n)
    return np.where(k < n, k, 2 * n - 1 - k)


def _correlate_last(x, weights: np.ndarray, index: np.ndarray):
    """[..., n] -> [..., n] 1-D correlation with `weights` over x gathered at `index`."""
    n = x.shape[-1]
    padded = jnp.take(x, jnp.asarray(index), axis=-1)
    out = jnp.zeros_like(x)
    for t, wt in enumerate(weights):
        out = out + np.float32(wt) * padded[..., t:t + n]
    return out


def gaussian_blur(maps, sigma: float = 4.0, truncate: float = 4.0):
    """[..., H, W] -> [..., H, W] = scipy.ndimage.gaussian_filter(map, sigma, truncate) per map (SPEC §4.3.6).

    Separable, mode "reflect" (scipy's default, as used by the reference repositories),
    radius int(truncate·sigma + 0.5). sigma <= 0 is the identity.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if sigma <= 0:
        return maps
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 / float(sigma) ** 2 * x * x)
    kernel = kernel / kernel.sum()
    h, w = maps.shape[-2:]
    out = _correlate_last(maps, kernel, _reflect_index(w, radius))
    out = jnp.swapaxes(_correlate_last(jnp.swapaxes(out, -1, -2), kernel, _reflect_index(h, radius)), -1, -2)
    return out


# ------------------------------------------------------------------ mean filter
def mean_filter(maps, size: int = 3, padding: str = "replicate"):
    """[..., h, w] -> [..., h, w] size×size box mean, stride 1 (SPEC §4.4).

    padding "replicate": edge values (AnoVL's pad(1, 'replicate') + avg_pool2d(3)); "zero":
    zero padding counted in the mean (avg_pool2d count_include_pad=True). `size` must be odd.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"mean_filter size must be a positive odd integer, got {size}")
    if padding not in ("replicate", "zero"):
        raise ValueError(f"padding must be 'replicate' or 'zero', got {padding!r}")
    maps = jnp.asarray(maps, jnp.float32)
    pad = size // 2
    widths = [(0, 0)] * (maps.ndim - 2) + [(pad, pad), (pad, pad)]
    padded = jnp.pad(maps, widths, mode="edge" if padding == "replicate" else "constant")
    window = (1,) * (maps.ndim - 2) + (size, size)
    summed = lax.reduce_window(padded, 0.0, lax.add, window, (1,) * maps.ndim, "VALID")
    return summed / float(size * size)


# ------------------------------------------------------------------ min-max
def minmax_normalise(x, axis=None, valid=None):
    """[N, ...] -> [N, ...] (x − min)/(max − min) over `axis`; zeros where max == min.

    `valid [N]` bool excludes padding rows of the leading axis from min and max; their
    outputs are 0. `axis` None (all), an int or a tuple, static.
    """
    x = jnp.asarray(x, jnp.float32)
    if valid is None:
        mask = jnp.ones(x.shape, bool)
    else:
        valid = jnp.asarray(valid, bool)
        mask = jnp.broadcast_to(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x.shape)
    lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, keepdims=True)
    hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
    span = hi - lo
    ok = jnp.isfinite(span) & (span > 0)
    lo = jnp.where(ok, lo, 0.0)
    out = jnp.where(ok, (x - lo) / jnp.where(ok, span, 1.0), 0.0)
    return jnp.where(mask, out, 0.0)
