"""Scaled dot-product attention for the CLIP towers (SPEC §1, §2).

One pure function serves every attention pair of SPEC §2: `attend(q, k, v)`
(standard), `attend(v, v, v)` (vv), `attend(q, q, v)` (qq) and the sum of two
calls (qq+kk), plus the causal text tower.

Results equal the plain formula softmax(a bᵀ s) v to float32 rounding on every
backend. On CPU the arithmetic is arranged for XLA's CPU backend, which hands a
dot -> max -> exp -> sum -> dot chain to YNNPACK as one fused kernel
(benchmarks/attention.py measures each choice):

- keys are taken in chunks of at most `KEY_CHUNK`: the fused kernel is about
  2x slower per logit once a softmax row is longer than 256 (T=256 vs 257);
  the per-chunk maxima and sums are then combined exactly (the usual
  two-level softmax);
- for T > `DIRECT_MAX_TOKENS` the heads (and, for one head over budget, the
  queries) are visited in blocks of about `BLOCK_BYTES` of logits with
  `lax.map`, so the [B, H, T, T] logits are never live at once. Up to T=512
  (at most two key chunks) one pass over all heads was faster; from T=577 on,
  1-4 MB blocks were 1.5-3x faster than one pass.

Other backends run the plain formula, which their compilers fuse themselves.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

KEY_CHUNK = 256  # longest softmax row handed to one fused kernel on CPU
DIRECT_MAX_TOKENS = 512  # up to here all heads go through one fused kernel
BLOCK_BYTES = 4 << 20  # float32 logits per block beyond DIRECT_MAX_TOKENS


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


def _block_sizes(groups: int, tokens: int, block_bytes: int) -> tuple[int, int]:
    """(heads per block, queries per block) for float32 logits blocks of <= ~block_bytes.

    Heads per block divides `groups`, so no head padding is needed. When one
    head's [T, T] logits alone exceed the budget, its queries are split into
    equal chunks (the last one padded by fewer rows than there are chunks).
    """
    per_head = 4 * tokens * tokens
    if per_head > block_bytes:
        chunks = -(-per_head // block_bytes)
        return 1, -(-tokens // chunks)
    fit = min(groups, block_bytes // per_head)
    heads = max(h for h in range(1, fit + 1) if groups % h == 0)
    return heads, tokens


def _attend_cpu(a, b, v, *, causal, key_chunk, direct_max_tokens, block_bytes):
    """[G, T, d] x3 -> [G, T, d], `a` pre-scaled: the CPU arrangement of the module docstring."""
    groups, tokens, dim = a.shape
    positions = jnp.arange(tokens)
    kernel = functools.partial(_softmax_pv, causal=causal, key_chunk=key_chunk)
    if tokens <= direct_max_tokens:
        return kernel(a, b, v, positions)

    g, qc = _block_sizes(groups, tokens, block_bytes)
    n_groups, n_chunks = groups // g, -(-tokens // qc)
    # Padded query rows attend to real keys and are dropped at the end.
    a = jnp.pad(a, ((0, 0), (0, n_chunks * qc - tokens), (0, 0)))
    a = a.reshape(n_groups, g, n_chunks, qc, dim)
    b, v = b.reshape(n_groups, g, tokens, dim), v.reshape(n_groups, g, tokens, dim)

    def block(i):
        gi, ci = i // n_chunks, i % n_chunks
        return kernel(a[gi, :, ci], b[gi], v[gi], ci * qc + jnp.arange(qc))

    out = jax.lax.map(block, jnp.arange(n_groups * n_chunks))  # [n_groups * n_chunks, g, qc, d]
    out = out.reshape(n_groups, n_chunks, g, qc, dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(groups, n_chunks * qc, dim)[:, :tokens]


def _attend_plain(a, b, v, *, causal):
    """[G, T, d] x3 -> [G, T, d], `a` pre-scaled: the formula as written."""
    positions = jnp.arange(a.shape[1])
    logits = _masked(jnp.einsum("gqd,gkd->gqk", a, b, preferred_element_type=jnp.float32), positions, positions,
                     causal)
    return jnp.einsum("gqk,gkd->gqd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def attend(a, b, v, *, scale, causal=False, key_chunk=KEY_CHUNK,
           direct_max_tokens=DIRECT_MAX_TOKENS, block_bytes=BLOCK_BYTES):
    """softmax(a bᵀ · scale [causal-masked]) v per head.

    a, b, v: [batch, tokens, heads, head_dim] (heads split, not transposed).
    Returns [batch, tokens, heads, head_dim]. With causal=True, query i sees
    keys 0..i (the text tower, SPEC §1). The keyword tuning knobs change only
    how the CPU computes it (module docstring), never the result beyond
    float32 rounding.
    """
    a, b, v = jnp.asarray(a), jnp.asarray(b), jnp.asarray(v)
    chex.assert_rank([a, b, v], 4)
    chex.assert_equal_shape([a, b, v])
    batch, tokens, heads, dim = a.shape

    def by_head(x):  # [B, T, H, d] -> [B*H, T, d]
        return x.transpose(0, 2, 1, 3).reshape(batch * heads, tokens, dim)

    cpu = functools.partial(_attend_cpu, causal=causal, key_chunk=key_chunk,
                            direct_max_tokens=direct_max_tokens, block_bytes=block_bytes)
    plain = functools.partial(_attend_plain, causal=causal)
    out = jax.lax.platform_dependent(by_head(a * scale), by_head(b), by_head(v), cpu=cpu, default=plain)
    return out.reshape(batch, heads, tokens, dim).transpose(0, 2, 1, 3)
