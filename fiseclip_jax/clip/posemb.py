"""Position-embedding resize for inputs larger or smaller than the native grid (SPEC §1)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's `interpolate(mode="bicubic", align_corners=False)`.

    Cubic convolution with A = -0.75, source coordinate (dst + 0.5) * in/out - 0.5,
    taps clamped to the border. This is the kernel transformers and OpenCLIP use to
    resize CLIP's position grid; `jax.image.resize("cubic")` uses A = -0.5 and
    antialiasing and does not match.
    """
    a = -0.75

    def w_near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def w_far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        weights = (w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t))
        for tap, w in zip(range(i0 - 1, i0 + 3), weights):
            m[o, min(max(tap, 0), in_size - 1)] += w
    return m.astype(np.float32)


def resize_pos_embed(pos_embed, grid: int, new_grid: int):
    """[1 + g*g, W] -> [1 + n*n, W]; the CLS row is kept, the grid resized bicubically."""
    if new_grid == grid:
        return pos_embed
    cls, patch = pos_embed[:1], pos_embed[1:].reshape(grid, grid, -1)
    m = jnp.asarray(bicubic_matrix(grid, new_grid))
    patch = jnp.einsum("oi,ijc->ojc", m, patch, precision="highest")
    patch = jnp.einsum("pj,ojc->opc", m, patch, precision="highest")
    return jnp.concatenate([cls, patch.reshape(new_grid * new_grid, -1)], axis=0)
