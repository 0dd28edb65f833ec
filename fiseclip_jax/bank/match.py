"""Matching new images against a reference bank, with the one matching core of `fiseclip_jax.matching`.

exact:   a(p) = mean of the k smallest d_j(p) = min_q ‖z(p) − z_j(q)‖ over the bank's usable images j
         (SPEC §4.2, §4.3 step 4), k = max(1, ⌊alpha·n⌋) of the n usable ones: for image x, the same
         function as batch scoring of bank ∪ {x}. Nearest distances are re-measured directly
         (`refine`), so near-duplicate patches keep float32 accuracy (the batch path's expansion
         ‖a‖² + ‖b‖² − 2a·b does not: up to 5e-4 per patch on MVTec bottle with a tiny CLIP).
coreset: a(p) = min_m ‖z(p) − m‖ over a fixed memory of M patch features per (r, layer), chosen by
         greedy k-center (PatchCore's coreset): time and memory independent of how many images built it.

Features are LNAMD(r) features per (r, layer), stored so: applying LNAMD to the bank on the fly
costs 0.3 (ViT-L/14@518, K=8) to 1.0 (ViT-B/16@224, K=32) times the matching itself on CPU
(benchmarks/online.py); storing it costs nR times the memory of the raw tokens.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax

from ..matching import _mean_smallest_k, _nearest_sq_dist, lnamd

_HIGHEST = lax.Precision.HIGHEST
REFINE = 4  # nearest candidates measured again exactly (`matching._nearest_sq_dist`): near-duplicate patches


def lnamd_stack(tokens, r_list):
    """[B, nL, P, W] matching tokens -> [B, nR, nL, P, W] LNAMD(r) features per radius and layer (SPEC §4.2)."""
    p = tokens.shape[2]
    grid = int(round(p ** 0.5))
    return jnp.stack([jnp.stack([lnamd(tokens[:, l], grid, r) for l in range(tokens.shape[1])], axis=1)
                      for r in r_list], axis=1)


def _per_rl(z):
    """[B, nR, nL, P, W] -> [nR·nL, B, P, W]: one matching step per (r, layer)."""
    b, n_r, n_l = z.shape[:3]
    return jnp.moveaxis(z.reshape((b, n_r * n_l) + z.shape[3:]), 1, 0)


def _mean_over_r_and_layers(scores, n_r, n_l):
    """[nR·nL, B, P] -> [B, P]: the mean over layers, then over r (the batch path's order)."""
    return jnp.mean(jnp.mean(scores.reshape((n_r, n_l) + scores.shape[1:]), axis=1), axis=0)


# ------------------------------------------------------------------ exact
def exact_scores(z, bank_z, bank_allowed, bank_valid, valid, *, alpha, chunk_size, exclude=None):
    """z [B, nR, nL, P, W] new images, bank_z [nR, nL, K, P, W], bank_allowed [K, P], bank_valid [K], valid [B],
    exclude [B] a slot each image may not use (its own, leave-one-out) -> ([B, P] patch scores against the bank,
    [B] usable references)."""
    chex.assert_rank([z, bank_z, bank_allowed], [5, 5, 2])
    chex.assert_equal(z.shape[1:3] + z.shape[4:], bank_z.shape[:2] + bank_z.shape[4:])  # r, layers, width
    n_r, n_l, k = bank_z.shape[:3]
    usable = bank_valid & jnp.any(bank_allowed, axis=1)
    pair_ok = valid[:, None] & usable[None, :]
    if exclude is not None:
        pair_ok = pair_ok & (jnp.arange(k)[None, :] != exclude[:, None])
    chunk = max(1, min(int(chunk_size), k))

    def one(args):
        queries, refs = args
        d2 = _nearest_sq_dist(queries, refs, bank_allowed, chunk, refine=REFINE)  # [B, P, K]
        return _mean_smallest_k(d2, pair_ok, alpha, max_refs=k).scores  # the image is not among the references

    scores = lax.map(one, (_per_rl(z), bank_z.reshape((n_r * n_l,) + bank_z.shape[2:])))
    return _mean_over_r_and_layers(scores, n_r, n_l), jnp.sum(pair_ok, axis=1).astype(jnp.int32)


def exact_leave_one_out(bank_z, allowed, valid, *, alpha, chunk_size):
    """bank_z [nR, nL, K, P, W]: each of the bank's images against the others (batch mutual scoring of the bank,
    SPEC §4.2), one image at a time with the code that scores new images -> ([K, P], [K])."""
    def one(j):
        zj = bank_z[:, :, j][None]  # [1, nR, nL, P, W]
        out = exact_scores(zj, bank_z, allowed, valid, valid[j][None], alpha=alpha, chunk_size=chunk_size,
                           exclude=j[None])
        return jax.tree.map(lambda a: a[0], out)

    return lax.map(one, jnp.arange(bank_z.shape[2]))


# ------------------------------------------------------------------ coreset
def _groups(memory, ok, size):
    """[M, W], [M] -> [G, size, W], [G, size]: the memory as G reference "images" for `_nearest_sq_dist`."""
    pad = (-memory.shape[0]) % size
    memory = jnp.pad(memory, ((0, pad), (0, 0)))
    ok = jnp.pad(ok, (0, pad))
    return memory.reshape(-1, size, memory.shape[-1]), ok.reshape(-1, size)


def coreset_scores(z, memory, memory_ok, source, exclude, n_images, valid, *, chunk_size):
    """z [B, nR, nL, P, W], memory [nR, nL, M, W], memory_ok / source [nR, nL, M], exclude [B] the image number whose
    entries each new image may not use (its own, leave-one-out; -1: none), n_images [B] images behind the memory
    -> ([B, P] nearest-neighbour distance, mean over layers then r; [B] references: n_images, 0 if none usable)."""
    chex.assert_rank([z, memory, memory_ok, source], [5, 4, 3, 3])
    chex.assert_equal(z.shape[1:3] + z.shape[4:], memory.shape[:2] + memory.shape[3:])
    n_r, n_l, m, w = memory.shape
    p = z.shape[3]

    def one(args):
        queries, mem, mem_ok, src = args
        allowed = mem_ok[None, :] & (src[None, :] != exclude[:, None])  # [B, M]

        def nearest(zi, ok_i):
            refs, refs_ok = _groups(mem, ok_i, min(m, p))  # groups of P entries: no padding when M < P
            chunk = max(1, min(int(chunk_size), refs.shape[0]))
            d2 = _nearest_sq_dist(zi[None], refs, refs_ok, chunk, refine=REFINE)[0]  # [P, G]
            return jnp.sqrt(jnp.min(d2, axis=-1))

        has = jnp.any(allowed, axis=1)
        return jnp.where(has[:, None], jax.vmap(nearest)(queries, allowed), 0.0), has

    flat = lambda a: a.reshape((n_r * n_l,) + a.shape[2:])  # noqa: E731
    scores, has = lax.map(one, (_per_rl(z), flat(memory), flat(memory_ok), flat(source)))
    num_refs = jnp.where(has[-1] & valid, n_images, 0).astype(jnp.int32)
    return _mean_over_r_and_layers(scores, n_r, n_l) * valid[:, None], num_refs


@functools.partial(jax.jit, static_argnames=("m", "dim"))
def greedy_kcenter(points, ok, m: int, dim: int = 128):
    """[N, W] candidates, [N] bool -> (indices [m] int32, picked [m] bool): PatchCore's greedy coreset.

    The first ok point, then always the ok point farthest from those picked (k-center). Distances
    for the choice are taken after a fixed Gaussian projection to `dim` dimensions (0: none; a
    Johnson–Lindenstrauss projection, as PatchCore does); `picked` is False once no point is left.
    """
    x = jnp.asarray(points, jnp.float32)
    n, w = x.shape
    if dim and dim < w:
        proj = jax.random.normal(jax.random.key(0), (w, dim), jnp.float32) / jnp.sqrt(float(dim))
        x = jnp.dot(x, proj, precision=_HIGHEST)
    sq = jnp.sum(x * x, axis=-1)

    def body(i, state):
        min_d, taken, idx, picked = state
        gap = jnp.where(ok & ~taken, min_d, -jnp.inf)
        j = jnp.argmax(gap)
        good = gap[j] > -jnp.inf
        d = jnp.maximum(sq + sq[j] - 2.0 * jnp.dot(x, x[j], precision=_HIGHEST), 0.0)
        min_d = jnp.where(good, jnp.minimum(min_d, d), min_d)
        return min_d, taken.at[j].set(taken[j] | good), idx.at[i].set(j), picked.at[i].set(good)

    init = (jnp.full(n, jnp.inf), jnp.zeros(n, bool), jnp.zeros(m, jnp.int32), jnp.zeros(m, bool))
    _, _, idx, picked = lax.fori_loop(0, m, body, init)
    return idx, picked


def select_memory(pool, pool_ok, pool_source, m: int, dim: int):
    """pool [nR, nL, N, W], pool_ok / pool_source [nR, nL, N] -> memory [nR, nL, m, W], memory_ok [nR, nL, m],
    source [nR, nL, m] (-1 where nothing was picked): one greedy coreset per (r, layer)."""
    n_r, n_l = pool.shape[:2]

    def one(args):
        points, ok, src = args
        idx, picked = greedy_kcenter(points, ok, m, dim)
        return points[idx], picked, jnp.where(picked, src[idx], -1).astype(jnp.int32)

    flat = lambda a: a.reshape((n_r * n_l,) + a.shape[2:])  # noqa: E731
    out = lax.map(one, (flat(pool), flat(pool_ok), flat(pool_source)))
    return tuple(a.reshape((n_r, n_l) + a.shape[1:]) for a in out)
