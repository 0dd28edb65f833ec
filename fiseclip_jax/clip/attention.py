"""The attention kernel: the one place where CLIP's attention arithmetic happens (SPEC §2).

Every SPEC §2 mode is a sum of calls to `attend` over different (a, b) pairs:
standard qk = attend(q, k, v); vv = attend(v, v, v); qq = attend(q, q, v);
qq+kk = attend(q, q, v) + attend(k, k, v); identity = v (no call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend(a, b, v, *, scale: float, causal: bool = False):
    """softmax(a·bᵀ·scale [+ causal mask]) v per head: a, b, v [B, T, H, dh] -> [B, T, H, dh].

    The logits and the softmax are float32 whatever the input dtype (SPEC §1 dtype policy);
    the weighted sum runs in v's dtype.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", a, b, preferred_element_type=jnp.float32) * scale
    if causal:  # the text tower: token t sees tokens <= t
        t = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
