"""A fingerprint of CLIP weights, recorded in a bank so that loading it against other weights is refused."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def weights_fingerprint(params, sample: int = 64) -> str:
    """A short hash of a parameter tree: its structure, every leaf's shape and dtype, and a strided sample of
    each leaf's values (layout-agnostic: no leaf is looked up by path)."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree.flatten(params)
    h.update(str(treedef).encode())
    for leaf in leaves:
        a = jnp.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        flat = a.reshape(-1)
        step = max(1, flat.size // sample)
        h.update(np.ascontiguousarray(np.asarray(flat[::step][:sample])).tobytes())
    return h.hexdigest()[:20]
