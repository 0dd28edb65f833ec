"""Ring-passed mutual matching: `matching.mutual_scores` with the images split over a device mesh
(SPEC §4.2, §4.3 steps 3–4).

Each device keeps only its own query images and passes reference blocks around the device ring
with `lax.ppermute`: it holds its queries, the block it is matching, the block arriving, and its
[N_local, P, N] table of d_j(p), from which the mean of the k smallest is taken as on one device.
All axes of the mesh together form the batch axis. Placement helpers live in `distributed`.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from .matching import MutualScores, _mean_smallest_k, _nearest_sq_dist


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def _ring_local(z, ok, v, *, axes, num_shards: int, alpha: float, chunk: int):
    """Per device: [b, P, C], [b, P], [b] own images -> MutualScores([b, P], [b]) over all N = num_shards·b."""
    b, p, _ = z.shape
    n = num_shards * b
    me = lax.axis_index(axes)
    usable = v & jnp.any(ok, axis=1)  # [b] this block's images that can serve as references
    perm = [(i, (i + 1) % num_shards) for i in range(num_shards)]

    def match(s, ref, table, usable_all):
        ref_z, ref_ok, ref_usable = ref
        src = (me - s) % num_shards  # the block held at step s started on device me - s
        d2 = _nearest_sq_dist(z, ref_z, ref_ok, chunk)  # [b, P, b]
        table = lax.dynamic_update_slice(table, d2, (0, 0, src * b))
        usable_all = lax.dynamic_update_slice(usable_all, ref_usable, (src * b,))
        return table, usable_all

    def step(s, carry):
        ref, table, usable_all = carry
        incoming = lax.ppermute(ref, axes, perm)  # sent while this block is matched
        table, usable_all = match(s, ref, table, usable_all)
        return incoming, table, usable_all

    table = lax.pcast(jnp.zeros((b, p, n), jnp.float32), axes, to="varying")
    usable_all = lax.pcast(jnp.zeros((n,), bool), axes, to="varying")
    ref = (z, ok, usable)
    ref, table, usable_all = lax.fori_loop(0, num_shards - 1, step, (ref, table, usable_all))
    table, usable_all = match(num_shards - 1, ref, table, usable_all)

    own = me * b + jnp.arange(b)  # global indices of this device's queries
    pair_ok = v[:, None] & usable_all[None, :] & (own[:, None] != jnp.arange(n)[None, :])
    return _mean_smallest_k(table, pair_ok, alpha)


def ring_mutual_scores(features, allowed=None, valid=None, *, mesh: Mesh, alpha: float = 0.3,
                       chunk_size: int = 8) -> MutualScores:
    """`matching.mutual_scores` with the images split over `mesh` (SPEC §4.2, §4.3 steps 3–4).

    [N, P, C], [N, P] bool, [N] bool -> MutualScores([N, P], [N]). N is padded up to a
    multiple of mesh.size with invalid rows (which neither query nor serve as references).
    Each device matches its N/D queries against one block of N/D references at a time
    (chunked by `chunk_size` images), while the next block arrives over `ppermute`; after D
    steps it holds d_j(p) for every reference j and applies the k = max(1, ⌊alpha·n_i⌋) rule.
    Pure and jit-able (`mesh`, `alpha`, `chunk_size` static); `distributed.ring_mutual_scores_jit` is jitted.
    Peak memory per device ≈ (N/D)·P·chunk·P + (N/D)·P·N float32.
    """
    features = jnp.asarray(features, jnp.float32)
    chex.assert_rank(features, 3)
    n, p, _ = features.shape
    allowed = jnp.ones((n, p), bool) if allowed is None else jnp.asarray(allowed, bool)
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    d = mesh.size
    pad = (-n) % d
    if pad:
        features = jnp.pad(features, ((0, pad), (0, 0), (0, 0)))
        allowed = jnp.pad(allowed, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    b = (n + pad) // d
    axes = _axes(mesh)
    spec = P(axes)
    body = functools.partial(_ring_local, axes=axes, num_shards=d, alpha=alpha,
                             chunk=max(1, min(int(chunk_size), b)))
    out = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(features, allowed, valid)
    return MutualScores(out.scores[:n], out.num_refs[:n]) if pad else out
