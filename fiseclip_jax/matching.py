"""Mutual nearest-neighbour scoring shared by MuSc and FiSeCLIP, and LNAMD (SPEC §4.2, §4.3).

`mutual_scores` is the one matching core: MuSc calls it on a whole category
with every patch allowed; FiSeCLIP calls it on a test batch with the
text-filtered reference patches of §4.3 step 3 as `allowed`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


class MutualScores(NamedTuple):
    """scores [N, P] float32 patch scores; num_refs [N] int32 usable references per image."""

    scores: jax.Array
    num_refs: jax.Array


def _k_table(n_max: int, alpha: float) -> np.ndarray:
    """[n_max + 1] int32: k(n) = max(1, int(alpha * n)) clipped to n (SPEC §4.2, §8 guard)."""
    # Python float arithmetic, as MuSc's `int(n_refs * 0.3)`; the guard fixes its N < 5 NaN.
    return np.array([min(max(1, int(alpha * n)), max(n, 1)) for n in range(n_max + 1)], np.int32)


def _nearest_sq_dist(queries, refs, ref_allowed, chunk_size, refine: int = 0):
    """[Nq, P, C], [Nr, Q, C], [Nr, Q] -> [Nq, P, Nr] min over allowed q of ‖z_i(p) − z_j(q)‖², chunked on j.

    Q may differ from P (a reference bank's coreset memory is matched as groups of Q entries).
    refine > 0: the `refine` nearest candidates found by the expansion below are measured again as
    ‖a − b‖² directly. The expansion loses ~1e-6 absolute to cancellation, which the square root
    turns into ~5e-4 for near-duplicate patches (MVTec bottle's background, a tiny CLIP); the
    re-measured distance is exact to float32 rounding of the difference.
    """
    n, q, c = refs.shape
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n
    sq = jnp.sum(queries * queries, axis=-1)  # [Nq, P]
    ref_sq = jnp.sum(refs * refs, axis=-1)  # [Nr, Q]
    ref_z = jnp.pad(refs, ((0, pad), (0, 0), (0, 0))).reshape(n_chunks, chunk_size, q, c)
    ref_sq = jnp.pad(ref_sq, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, q)
    ref_ok = jnp.pad(ref_allowed, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, q)
    t = min(int(refine), q)

    def body(carry, xs):
        z_ref, z_ref_sq, ok = xs  # [chunk, Q, C], [chunk, Q], [chunk, Q]
        # ‖a‖² + ‖b‖² − 2a·b, peak memory Nq·P·chunk·Q (SPEC §4.2).
        dots = jnp.einsum("npc,mqc->npmq", queries, z_ref, precision=_HIGHEST)
        d2 = sq[:, :, None, None] + z_ref_sq[None, None] - 2.0 * dots
        d2 = jnp.where(ok[None, None], jnp.maximum(d2, 0.0), jnp.inf)
        if not t:
            return carry, jnp.min(d2, axis=-1)  # [Nq, P, chunk]
        near, idx = lax.top_k(-d2, t)  # [Nq, P, chunk, t] candidates
        cand = z_ref[jnp.arange(chunk_size)[None, None, :, None], idx]  # [Nq, P, chunk, t, C]
        exact = jnp.sum(jnp.square(queries[:, :, None, None, :] - cand), axis=-1)
        return carry, jnp.min(jnp.where(jnp.isfinite(near), exact, jnp.inf), axis=-1)

    _, mins = lax.scan(body, None, (ref_z, ref_sq, ref_ok))  # [n_chunks, Nq, P, chunk]
    mins = jnp.moveaxis(mins, 0, 2).reshape(queries.shape[0], queries.shape[1], n_chunks * chunk_size)
    return mins[:, :, :n]


def _mean_smallest_k(d2, pair_ok, alpha: float, max_refs=None) -> MutualScores:
    """[Nq, P, Nr] squared distances, [Nq, Nr] usable pairs -> mean of the k_i smallest distances.

    k_i = max(1, ⌊alpha·n_i⌋) with n_i the usable references of query i (SPEC §4.2); rows
    with n_i = 0 score 0. `max_refs` bounds n_i: Nr - 1 (default: the query is one of the
    references and never its own) or Nr (queries scored against a reference bank). Shared by
    `mutual_scores`, the ring of `distributed` and the reference bank.
    """
    num_refs = jnp.sum(pair_ok, axis=1).astype(jnp.int32)
    n_max = d2.shape[-1] - 1 if max_refs is None else max_refs
    k_table = _k_table(max(n_max, 0), alpha)
    k = jnp.asarray(k_table)[num_refs]  # [Nq]
    k_max = int(k_table.max())
    # Smallest k_max distances per (i, p); excluded pairs are +inf so they sort last.
    d2 = jnp.where(pair_ok[:, None, :], d2, jnp.inf)
    smallest = -lax.top_k(-d2, k_max)[0]  # [Nq, P, k_max] ascending
    take = jnp.arange(k_max)[None, :] < k[:, None]  # [Nq, k_max]
    take = take & (num_refs > 0)[:, None]
    dist = jnp.sqrt(jnp.where(take[:, None, :], smallest, 0.0))
    scores = jnp.sum(dist, axis=-1) / k[:, None].astype(jnp.float32)
    return MutualScores(scores.astype(jnp.float32), num_refs)


def mutual_scores(features, allowed=None, valid=None, *, alpha: float = 0.3,
                  chunk_size: int = 8) -> MutualScores:
    """[N, P, C], [N, P] bool, [N] bool -> MutualScores([N, P], [N]) (SPEC §4.2, §4.3 steps 3–4).

    a_i(p) = mean of the k_i smallest d_j(p) = min_{q allowed in j} ‖z_i(p) − z_j(q)‖ over the
    usable references j ≠ i (valid, at least one allowed patch), k_i = max(1, ⌊alpha·n_i⌋).
    Images with no usable reference (and padding rows) score 0 with num_refs 0.
    `alpha` and `chunk_size` are static under jit. Peak memory ≈ N·P·chunk_size·P float32
    (scan over reference chunks) plus the [N, P, N] table of d_j.
    """
    features = jnp.asarray(features, jnp.float32)
    n, p, _ = features.shape
    allowed = jnp.ones((n, p), bool) if allowed is None else jnp.asarray(allowed, bool)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    chunk = max(1, min(int(chunk_size), n))

    d2 = _nearest_sq_dist(features, features, allowed, chunk)  # [N, P, N]
    usable_ref = valid & jnp.any(allowed, axis=1)  # [N]
    pair_ok = valid[:, None] & usable_ref[None, :] & ~jnp.eye(n, dtype=bool)  # [i, j]
    return _mean_smallest_k(d2, pair_ok, alpha)


mutual_scores_jit = jax.jit(mutual_scores, static_argnames=("alpha", "chunk_size"))


def lnamd(tokens, grid, r: int):
    """[N, P, C] patch tokens (row-major grid, CLS dropped) -> [N, P, C] LNAMD(r) features (SPEC §4.2).

    LayerNorm over each image's whole [C, H, W] map (no affine, eps 1e-5), per-channel r×r
    mean filter with zero padding counted (avg_pool2d count_include_pad=True), then L2 norm.
    `grid` is an int (square) or (H, W); `r` must be odd and is static.
    """
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD r must be a positive odd integer, got {r}")
    tokens = jnp.asarray(tokens, jnp.float32)
    n, p, c = tokens.shape
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if h * w != p:
        raise ValueError(f"grid {h}x{w} does not match {p} patches")
    x = tokens.reshape(n, h, w, c)
    # LayerNorm([C, H, W]) freshly built in MuSc: weight 1, bias 0, biased variance.
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * lax.rsqrt(var + 1e-5)
    if r > 1:
        pad = r // 2
        x = lax.reduce_window(x, 0.0, lax.add, (1, r, r, 1), (1, 1, 1, 1),
                              ((0, 0), (pad, pad), (pad, pad), (0, 0))) / float(r * r)
    x = x.reshape(n, p, c)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, 1e-12)
