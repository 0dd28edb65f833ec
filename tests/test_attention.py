"""`attend` against a float64 numpy loop over heads of the plain softmax formula.

Every path of the CPU arrangement is forced with small sizes: one fused pass,
key chunks, head blocks, query chunks (T divisible by none of the chunk sizes),
causal masks that blank whole key chunks, and the plain (non-CPU) formula.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax.clip import attention
from fiseclip_jax.clip.attention import attend


def oracle(a, b, v, scale, causal=False):
    """softmax(a bᵀ scale) v head by head in float64; [B, T, H, d] in and out."""
    a, b, v = (np.asarray(x, np.float64) for x in (a, b, v))
    batch, tokens, heads, _ = a.shape
    out = np.zeros_like(a)
    for i in range(batch):
        for h in range(heads):
            logits = a[i, :, h] @ b[i, :, h].T * scale
            if causal:
                logits[np.triu_indices(tokens, 1)] = -np.inf
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[i, :, h] = (w / w.sum(-1, keepdims=True)) @ v[i, :, h]
    return out


def qkv(batch, tokens, heads, dim, seed=0, spread=1.0):
    r = np.random.RandomState(seed)
    return tuple((spread * r.randn(batch, tokens, heads, dim)).astype(np.float32) for _ in range(3))


def close(got, want, tol=2e-6):
    """Float32 rounding: relative to the largest output magnitude."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


# (tokens, knobs): each forces one arrangement; no token count divides a chunk size.
PATHS = {
    "one pass": (77, {}),
    "key chunks": (77, dict(key_chunk=20)),  # 4 chunks of 20, last one 17
    "head by head": (45, dict(direct_max_tokens=16)),  # one head at a time, keys in 3 chunks of 15
    "query chunks": (45, dict(direct_max_tokens=16, block_bytes=2100)),  # 4 chunks of 12, the last overlapping
    "query and key chunks": (45, dict(direct_max_tokens=16, block_bytes=2100, key_chunk=13)),  # keys 3 x 12 + 9
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["qk", "vv", "qq", "qq+kk"])
def test_matches_float64_formula(path, causal, mode):
    tokens, knobs = PATHS[path]
    q, k, v = qkv(2, tokens, 4, 16, seed=tokens)
    scale = 16 ** -0.5
    att = jax.jit(functools.partial(attend, scale=scale, causal=causal, **knobs))
    if mode == "qk":
        got, want = att(q, k, v), oracle(q, k, v, scale, causal)
    elif mode == "vv":
        got, want = att(v, v, v), oracle(v, v, v, scale, causal)
    elif mode == "qq":
        got, want = att(q, q, v), oracle(q, q, v, scale, causal)
    else:
        got = att(q, q, v) + att(k, k, v)
        want = oracle(q, q, v, scale, causal) + oracle(k, k, v, scale, causal)
    close(got, want)


@pytest.mark.parametrize("path", list(PATHS))
def test_large_logits_stay_finite(path):
    """Logits around ±300 overflow exp() without the max subtraction (vv on big values)."""
    tokens, knobs = PATHS[path]
    _, _, v = qkv(1, tokens, 2, 16, seed=1, spread=6.0)
    got = attend(v, v, v, scale=0.25, causal=True, **knobs)
    assert np.isfinite(np.asarray(got)).all()
    close(got, oracle(v, v, v, 0.25, causal=True), tol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_plain_formula_branch(causal):
    """The non-CPU branch of `attend` (picked by lax.platform_dependent elsewhere)."""
    q, k, v = qkv(2, 33, 3, 8, seed=5)
    by_head = attention._by_head
    got = attention._attend_plain(by_head(jnp.asarray(q)) * 0.3, by_head(k), by_head(v), causal=causal)
    got = attention._from_heads(got, 2)
    close(got, oracle(q, k, v, 0.3, causal))


class JitAndEagerTest(chex.TestCase):
    """chex.variants: the same numbers traced under jit and run op by op."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_agree_with_oracle(self):
        for path in ("one pass", "query and key chunks"):
            tokens, knobs = PATHS[path]
            q, k, v = qkv(2, tokens, 2, 8, seed=9)
            fn = self.variant(functools.partial(attend, scale=0.5, causal=True, **knobs))
            close(fn(q, k, v), oracle(q, k, v, 0.5, causal=True))


@pytest.mark.parametrize("path", ["one pass", "head by head", "query and key chunks"])
def test_vmap_over_a_leading_axis(path):
    """vmap of attend over images = attend on the batch; the head-by-head loop batches too."""
    tokens, knobs = PATHS[path]
    q, k, v = qkv(3, tokens, 2, 8, seed=11)
    per_image = functools.partial(attend, scale=0.5, **knobs)
    got = jax.jit(jax.vmap(lambda a, b, c: per_image(a[None], b[None], c[None])[0]))(q, k, v)
    close(got, oracle(q, k, v, 0.5))


def test_query_chunk():
    """All queries while one head's logits fit the budget, else near-equal chunks."""
    assert attention._query_chunk(1370, 8 << 20) == 1370  # 7.5 MB
    assert attention._query_chunk(1025, 4 << 20) == 513  # 4.2 MB -> 2 chunks
    assert attention._query_chunk(2049, 8 << 20) == 683  # 16.8 MB -> 3 chunks
    assert attention._query_chunk(45, 2100) == 12  # 8100 B -> 4 chunks


def test_rejects_mismatched_shapes():
    q, k, _ = qkv(1, 9, 2, 4)
    with pytest.raises(AssertionError):
        attend(q, k[:, :8], k, scale=1.0)
