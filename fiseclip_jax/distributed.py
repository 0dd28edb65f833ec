"""Scale-out on JAX's own SPMD: meshes, placement, sharded encoding (SPEC §4.2–4.3).

Images are split along a mesh axis over every device of every process; parameters are
replicated. Matching on a mesh is `ring.ring_mutual_scores` (re-exported here), which computes
exactly `matching.mutual_scores` while each device keeps only its own query images.

Every function takes a `jax.sharding.Mesh`; all its axes together form the batch axis, so a
1-D mesh from `make_mesh` and a (hosts, local devices) mesh both work. In several processes
(`initialize_distributed`), every process runs the same program on the same global inputs:
`shard_batch` / `replicate` turn host arrays into global arrays, `to_host` brings results back.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .matching import MutualScores
from .ring import _axes, ring_mutual_scores
from .errors import FiseclipError


# ------------------------------------------------------------------ meshes and placement
def make_mesh(num_devices: int | None = None, axis: str = "batch", *, devices: Sequence | None = None) -> Mesh:
    """1-D mesh named `axis` over the first `num_devices` of `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise FiseclipError(f"num_devices must be in 1..{len(devices)}, got {num_devices}")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (axis,))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids=None,
                           initialization_timeout: int = 300, **kwargs) -> tuple[int, int]:
    """Join a multi-process run (thin wrapper over `jax.distributed.initialize`): (process_index, count).

    Call before any other JAX call. With no arguments the cluster (SLURM, TPU, ...) is
    auto-detected. A no-op when already initialised. On CPU, cross-process collectives use
    gloo; the number of local CPU devices comes from XLA_FLAGS / `jax_num_cpu_devices`.
    """
    if not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=initialization_timeout, **kwargs)
    return jax.process_index(), jax.process_count()


def _put(x, sharding):
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if jax.process_count() == 1:
        return jax.device_put(np.asarray(x), sharding)
    # Several processes: every process holds the same host array and places its own shards.
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(tree, mesh: Mesh):
    """Place every leaf split along its leading axis over all devices of `mesh` (a multiple of mesh.size)."""
    sharding = NamedSharding(mesh, P(_axes(mesh)))

    def put(x):
        if np.shape(x)[0] % mesh.size:
            raise FiseclipError(f"leading axis {np.shape(x)[0]} is not a multiple of the {mesh.size} devices; "
                             "pad it first (pad_batch)")
        return _put(x, sharding)

    return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
    """Place every leaf whole on every device of `mesh` (no copy when it is already there)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def pad_batch(x, multiple: int):
    """[N, ...] -> ([N_pad, ...] zero-padded to a multiple of `multiple`, [N_pad] bool valid)."""
    n = np.shape(x)[0]
    pad = (-n) % multiple
    valid = np.arange(n + pad) < n
    if pad:
        widths = [(0, pad)] + [(0, 0)] * (np.ndim(x) - 1)
        x = jnp.pad(x, widths) if isinstance(x, jax.Array) else np.pad(np.asarray(x), widths)
    return x, valid


def _onto(tree, mesh: Mesh, split: bool):
    """Leaves committed to devices other than the mesh's moved onto it: whole on every device, or
    (split) batch-split where the leading axis divides evenly.

    A jitted computation cannot mix arrays on one device with a shard_map over several.
    """
    devices = set(mesh.devices.flat)

    def move(x):
        if not isinstance(x, jax.Array) or set(x.sharding.device_set) == devices:
            return x
        if split and x.ndim and x.shape[0] % mesh.size == 0:
            return _put(x, NamedSharding(mesh, P(_axes(mesh))))
        return _put(x, NamedSharding(mesh, P()))

    return jax.tree.map(move, tree)


def to_host(tree):
    """Every leaf as a numpy array of its global value, on every process (allgather when needed)."""
    from jax.experimental import multihost_utils

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_shards[0].data)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


# ------------------------------------------------------------------ sharded encoding
@functools.lru_cache(maxsize=32)
def _encode_fn(cfg, method, mesh: Mesh, n: int | None):
    spec = P(_axes(mesh))
    local = jax.shard_map(lambda prm, px: method.encode(prm, cfg, px), mesh=mesh, in_specs=(P(), spec),
                          out_specs=spec)

    def run(params, pixels):
        feats = local(params, pixels)
        return feats if n is None else jax.tree.map(lambda v: v[:n], feats)

    return jax.jit(run)


def sharded_encode_features(params, cfg, pixels, method, mesh: Mesh, *, return_valid: bool = False):
    """[N, S, S, 3] -> `method.encode`'s features (batch-first leaves), the images split over `mesh`,
    parameters replicated.

    N is zero-padded up to a multiple of mesh.size. Default: the padding is cut off, so the
    result has the shapes of `method.encode`. `return_valid=True`: (features with N_pad rows,
    still sharded, [N_pad] bool valid) — ready for `ring_mutual_scores` without re-layout.
    When N needed padding, the un-padded result is replicated (a jax.Array cannot split an axis
    unevenly); the padded one stays split. Replicate `params` once beforehand (`replicate`, or
    `load_clip(sharding=NamedSharding(mesh, P()))`): parameters elsewhere are copied every call.
    """
    n = np.shape(pixels)[0]
    pixels, valid = pad_batch(pixels, mesh.size)
    pixels = shard_batch(pixels, mesh)
    unpad = None if return_valid or n == valid.size else n
    feats = _encode_fn(cfg, method, mesh, unpad)(_onto(params, mesh, split=False), pixels)
    if return_valid:
        return feats, shard_batch(valid, mesh)
    return feats


_ring_jit = jax.jit(ring_mutual_scores, static_argnames=("mesh", "alpha", "chunk_size"))


def ring_mutual_scores_jit(features, allowed=None, valid=None, *, mesh: Mesh, alpha: float = 0.3,
                           chunk_size: int = 8) -> MutualScores:
    """Jitted `ring_mutual_scores`; inputs committed to other devices are first moved onto `mesh`."""
    features, allowed, valid = _onto((features, allowed, valid), mesh, split=True)
    return _ring_jit(features, allowed, valid, mesh=mesh, alpha=alpha, chunk_size=chunk_size)
