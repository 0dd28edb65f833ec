"""Scaled dot-product attention for the CLIP towers (SPEC §1, §2).

One pure function serves every attention pair of SPEC §2: `attend(q, k, v)`
(standard), `attend(v, v, v)` (vv), `attend(q, q, v)` (qq) and the sum of two
calls (qq+kk), plus the causal text tower.

Results equal the plain formula softmax(a bᵀ s) v to float32 rounding on every
backend. On CPU the arithmetic is arranged for XLA's CPU backend, which runs
the dots and the row reductions of softmax as YNNPACK kernels and the exp as
its own loop (benchmarks/attention.py measures each choice):

- keys are taken in chunks: each chunk gives its row maxima, sums and
  unnormalised output, combined exactly afterwards (the usual two-level
  softmax). Up to `DIRECT_MAX_TOKENS` rows are at most `KEY_CHUNK` long (one
  pass over all heads: about 2x slower per logit at T=257 than at T=256);
  beyond, at least `BLOCK_KEY_CHUNKS` chunks of at most `BLOCK_KEY_CHUNK`
  (3 chunks were faster than 2 at T=577 and 1025, than 5 at
  T=1025, and than 4 and 6 at T=1370);
- for T > `DIRECT_MAX_TOKENS` one head of one image is visited at a time
  (`lax.fori_loop`), its queries in chunks when its float32 logits exceed
  `BLOCK_BYTES`, sliced straight out of the [B, T, H, d] projections and
  written back in place: no [B, H, T, d] copies and the [B, H, T, T] logits
  never live at once. `python benchmarks/attention.py --shapes 8x1025x12`:
  155 ms, against 216 ms for the previous arrangement (blocks of heads
  gathered by `lax.map` from [B*H, T, d] copies, 4 MB blocks, 256-key
  chunks); PyTorch's fused SDPA kernel took 108 ms.

Other backends run the plain formula, which their compilers fuse themselves.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

KEY_CHUNK = 256  # longest softmax row handed to one fused kernel on CPU
DIRECT_MAX_TOKENS = 512  # up to here all heads go through one fused kernel
BLOCK_BYTES = 8 << 20  # beyond DIRECT_MAX_TOKENS: float32 logits of one head, at most
BLOCK_KEY_CHUNKS = 3  # beyond DIRECT_MAX_TOKENS: keys in at least this many equal chunks ...
BLOCK_KEY_CHUNK = 512  # ... of at most this many keys


def _masked(logits, queries, keys, causal):
    """Causal mask from absolute positions: query i sees keys 0..i."""
    if not causal:
        return logits
    return jnp.where(queries[:, None] >= keys[None, :], logits, jnp.finfo(logits.dtype).min)


def _softmax_pv(a, b, v, queries, *, causal, key_chunk):
    """softmax(a bᵀ) v: [g, q, d] x [g, k, d] -> [g, q, d], `a` pre-scaled.

    queries: [q] absolute positions of a's rows (for the causal mask). The
    keys are split into equal chunks of <= key_chunk; each chunk gives its row
    maximum m_j, sum s_j of exp(logit - m_j) and unnormalised output o_j, and
    softmax·v = Σ_j e^(m_j - M) o_j / Σ_j e^(m_j - M) s_j with M = max_j m_j.
    Normalising the [q, d] output instead of the [q, k] weights also saves a
    pass over the logits.
    """
    tokens = b.shape[1]
    n_chunks = -(-tokens // key_chunk)
    size = -(-tokens // n_chunks)
    parts = []
    for start in range(0, tokens, size):
        keys = jnp.arange(start, min(tokens, start + size))
        logits = jnp.einsum("gqd,gkd->gqk", a, b[:, start:start + size], preferred_element_type=jnp.float32)
        logits = _masked(logits, queries, keys, causal)
        peak = logits.max(-1, keepdims=True)
        weights = jnp.exp(logits - peak)  # float32 whatever the compute dtype (SPEC §1 dtype policy)
        parts.append((peak, weights.sum(-1, keepdims=True),
                      jnp.einsum("gqk,gkd->gqd", weights.astype(v.dtype), v[:, start:start + size],
                                 preferred_element_type=jnp.float32)))
    if len(parts) == 1:
        _, total, out = parts[0]
        return (out / total).astype(v.dtype)
    top = functools.reduce(jnp.maximum, [peak for peak, _, _ in parts])
    # A chunk that is wholly masked for a row has peak = finfo.min, so its factor is exactly 0.
    factors = [jnp.exp(peak - top) for peak, _, _ in parts]
    out = sum(o * c for (_, _, o), c in zip(parts, factors))
    total = sum(s * c for (_, s, _), c in zip(parts, factors))
    return (out / total).astype(v.dtype)


def _query_chunk(tokens: int, block_bytes: int) -> int:
    """Queries per block: all of them, unless one head's float32 [T, T] logits exceed
    `block_bytes`; then near-equal chunks of them."""
    per_head = 4 * tokens * tokens
    if per_head <= block_bytes:
        return tokens
    return -(-tokens // -(-per_head // block_bytes))


def _attend_cpu(a, b, v, *, scale, causal, key_chunk, direct_max_tokens, block_bytes):
    """[B, T, H, d] x3 -> [B, T, H, d]: the CPU arrangement of the module docstring."""
    batch, tokens, heads, dim = a.shape
    if tokens <= direct_max_tokens:
        out = _softmax_pv(_by_head(a * scale), _by_head(b), _by_head(v), jnp.arange(tokens), causal=causal,
                          key_chunk=key_chunk or KEY_CHUNK)
        return _from_heads(out, batch)

    key_chunk = key_chunk or min(BLOCK_KEY_CHUNK, -(-tokens // BLOCK_KEY_CHUNKS))
    qc = _query_chunk(tokens, block_bytes)
    n_q = -(-tokens // qc)

    def body(i, out):
        bi, hi, ci = i // (heads * n_q), i // n_q % heads, i % n_q
        start = jnp.minimum(ci * qc, tokens - qc)  # the last chunk overlaps the one before: no padding

        def take(x, at, size):  # [size, d] of image bi, head hi, from token `at`, as [1, size, d]
            return jax.lax.dynamic_slice(x, (bi, at, hi, 0), (1, size, 1, dim)).reshape(1, size, dim)

        o = _softmax_pv(take(a, start, qc) * scale, take(b, 0, tokens), take(v, 0, tokens),
                        start + jnp.arange(qc), causal=causal, key_chunk=key_chunk)
        return jax.lax.dynamic_update_slice(out, o.reshape(1, qc, 1, dim), (bi, start, hi, 0))

    return jax.lax.fori_loop(0, batch * heads * n_q, body, jnp.zeros(a.shape, v.dtype))


def _by_head(x):
    """[B, T, H, d] -> [B*H, T, d]."""
    batch, tokens, heads, dim = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch * heads, tokens, dim)


def _from_heads(x, batch: int):
    """[B*H, T, d] -> [B, T, H, d]."""
    groups, tokens, dim = x.shape
    return x.reshape(batch, groups // batch, tokens, dim).transpose(0, 2, 1, 3)


def _attend_plain(a, b, v, *, causal):
    """[G, T, d] x3 -> [G, T, d], `a` pre-scaled: the formula as written."""
    positions = jnp.arange(a.shape[1])
    logits = _masked(jnp.einsum("gqd,gkd->gqk", a, b, preferred_element_type=jnp.float32), positions, positions,
                     causal)
    return jnp.einsum("gqk,gkd->gqd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def attend(a, b, v, *, scale, causal=False, key_chunk=None,
           direct_max_tokens=DIRECT_MAX_TOKENS, block_bytes=BLOCK_BYTES):
    """softmax(a bᵀ · scale [causal-masked]) v per head.

    a, b, v: [batch, tokens, heads, head_dim] (heads split, not transposed).
    Returns [batch, tokens, heads, head_dim]. With causal=True, query i sees
    keys 0..i (the text tower, SPEC §1). The keyword tuning knobs change only
    how the CPU computes it (module docstring; key_chunk=None picks the
    measured default of each arrangement), never the result beyond float32
    rounding.
    """
    a, b, v = jnp.asarray(a), jnp.asarray(b), jnp.asarray(v)
    chex.assert_rank([a, b, v], 4)
    chex.assert_equal_shape([a, b, v])

    def plain(a, b, v):
        return _from_heads(_attend_plain(_by_head(a * scale), _by_head(b), _by_head(v), causal=causal), a.shape[0])

    cpu = functools.partial(_attend_cpu, scale=scale, causal=causal, key_chunk=key_chunk,
                            direct_max_tokens=direct_max_tokens, block_bytes=block_bytes)
    return jax.lax.platform_dependent(a, b, v, cpu=cpu, default=plain)
