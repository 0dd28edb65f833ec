"""mutual_scores, lnamd and rscin against brute-force numpy oracles (SPEC §4.2, §4.3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fiseclip_jax.matching import (MutualScores, _mean_smallest_k, _nearest_sq_dist, lnamd, mutual_scores,
                                   mutual_scores_jit)
from fiseclip_jax.rscin import rscin

jax.config.update("jax_default_matmul_precision", "float32")


# ------------------------------------------------------------------ oracles
def brute_mutual(features, allowed=None, valid=None, alpha=0.3):
    """Triple loop of the SPEC §4.2 / §4.3 definition in float64."""
    z = np.asarray(features, np.float64)
    n, p, _ = z.shape
    allowed = np.ones((n, p), bool) if allowed is None else np.asarray(allowed, bool)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    scores = np.zeros((n, p))
    num_refs = np.zeros(n, np.int64)
    for i in range(n):
        if not valid[i]:
            continue
        refs = [j for j in range(n) if j != i and valid[j] and allowed[j].any()]
        num_refs[i] = len(refs)
        if not refs:
            continue
        k = max(1, math.floor(alpha * len(refs)))
        for pi in range(p):
            d = []
            for j in refs:
                d.append(min(np.linalg.norm(z[i, pi] - z[j, q]) for q in range(p) if allowed[j, q]))
            scores[i, pi] = np.mean(np.sort(d)[:k])
    return scores, num_refs


def random_features(rng, n, p=9, c=6):
    z = rng.normal(size=(n, p, c))
    return (z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32)


def check(out, ref, atol=2e-5):
    scores, num_refs = ref
    assert isinstance(out, MutualScores)
    assert out.scores.dtype == jnp.float32 and out.num_refs.dtype == jnp.int32
    assert np.all(np.isfinite(np.asarray(out.scores)))
    np.testing.assert_array_equal(np.asarray(out.num_refs), num_refs)
    np.testing.assert_allclose(np.asarray(out.scores), scores, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------ mutual_scores
@pytest.mark.parametrize("n", [2, 3, 4, 5, 13])
def test_mutual_matches_bruteforce_all_allowed(n):
    z = random_features(np.random.default_rng(n), n)
    check(mutual_scores_jit(z, chunk_size=3), brute_mutual(z))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 13])
def test_mutual_matches_bruteforce_random_allowed(n):
    rng = np.random.default_rng(100 + n)
    z = random_features(rng, n)
    allowed = rng.random((n, z.shape[1])) < 0.4
    allowed[0] = False  # image 0 can never be a reference
    check(mutual_scores_jit(z, allowed, chunk_size=4), brute_mutual(z, allowed))


def test_mutual_unnormalised_features_and_alpha():
    rng = np.random.default_rng(7)
    z = (rng.normal(size=(11, 7, 5)) * 3.0).astype(np.float32)
    check(mutual_scores_jit(z, alpha=0.5, chunk_size=2), brute_mutual(z, alpha=0.5), atol=1e-4)


def test_mutual_single_image_is_zero_not_nan():
    z = random_features(np.random.default_rng(0), 1)
    out = mutual_scores(z)
    np.testing.assert_array_equal(np.asarray(out.scores), 0.0)
    np.testing.assert_array_equal(np.asarray(out.num_refs), [0])


def test_mutual_all_references_filtered():
    rng = np.random.default_rng(1)
    z = random_features(rng, 3)
    allowed = np.ones((3, 9), bool)
    allowed[1:] = False  # image 0 has no usable reference; 1 and 2 only have image 0
    out = mutual_scores_jit(z, allowed)
    check(out, brute_mutual(z, allowed))
    assert int(out.num_refs[0]) == 0 and float(jnp.abs(out.scores[0]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(out.num_refs), [0, 1, 1])
    out = mutual_scores_jit(z, np.zeros((3, 9), bool))
    np.testing.assert_array_equal(np.asarray(out.scores), 0.0)
    np.testing.assert_array_equal(np.asarray(out.num_refs), 0)


def test_mutual_disallowed_nearest_neighbour_is_not_used():
    e = np.eye(4, dtype=np.float32)
    z = np.stack([np.stack([e[0], e[3]]), np.stack([e[0], e[1]])])  # [2, 2, 4]
    free = mutual_scores(z)
    assert float(free.scores[0, 0]) < 1e-3  # exact duplicate is the nearest neighbour
    allowed = np.array([[True, True], [False, True]])  # ...but it is disallowed
    out = mutual_scores(z, allowed)
    np.testing.assert_allclose(float(out.scores[0, 0]), math.sqrt(2.0), rtol=1e-6)
    check(out, brute_mutual(z, allowed))


def test_mutual_padding_rows_and_padded_equals_unpadded():
    rng = np.random.default_rng(2)
    n, pad = 6, 3
    z = random_features(rng, n)
    allowed = rng.random((n, 9)) < 0.5
    ref = mutual_scores(z, allowed, chunk_size=4)  # eager
    zp = np.concatenate([z, random_features(rng, pad)])  # garbage padding images
    ap = np.concatenate([allowed, np.ones((pad, 9), bool)])
    valid = np.arange(n + pad) < n
    out = mutual_scores_jit(zp, ap, valid, chunk_size=4)
    np.testing.assert_allclose(np.asarray(out.scores[:n]), np.asarray(ref.scores), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.num_refs[:n]), np.asarray(ref.num_refs))
    np.testing.assert_array_equal(np.asarray(out.scores[n:]), 0.0)
    np.testing.assert_array_equal(np.asarray(out.num_refs[n:]), 0)
    check(out, brute_mutual(zp, ap, valid))
    # invalid rows in the middle, too
    valid_mid = np.array([True, False, True, True, False, True, True, True, False])
    check(mutual_scores_jit(zp, ap, valid_mid, chunk_size=2), brute_mutual(zp, ap, valid_mid))


def test_mutual_batch_order_invariance():
    rng = np.random.default_rng(3)
    z = random_features(rng, 8)
    allowed = rng.random((8, 9)) < 0.6
    perm = rng.permutation(8)
    a = mutual_scores_jit(z, allowed)
    b = mutual_scores_jit(z[perm], allowed[perm])
    np.testing.assert_allclose(np.asarray(b.scores), np.asarray(a.scores)[perm], atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(b.num_refs), np.asarray(a.num_refs)[perm])


def test_mutual_chunk_size_does_not_matter_and_jit():
    rng = np.random.default_rng(4)
    n = 7
    z = random_features(rng, n)
    allowed = rng.random((n, 9)) < 0.5
    ref = brute_mutual(z, allowed)
    outs = [mutual_scores_jit(z, allowed, chunk_size=c) for c in (1, 3, n, 100)]
    for out in outs:
        check(out, ref)
        np.testing.assert_allclose(np.asarray(out.scores), np.asarray(outs[0].scores), atol=1e-6)
    jitted = jax.jit(mutual_scores, static_argnames=("alpha", "chunk_size"))
    check(jitted(jnp.asarray(z), jnp.asarray(allowed), alpha=0.3, chunk_size=3), ref)


# ------------------------------------------------------------------ lnamd
def numpy_lnamd(tokens, grid, r):
    x = np.asarray(tokens, np.float64).reshape(tokens.shape[0], grid, grid, -1)
    mu = x.mean(axis=(1, 2, 3), keepdims=True)
    var = x.var(axis=(1, 2, 3), keepdims=True)
    x = (x - mu) / np.sqrt(var + 1e-5)
    # zero padding counted in the mean, per channel
    x = ndimage.uniform_filter(x, size=(1, r, r, 1), mode="constant", cval=0.0)
    x = x.reshape(tokens.shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_matches_numpy(r):
    rng = np.random.default_rng(r)
    tokens = (rng.normal(size=(3, 36, 8)) * 2 + 0.5).astype(np.float32)
    out = jax.jit(lnamd, static_argnums=(1, 2))(tokens, 6, r)
    np.testing.assert_allclose(np.asarray(out), numpy_lnamd(tokens, 6, r), atol=2e-6)


def test_lnamd_explicit_loop_corner():
    # the corner patch of a 3x3 window with zero padding averages 4 real values / 9
    rng = np.random.default_rng(9)
    tokens = rng.normal(size=(1, 16, 3)).astype(np.float32)
    x = np.asarray(tokens, np.float64).reshape(4, 4, 3)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    corner = x[:2, :2].sum(axis=(0, 1)) / 9.0
    np.testing.assert_allclose(np.asarray(lnamd(tokens, 4, 3))[0, 0], corner / np.linalg.norm(corner), atol=1e-6)
    with pytest.raises(ValueError):
        lnamd(tokens, 4, 2)


def test_lnamd_matches_musc_style_torch_pipeline():
    """LayerNorm([C,H,W]) -> Unfold(r, pad r//2) -> adaptive_avg_pool1d(C·r², C) -> L2, in torch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    n, g, c, r = 2, 5, 6, 3
    tokens = rng.normal(size=(n, g * g, c)).astype(np.float32)
    x = torch.from_numpy(tokens).reshape(n, g, g, c).permute(0, 3, 1, 2)
    x = torch.nn.LayerNorm([c, g, g])(x)
    cols = torch.nn.Unfold(kernel_size=r, padding=(r - 1) // 2)(x)  # [n, c*r*r, g*g]
    cols = cols.reshape(n, c, r, r, -1).permute(0, 4, 1, 2, 3).reshape(n * g * g, 1, -1)
    feat = torch.nn.functional.adaptive_avg_pool1d(cols, c).reshape(n, g * g, c)
    feat = feat / feat.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(np.asarray(lnamd(tokens, g, r)), feat.detach().numpy(), atol=2e-6)


# ------------------------------------------------------------------ the bank's kernels
def test_nearest_sq_dist_refined_matches_numpy():
    """refine > 0 (the reference bank's path): the candidates re-measured as ‖a − b‖² give the exact
    per-reference minimum over allowed patches; Q ≠ P, a chunk size that does not divide Nr, and
    a reference with no allowed patch (inf)."""
    rng = np.random.default_rng(31)
    nq, p, nr, q, c = 3, 5, 7, 4, 6
    queries = rng.normal(size=(nq, p, c)).astype(np.float32)
    refs = rng.normal(size=(nr, q, c)).astype(np.float32)
    ok = rng.random((nr, q)) < 0.6
    ok[2] = False
    ok[0, 0] = True
    diff = queries[:, :, None, None, :].astype(np.float64) - refs[None, None].astype(np.float64)
    d2 = np.where(ok[None, None], np.sum(diff ** 2, axis=-1), np.inf).min(axis=-1)  # [Nq, P, Nr]
    for refine in (0, 2, 8):
        got = np.asarray(_nearest_sq_dist(jnp.asarray(queries), jnp.asarray(refs), jnp.asarray(ok), 3,
                                          refine=refine))
        assert got.shape == (nq, p, nr)
        assert np.isinf(got[:, :, 2]).all()
        np.testing.assert_allclose(got[:, :, [0, 1, 3, 4, 5, 6]], d2[:, :, [0, 1, 3, 4, 5, 6]], rtol=1e-5, atol=1e-5)


def test_mean_smallest_k_against_a_bank_counts_every_reference():
    """max_refs = Nr (queries scored against a bank, not among its references): k(n) uses the full
    count, e.g. n = 10, alpha 0.3 -> k = 3 (with Nr - 1 = 9 it would be 2)."""
    rng = np.random.default_rng(32)
    nq, p, nr = 3, 4, 10
    d2 = rng.random((nq, p, nr)).astype(np.float32) * 4
    pair_ok = np.ones((nq, nr), bool)
    pair_ok[1, :6] = False  # 4 usable -> k 1
    pair_ok[2] = False  # none -> 0
    out = _mean_smallest_k(jnp.asarray(d2), jnp.asarray(pair_ok), 0.3, max_refs=nr)
    want = np.zeros((nq, p))
    for i in range(nq):
        n = pair_ok[i].sum()
        if n:
            k = min(max(1, int(0.3 * n)), n)
            want[i] = np.sort(np.sqrt(d2[i][:, pair_ok[i]]), axis=-1)[:, :k].mean(-1)
    np.testing.assert_array_equal(np.asarray(out.num_refs), [10, 4, 0])
    np.testing.assert_allclose(np.asarray(out.scores), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ rscin
def numpy_rscin(scores, cls, k_list):
    s = np.asarray(scores, np.float64)
    s = (s - s.min()) / (s.max() - s.min())
    g = np.asarray(cls, np.float64)
    g = g / np.linalg.norm(g, axis=-1, keepdims=True)
    w = g @ g.T
    out = []
    for k in k_list:
        wk = np.zeros_like(w)
        for i in range(len(w)):
            top = np.argsort(-w[i])[:k]
            wk[i, top] = w[i, top]
        p = wk / wk.sum(axis=1, keepdims=True)
        out.append(p @ s)
    return np.mean(out, axis=0)


@pytest.mark.parametrize("k_list", [(1, 2, 3), (1, 8, 9)])
def test_rscin_matches_numpy(k_list):
    rng = np.random.default_rng(len(k_list) + k_list[-1])
    n = 12
    cls = (rng.normal(size=(n, 5)) + 2.0).astype(np.float32)  # positive similarities, as CLIP's
    scores = rng.random(n).astype(np.float32) * 3 + 1
    out = jax.jit(rscin, static_argnames=("k_list",))(scores, cls, k_list=k_list)
    np.testing.assert_allclose(np.asarray(out), numpy_rscin(scores, cls, k_list), atol=1e-5)


def test_rscin_does_not_depend_on_embedding_norms():
    """Only directions count (cosine neighbours): rows scaled by 1e-3 .. 1e3 give the unit-norm result
    (kills a normalisation that clamps the norm at anything but a tiny epsilon)."""
    rng = np.random.default_rng(21)
    n = 10
    cls = (rng.normal(size=(n, 6)) + 1.5).astype(np.float32)
    unit = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
    scales = np.logspace(-3, 3, n).astype(np.float32)[:, None]
    scores = rng.random(n).astype(np.float32)
    want = numpy_rscin(scores, unit, (1, 2, 3))
    got = jax.jit(rscin, static_argnames=("k_list",))(scores, unit * scales, k_list=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    assert np.abs(want - numpy_rscin(scores, unit, (1,))).max() > 1e-2  # neighbours matter here


def test_rscin_computes_in_float32_whatever_the_input_dtype():
    """float16 embeddings and scores (e.g. features kept in half precision): the result is the float64 oracle on
    those same float16 values to float32 accuracy, not a half-precision computation (~1e-3 off)."""
    rng = np.random.default_rng(22)
    n = 12
    cls = (rng.normal(size=(n, 8)) + 1.0).astype(np.float16)
    scores = (rng.random(n) * 3 + 1).astype(np.float16)
    want = numpy_rscin(scores, cls, (1, 2, 3))
    got = jax.jit(rscin, static_argnames=("k_list",))(jnp.asarray(scores), jnp.asarray(cls), k_list=(1, 2, 3))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_rscin_k1_is_minmax_and_equal_scores_guard():
    rscin_jit = jax.jit(rscin, static_argnames=("k_list",))
    rng = np.random.default_rng(5)
    cls = rng.normal(size=(6, 4)).astype(np.float32)
    scores = rng.random(6).astype(np.float32)
    s = (scores - scores.min()) / (scores.max() - scores.min())
    np.testing.assert_allclose(np.asarray(rscin_jit(scores, cls, k_list=(1,))), s, atol=1e-6)
    out = np.asarray(rscin_jit(np.full(6, 0.7, np.float32), cls, k_list=(1, 2, 3)))
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_rscin_valid_mask_ignores_padding():
    rng = np.random.default_rng(6)
    n, pad = 9, 3
    cls = (rng.normal(size=(n + pad, 5)) + 2.0).astype(np.float32)
    scores = rng.random(n + pad).astype(np.float32)
    cls[n:] = cls[0]  # padding would be the nearest neighbour of image 0
    scores[n:] = 100.0  # and would dominate the min-max
    valid = np.arange(n + pad) < n
    out = np.asarray(jax.jit(rscin, static_argnames=("k_list",))(scores, cls, k_list=(1, 2, 3), valid=valid))
    np.testing.assert_allclose(out[:n], numpy_rscin(scores[:n], cls[:n], (1, 2, 3)), atol=1e-5)
    np.testing.assert_array_equal(out[n:], 0.0)
