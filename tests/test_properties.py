"""Laws the scoring and the metrics must obey, checked with hypothesis (SPEC §4, §6).

- permuting a batch permutes every method's maps and image scores;
- appending padding rows (valid False) never changes the real rows;
- AUROC / AP / F1-max / exact AUPRO depend only on the order of the scores;
- AUPRO of a perfect map is 1, of a constant map what the definition gives;
- an exact twin patch in every reference makes a patch's mutual score 0.

Features come from a seeded Gaussian (hypothesis draws the seed, sizes, permutations, masks and
padding): the laws are stated for generic features. Exact ties in RsCIN's CLS similarities are
broken by index (documented), which no permutation law can survive, and a Gaussian has none.
Shapes are fixed per test where possible so that each jitted scorer compiles only a few times.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fiseclip_jax as fj
from fiseclip_jax import metrics
from fiseclip_jax.matching import mutual_scores_jit
from fiseclip_jax.prompts import TextFeatures

jax.config.update("jax_default_matmul_precision", "float32")

# derandomize: the same examples on every run (no flaky CI); deadline off: the first example of a
# shape pays for XLA compilation.
FEW = settings(derandomize=True, database=None, max_examples=8, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])
MANY = settings(derandomize=True, database=None, max_examples=40, deadline=None)  # numpy-only laws: cheap examples

NL, G, W, D, S = 2, 4, 8, 6, 8  # matching layers, patch grid (P = 16), token width, embed dim, map size
M = 3  # sentences per side for AnoCLIP+


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def features(seed, b, views=0):
    rng = np.random.default_rng(seed)
    cls_shape = (b, views, D) if views else (b, D)
    return {"tokens": rng.normal(size=(b, NL, G * G, W)).astype(np.float32),
            "local": rng.normal(size=(b, G * G, D)).astype(np.float32),
            "cls": rng.normal(size=cls_shape).astype(np.float32)}


def text_features(seed):
    rng = np.random.default_rng(seed)
    return TextFeatures(*(jnp.asarray(unit(rng.normal(size=(n, D))), jnp.float32) for n in (2, M, M)))


@functools.lru_cache(maxsize=None)
def scorer(config):
    """config.score jitted once per config (and per shape): the examples share compilations."""
    return jax.jit(config.score, static_argnames=("size",))


METHODS = {
    "musc": fj.MuScConfig(),
    "fiseclip": fj.FiSeCLIPConfig(),  # threshold filter, min-max fusion, image score "sum" (min-max terms)
    "fiseclip-share-max": fj.FiSeCLIPConfig(text_filter="share", rho=0.25, image_score="max", r_list=(1, 3)),
    "anoclip": fj.AnoCLIPConfig(),
    "anoclip+": fj.AnoCLIPConfig(tta=fj.TTAConfig(steps=2)),
}


def run(name, feats, valid, text_seed=7):
    config = METHODS[name]
    text = None if config.prompts is None else text_features(text_seed)
    det = scorer(config)(feats, text, jnp.asarray(valid), size=S)
    return np.asarray(det.image_scores), np.asarray(det.anomaly_maps), np.asarray(det.num_refs)


# Tolerances for laws that only reorder or re-pad float32 work (a batch permutation changes the order
# of the sums over references, a new batch shape may change XLA's tiling): AnoCLIP's per-image
# softmax of cosines 1e-6; matching maps (mean of float32 distances of unit vectors) 1e-5; scores
# after a batch min-max (RsCIN, FiSeCLIP "sum") 2e-5, as the parity tests of test_methods.py.
MAP_TOL = {"musc": 1e-5, "fiseclip": 1e-5, "fiseclip-share-max": 1e-5, "anoclip": 1e-6, "anoclip+": 1e-6}
SCORE_TOL = {"musc": 2e-5, "fiseclip": 2e-5, "fiseclip-share-max": 1e-5, "anoclip": 1e-6, "anoclip+": 1e-6}


def close(actual, expected, atol):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


# ------------------------------------------------------------------ permutations
@st.composite
def permuted_batch(draw, b=6):
    """(seed, valid [b] with a real image, a permutation of range(b)). One batch shape for all
    examples (one compilation); the valid masks make the number of real images 1..b."""
    valid = np.array(draw(st.lists(st.booleans(), min_size=b, max_size=b)))
    valid[draw(st.integers(0, b - 1))] = True  # at least one real image
    return draw(st.integers(0, 2 ** 16)), valid, np.array(draw(st.permutations(range(b))))


@pytest.mark.parametrize("name", ["musc", "fiseclip", "fiseclip-share-max", "anoclip"])
@FEW
@given(case=permuted_batch())
def test_permuting_the_batch_permutes_maps_and_scores(name, case):
    """Matching uses every other image as a reference whatever its position; min-max, RsCIN and the
    text branch are batch-order free; so scores, maps and reference counts move with their image.
    Padding rows (valid False) are permuted along: which rows are real is part of the batch.
    Not AnoCLIP+: its adapter's init and noise keys are fold_in(key, batch index) by design
    (methods/tta.py), so moving an image moves it to another random adapter."""
    seed, valid, perm = case
    feats = features(seed, len(valid))
    scores, maps, refs = run(name, feats, valid)
    p_scores, p_maps, p_refs = run(name, {k: v[perm] for k, v in feats.items()}, valid[perm])
    np.testing.assert_array_equal(p_refs, refs[perm])
    close(p_maps, maps[perm], MAP_TOL[name])
    close(p_scores, scores[perm], SCORE_TOL[name])


@FEW
@given(case=permuted_batch())
def test_anoclip_permutation_with_views(case):
    """The image score as the mean over views (cls [B, V, D], SPEC §4.4) moves with its image too."""
    seed, valid, perm = case
    feats = features(seed, len(valid), views=3)
    scores, maps, _ = run("anoclip", feats, valid)
    p_scores, p_maps, _ = run("anoclip", {k: v[perm] for k, v in feats.items()}, valid[perm])
    close(p_maps, maps[perm], MAP_TOL["anoclip"])
    close(p_scores, scores[perm], SCORE_TOL["anoclip"])


# ------------------------------------------------------------------ padding
def padding_rows(kind, feats, n, seed):
    """n rows to append: zeros, copies of real rows (an exact twin of every real patch: if padding
    ever served as a reference, matching scores would collapse to ~0), or huge noise."""
    out = {}
    rng = np.random.default_rng(seed + 1)
    for key, v in feats.items():
        if kind == "zeros":
            out[key] = np.zeros((n,) + v.shape[1:], v.dtype)
        elif kind == "copies":
            out[key] = v[rng.integers(0, len(v), n)]
        else:
            out[key] = (100.0 * rng.normal(size=(n,) + v.shape[1:])).astype(v.dtype)
    return out


REAL, N_PAD = 4, 2  # real images in the padding tests, padding rows appended (6: the permutation tests' shape)


@pytest.mark.parametrize("name", ["musc", "fiseclip", "fiseclip-share-max", "anoclip", "anoclip+"])
@FEW
@given(seed=st.integers(0, 2 ** 16), kind=st.sampled_from(["zeros", "copies", "noise"]))
def test_padding_never_changes_real_rows(name, seed, kind):
    feats = features(seed, REAL)
    pad = padding_rows(kind, feats, N_PAD, seed)
    padded = {k: np.concatenate([feats[k], pad[k]]) for k in feats}
    valid = np.arange(REAL + N_PAD) < REAL
    scores, maps, refs = run(name, feats, np.ones(REAL, bool))
    p_scores, p_maps, p_refs = run(name, padded, valid)
    np.testing.assert_array_equal(p_refs[:REAL], refs)
    close(p_maps[:REAL], maps, MAP_TOL[name])
    close(p_scores[:REAL], scores, SCORE_TOL[name])
    if kind != "zeros":  # zero features have no direction: cosines (and so padded rows) are nan there
        np.testing.assert_array_equal(p_scores[REAL:], 0.0)
        np.testing.assert_array_equal(p_maps[REAL:], 0.0)


@FEW
@given(seed=st.integers(0, 2 ** 16), n=st.sampled_from([1, 3, 5]),
       kind=st.sampled_from(["zeros", "copies", "noise"]), share=st.sampled_from([0.3, 1.0]))
def test_padding_never_changes_mutual_scores(seed, n, kind, share):
    n_pad = 6 - n
    rng = np.random.default_rng(seed)
    z = unit(rng.normal(size=(n, 16, W))).astype(np.float32)
    allowed = rng.random((n, 16)) < share
    pad = padding_rows(kind, {"z": z}, n_pad, seed)["z"]
    out = mutual_scores_jit(z, allowed, chunk_size=2)
    # padding rows: every patch allowed, so only `valid` can keep them out
    padded = mutual_scores_jit(np.concatenate([z, pad]), np.concatenate([allowed, np.ones((n_pad, 16), bool)]),
                               np.arange(n + n_pad) < n, chunk_size=2)
    np.testing.assert_array_equal(np.asarray(padded.num_refs), np.r_[np.asarray(out.num_refs), np.zeros(n_pad)])
    close(np.asarray(padded.scores)[:n], np.asarray(out.scores), 1e-6)  # same distances, other chunking
    np.testing.assert_array_equal(np.asarray(padded.scores)[n:], 0.0)  # documented: padding scores 0


# ------------------------------------------------------------------ mutual twins
@MANY
@given(seed=st.integers(0, 2 ** 16), n=st.integers(2, 6), scale=st.sampled_from([1.0, 7.0]), data=st.data())
def test_exact_twin_in_every_reference_scores_zero(seed, n, scale, data):
    """d_j(p) = 0 for every reference j, so the mean of the k smallest is 0 (SPEC §4.2)."""
    rng = np.random.default_rng(seed)
    z = (scale * unit(rng.normal(size=(n, 16, W)))).astype(np.float32)
    i, p = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, 15))
    for j in range(n):
        if j != i:
            z[j, data.draw(st.integers(0, 15))] = z[i, p]
    scores = np.asarray(mutual_scores_jit(z, chunk_size=4).scores)
    # Not exactly 0: d² = ‖a‖² + ‖b‖² − 2a·b cancels to a few float32 ulps of 2‖a‖², whose square
    # root is ~sqrt(eps)·‖a‖ (measured ≤ 4.9e-4 for unit vectors); allow sqrt(16·eps32)·‖a‖.
    tol = math.sqrt(16 * np.finfo(np.float32).eps) * scale
    assert scores[i, p] <= tol, (scores[i, p], tol)
    others = np.delete(scores[i], p)
    assert others.min() > 20 * tol  # generic patches of this image are far from their neighbours


# ------------------------------------------------------------------ metrics: order only
@st.composite
def labelled_scores(draw, max_size=40):
    """Labels with both classes and integer-valued scores (ties included)."""
    n = draw(st.integers(2, max_size))
    labels = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    labels[0], labels[1] = True, False
    scores = np.array(draw(st.lists(st.integers(-30, 30), min_size=n, max_size=n)), np.float64)
    return labels, scores


@st.composite
def increasing_map(draw, values):
    """A strictly increasing function on the distinct `values`, as a lookup (any such function)."""
    distinct = np.unique(values)
    start = draw(st.floats(-1e3, 1e3))
    steps = draw(st.lists(st.floats(1e-3, 1e3), min_size=distinct.size, max_size=distinct.size))
    image = start + np.cumsum(steps)
    return lambda x: image[np.searchsorted(distinct, x)]


FIXED_TRANSFORMS = [lambda x: 3.0 * x + 7.0, lambda x: np.exp(x / 8.0), lambda x: x ** 3, np.arctan,
                    lambda x: -1.0 / (x + 31.0)]


@MANY
@given(case=labelled_scores(), which=st.integers(0, len(FIXED_TRANSFORMS)), data=st.data())
def test_ranking_metrics_invariant_under_increasing_transforms(case, which, data):
    """AUROC, AP and F1-max are functions of the ranking only (SPEC §6): counts, no score values.
    Exactly equal, not approximately: both sides are computed from the same integer counts."""
    labels, scores = case
    f = data.draw(increasing_map(scores)) if which == len(FIXED_TRANSFORMS) else FIXED_TRANSFORMS[which]
    moved = f(scores)
    assert np.all(np.diff(moved[np.argsort(scores)]) >= 0)  # f kept the order (and ties)
    assert metrics.image_metrics(labels, moved) == metrics.image_metrics(labels, scores)
    assert metrics.auroc(labels, moved) == metrics.auroc(labels, scores)
    assert metrics.average_precision(labels, moved) == metrics.average_precision(labels, scores)


@st.composite
def masks_and_maps(draw):
    """[N, H, W] masks with a defect pixel and a normal pixel; integer-valued maps (ties included)."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(2, 8))
    flat = np.array(draw(st.lists(st.booleans(), min_size=n * h * w, max_size=n * h * w)))
    flat[0], flat[-1] = True, False
    values = np.array(draw(st.lists(st.integers(-20, 20), min_size=n * h * w, max_size=n * h * w)), np.float64)
    return flat.reshape(n, h, w), values.reshape(n, h, w)


@MANY
@given(case=masks_and_maps(), data=st.data())
def test_pixel_metrics_and_exact_aupro_invariant_under_increasing_transforms(case, data):
    """Pixel AUROC/AP/F1 and the exact AUPRO (thresholds at every distinct value) use the order only.
    The legacy AUPRO does not: its 200 thresholds are evenly spaced in score units."""
    masks, maps = case
    f = data.draw(increasing_map(maps))
    a = metrics.pixel_metrics(masks, maps, aupro="exact")
    b = metrics.pixel_metrics(masks, f(maps), aupro="exact")
    for key in ("pixel_AUROC", "pixel_AP", "pixel_F1Max"):
        assert a[key] == b[key], key
    # AUPRO sums region weights 1/(R·|region|) in float64: the same order of the same terms
    close(b["pixel_AUPRO"], a["pixel_AUPRO"], 1e-12)


# ------------------------------------------------------------------ AUPRO of known maps
@st.composite
def defect_masks(draw, min_normal=1):
    """[N, H, W] masks with at least one defect pixel and at least `min_normal` normal pixels."""
    side = 2 if min_normal < 4 else 3  # N·H·W > min_normal (<= 8)
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(side, 8)), draw(st.integers(side, 8))
    flat = np.array(draw(st.lists(st.booleans(), min_size=n * h * w, max_size=n * h * w)))
    flat[-min_normal:] = False
    flat[0] = True
    return flat.reshape(n, h, w)


@MANY
@given(masks=defect_masks(), data=st.data(), max_fpr=st.sampled_from([0.3, 0.05, 1.0]))
def test_aupro_of_a_perfect_map_is_one(masks, data, max_fpr):
    """Every defect pixel above every normal pixel: PRO = 1 at FPR 0, so the normalised area is 1
    (SPEC §6). Values drawn freely on each side of a gap, ties and binary maps included."""
    n_def, n_norm = int(masks.sum()), int((~masks).sum())
    hi = data.draw(st.lists(st.floats(0.6, 1.0), min_size=n_def, max_size=n_def))
    lo = data.draw(st.lists(st.floats(0.0, 0.4), min_size=n_norm, max_size=n_norm))
    maps = np.zeros(masks.shape)
    maps[masks], maps[~masks] = hi, lo
    # PRO sums region weights 1/(R·|region|) in float64: 1 up to a few ulps
    close(metrics.aupro(masks, maps, max_fpr=max_fpr), 1.0, 1e-12)


@MANY
@given(masks=defect_masks(min_normal=8), data=st.data())
def test_legacy_aupro_of_a_perfect_map_is_one(masks, data):
    """The legacy variant (SPEC §6): FPRs below 0.3 min-max rescaled to [0, 1], PRO = 1 on all of
    them. It needs two distinct such FPRs, so the normal pixels are spread (distinct values evenly
    over [0, 0.4], far more finely spaced than nothing, coarser than the defect-to-normal gap) and
    there are at least 8 of them, so that 1/n_normal < 0.3."""
    n_def, n_norm = int(masks.sum()), int((~masks).sum())
    hi = data.draw(st.lists(st.floats(0.6, 1.0), min_size=n_def, max_size=n_def))
    maps = np.zeros(masks.shape)
    maps[masks] = hi
    maps[~masks] = np.random.default_rng(n_norm).permutation(np.linspace(0.0, 0.4, n_norm))
    # float64 trapezoids of PRO values that are sums of 1/(R·|region|): 1 up to a few ulps
    close(metrics.aupro_legacy(masks, maps), 1.0, 1e-12)


def test_legacy_aupro_of_a_binary_perfect_map_is_undefined():
    """A 0/1 perfect map has FPR 0 at every legacy threshold: fewer than two FPRs, nan (documented)."""
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1:3, 2:5] = True
    with pytest.warns(metrics.MetricWarning, match="two distinct FPRs"):
        assert math.isnan(metrics.aupro_legacy(masks, masks.astype(np.float64)))
    close(metrics.aupro(masks, masks.astype(np.float64)), 1.0, 1e-12)  # the exact variant: 1 (to 2e-16 here)


@MANY
@given(masks=defect_masks(), value=st.floats(-1e3, 1e3), max_fpr=st.floats(0.01, 1.0))
def test_aupro_of_a_constant_map(masks, value, max_fpr):
    """One threshold: every pixel at or above it, so the curve runs straight from (FPR 0, PRO 0) to
    (1, 1) and the area to max_fpr, divided by max_fpr, is max_fpr / 2. The legacy variant's
    threshold grid between min and max is empty: nan with a MetricWarning."""
    maps = np.full(masks.shape, value)
    close(metrics.aupro(masks, maps, max_fpr=max_fpr), max_fpr / 2, 1e-12)
    with pytest.warns(metrics.MetricWarning, match="all map values are equal"):
        assert math.isnan(metrics.aupro_legacy(masks, maps))
