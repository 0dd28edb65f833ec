"""RsCIN: re-scoring image scores over a category's CLS-embedding neighbours (SPEC §4.2 "RsCIN")."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .postprocess import minmax_normalise

_HIGHEST = lax.Precision.HIGHEST


def rscin(scores, cls_embeds, k_list=(1, 2, 3), valid=None):
    """[N] image scores, [N, D] CLS embeddings, [N] bool -> [N] re-scored image scores (SPEC §4.2).

    s = min-max(scores) over the category (zeros if all equal); W = G Gᵀ with G the
    L2-normalised embeddings; per k keep the k largest entries of each row (self included),
    row-normalise to P_k, S_k = P_k s; return mean over k. `k_list` is static (MVTec (1, 2, 3),
    VisA (1, 8, 9)); k is clipped to N. Padding entries (valid False) are never neighbours
    and return 0.
    """
    scores = jnp.asarray(scores, jnp.float32)
    g = jnp.asarray(cls_embeds, jnp.float32)
    n = scores.shape[0]
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool)
    s = minmax_normalise(scores, valid=valid)
    g = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("nd,md->nm", g, g, precision=_HIGHEST)  # [N, N]
    pair_ok = valid[:, None] & valid[None, :]
    ranked = jnp.where(pair_ok, sim, -jnp.inf)
    out = []
    for k in k_list:
        k = max(1, min(int(k), n))
        # Exactly k kept per row, as MuSc's topk; ties broken by lower index.
        idx = lax.top_k(ranked, k)[1]  # [N, k]
        keep = pair_ok & jnp.any(idx[:, :, None] == jnp.arange(n)[None, None, :], axis=1)
        w = jnp.where(keep, sim, 0.0)
        row = jnp.sum(w, axis=1, keepdims=True)
        p = w / jnp.where(row != 0, row, 1.0)
        out.append(jnp.einsum("nm,m->n", p, s, precision=_HIGHEST))
    return jnp.where(valid, jnp.mean(jnp.stack(out), axis=0), 0.0)
