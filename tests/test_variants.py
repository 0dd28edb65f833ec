"""Every pure core function with and without `jax.jit` (chex variants), against independent oracles.

Oracles share no code with fiseclip_jax: brute-force float64 loops written here, scipy.ndimage, the
numpy oracles of method_oracles.py, and (for the adapter's AdamW steps) torch. Static arguments are
closed over with functools.partial before `self.variant`, so the jitted variant traces arrays only.

Tolerances (absolute, float32 library vs float64 oracle): 1e-6 where each output is a short sum of
O(1) float32 terms (interpolation, filters, softmax of cosines); 1e-5 where a longer float32
reduction or a division by a small span comes first (LayerNorm, min-max, distances); 2e-5 where
distance-based patch scores pass through min-max normalisation (FiSeCLIP fusion, RsCIN), which can
scale float32 rounding by 1/span. The existing parity tests use the same bounds.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from scipy import ndimage

from method_oracles import (np_anoclip, np_bilinear_align_corners, np_fiseclip, np_lnamd, np_matching, np_musc,
                            np_rscin, np_text_alignment)

import fiseclip_jax as fj
from fiseclip_jax import matching, postprocess, rscin, views
from fiseclip_jax.methods import common, tta
from fiseclip_jax.prompts import TextFeatures

jax.config.update("jax_default_matmul_precision", "float32")

VARIANTS = chex.variants(with_jit=True, without_jit=True)


def close(actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0, atol=atol)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------ oracles written here
def brute_mutual(z, allowed, valid, alpha):
    """SPEC §4.2/§4.3 as loops in float64: a_i(p) = mean of the k smallest min_q ‖z_i(p) − z_j(q)‖."""
    z = np.asarray(z, np.float64)
    n, p, _ = z.shape
    scores, num_refs = np.zeros((n, p)), np.zeros(n, np.int64)
    for i in range(n):
        if not valid[i]:
            continue
        refs = [j for j in range(n) if j != i and valid[j] and allowed[j].any()]
        num_refs[i] = len(refs)
        if not refs:
            continue
        k = max(1, math.floor(alpha * len(refs)))
        for a in range(p):
            d = sorted(min(np.linalg.norm(z[i, a] - z[j, q]) for q in range(p) if allowed[j, q]) for j in refs)
            scores[i, a] = np.mean(d[:k])
    return scores, num_refs


def reflect(x, lo, hi):
    """Fold x into [lo, hi] by mirroring at both ends (period 2·(hi − lo))."""
    span = hi - lo
    t = math.fmod(abs(x - lo), 2 * span)
    return lo + (t if t <= span else 2 * span - t)


def np_affine_sample(pixels, theta, align_corners):
    """torch affine_grid + grid_sample(bilinear, reflection) written per output pixel in float64."""
    b, h, w, c = pixels.shape
    x = np.asarray(pixels, np.float64)
    theta = np.asarray(theta, np.float64)
    out = np.zeros((b, h, w, c))

    def base(j, n):  # normalised centre of output pixel j
        return -1 + 2 * j / (n - 1) if align_corners else (2 * j + 1) / n - 1

    def to_pixel(g, n):  # normalised coordinate -> pixel coordinate, reflected, clipped
        if align_corners:
            return min(max(reflect((g + 1) / 2 * (n - 1), 0.0, n - 1.0), 0.0), n - 1.0)
        return min(max(reflect(((g + 1) * n - 1) / 2, -0.5, n - 0.5), 0.0), n - 1.0)

    for r in range(h):
        for col in range(w):
            xn, yn = base(col, w), base(r, h)
            ix = to_pixel(theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2], w)
            iy = to_pixel(theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2], h)
            x0, y0 = int(math.floor(ix)), int(math.floor(iy))
            fx, fy = ix - x0, iy - y0
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    if wx * wy > 0:
                        out[:, r, col] += wx * wy * x[:, y0 + dy, x0 + dx]
    return out


def np_bilinear(m, out_h, out_w, align_corners):
    """[h, w] -> [out_h, out_w]: torch's bilinear source-index rule, written per output pixel."""
    h, w = m.shape

    def src(j, n_in, n_out):
        if align_corners:
            return j * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return max((j + 0.5) * n_in / n_out - 0.5, 0.0)

    out = np.zeros((out_h, out_w))
    for a in range(out_h):
        y = src(a, h, out_h)
        y0 = min(int(y), h - 1)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for b in range(out_w):
            x = src(b, w, out_w)
            x0 = min(int(x), w - 1)
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[a, b] = ((1 - fy) * ((1 - fx) * m[y0, x0] + fx * m[y0, x1])
                         + fy * ((1 - fx) * m[y1, x0] + fx * m[y1, x1]))
    return out


def np_minmax_masked(x, axis, valid):
    """(x − min)/(max − min) over `axis` of the valid rows; 0 where the span is 0 and on padding."""
    x = np.asarray(x, np.float64)
    mask = np.broadcast_to(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x.shape)
    lo = np.min(np.where(mask, x, np.inf), axis=axis, keepdims=True)
    hi = np.max(np.where(mask, x, -np.inf), axis=axis, keepdims=True)
    span = hi - lo
    ok = np.isfinite(span) & (span > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(ok, (x - lo) / np.where(ok, span, 1.0), 0.0)
    return np.where(mask, out, 0.0)


def np_apply_adapter(w, b, z, sentences, kind):
    """SPEC §4.5: z' = ½z + ½ adapter(z), adapter(z) = tanh(W ẑ + b)ᵀ T (text) or W ẑ + b (linear)."""
    z = np.asarray(z, np.float64)
    h = unit(z) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
    if kind == "text":
        h = np.tanh(h) @ np.asarray(sentences, np.float64)
    return 0.5 * z + 0.5 * h


def np_tta_loss(w, b, z, noisy, text, sentences, kind, hard_weight):
    """SPEC §4.5 loss, per patch in loops: mean H(P₀) + hard_weight·mean(−log P₁[abn] − log P₀[normal])."""
    t = unit(np.asarray(text, np.float64))

    def probs(v):  # softmax of the two cosines of z', τ = 1
        cos = unit(np_apply_adapter(w, b, v, sentences, kind)) @ t.T
        e = np.exp(cos - cos.max())
        return e / e.sum()

    p0 = [probs(v) for v in np.asarray(z)]
    p1 = [probs(v) for v in np.asarray(noisy).reshape(-1, z.shape[-1])]
    entropy = np.mean([-(q * np.log(q)).sum() for q in p0])
    hard = np.mean([-np.log(q[1]) for q in p1]) + np.mean([-np.log(q[0]) for q in p0])
    return entropy + hard_weight * hard


# ------------------------------------------------------------------ inputs
def gaussian(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


B, NL, G, W, D, S = 5, 2, 4, 8, 6, 12  # batch, matching layers, patch grid, token width, embed dim, map size


def method_feats(seed, b=B, views_=0):
    cls = gaussian(seed + 3, b, views_, D) if views_ else gaussian(seed + 3, b, D)
    return {"tokens": gaussian(seed, b, NL, G * G, W), "local": gaussian(seed + 1, b, G * G, D), "cls": cls}


# ------------------------------------------------------------------ matching, RsCIN
class MatchingVariantsTest(chex.TestCase):

    @VARIANTS
    @parameterized.parameters(1, 2, 3, 4, 5, 6)
    def test_mutual_scores_masks(self, n):
        rng = np.random.default_rng(10 + n)
        z = unit(rng.normal(size=(n, 9, 5))).astype(np.float32)
        allowed = rng.random((n, 9)) < 0.5
        allowed[-1] = False  # one image never serves as a reference
        valid = np.ones(n, bool)
        if n >= 3:
            valid[1] = False  # a padding row
        fn = self.variant(functools.partial(matching.mutual_scores, alpha=0.3, chunk_size=2))
        out = fn(z, allowed, valid)
        scores, num_refs = brute_mutual(z, allowed, valid, 0.3)
        np.testing.assert_array_equal(np.asarray(out.num_refs), num_refs)
        close(out.scores, scores, 1e-5)  # distances between unit vectors, float32 rounding

    @VARIANTS
    @parameterized.parameters(1, 2, 3, 4, 5, 6)
    def test_mutual_scores_defaults_and_alpha(self, n):
        z = gaussian(20 + n, n, 8, 4, scale=2.0)
        fn = self.variant(functools.partial(matching.mutual_scores, alpha=0.5))
        out = fn(z)
        scores, num_refs = brute_mutual(z, np.ones((n, 8), bool), np.ones(n, bool), 0.5)
        np.testing.assert_array_equal(np.asarray(out.num_refs), num_refs)
        # ‖z‖ ≈ 4: the rounding of ‖a‖² + ‖b‖² − 2a·b (~eps·‖z‖²) costs ~eps·‖z‖²/d in d ≈ 1; measured 8e-7
        close(out.scores, scores, 1e-5)

    @VARIANTS
    @parameterized.parameters((1, 4), (3, 4), (3, (3, 5)), (5, (4, 3)))
    def test_lnamd(self, r, grid):
        h, w = (grid, grid) if isinstance(grid, int) else grid
        tokens = gaussian(30 + r, 3, h * w, 7, scale=2.0) + 0.5
        out = self.variant(functools.partial(matching.lnamd, grid=grid, r=r))(tokens)
        # Oracle: LayerNorm over the whole map, explicit zero-padded r×r window sum / r², L2 norm.
        ref = np.empty(tokens.shape)
        for i, x in enumerate(tokens.astype(np.float64)):
            x = ((x - x.mean()) / np.sqrt(x.var() + 1e-5)).reshape(h, w, -1)
            f = np.zeros_like(x)
            for a in range(h):
                for b in range(w):
                    win = x[max(a - r // 2, 0):a + r // 2 + 1, max(b - r // 2, 0):b + r // 2 + 1]
                    f[a, b] = win.sum((0, 1)) / (r * r)
            f = f.reshape(h * w, -1)
            ref[i] = unit(f)
        close(out, ref, 1e-5)  # LayerNorm over 3·H·W·C float32 values, then a unit vector
        if h == w:  # and the shared oracle of the method tests agrees
            close(out, np_lnamd(tokens, r), 1e-5)

    @VARIANTS
    @parameterized.parameters(((1, 2, 3), None), ((1, 8, 9), None), ((1, 2, 3), (1, 1, 0, 1, 1, 0)))
    def test_rscin(self, k_list, valid):
        n = 6
        scores = gaussian(40, n, scale=3.0)
        cls = gaussian(41, n, 5)
        valid = None if valid is None else np.asarray(valid, bool)
        out = self.variant(functools.partial(rscin.rscin, k_list=k_list))(scores, cls, valid=valid)
        keep = np.ones(n, bool) if valid is None else valid
        ref = np.zeros(n)
        ref[keep] = np_rscin(scores[keep].astype(np.float64), cls[keep].astype(np.float64),
                             [min(k, keep.sum()) for k in k_list])
        close(out, ref, 1e-5)  # min-max of float32 scores then a weighted mean


# ------------------------------------------------------------------ post-processing
class PostprocessVariantsTest(chex.TestCase):

    @VARIANTS
    @parameterized.parameters(((4, 4), (12, 12), True), ((3, 5), (7, 11), True), ((4, 4), (12, 12), False),
                              ((5, 3), (4, 9), False), ((6, 6), (3, 5), True))
    def test_upsample_bilinear(self, src, dst, align_corners):
        maps = gaussian(50, 2, *src)
        fn = functools.partial(postprocess.upsample_bilinear, size=dst, align_corners=align_corners)
        out = self.variant(fn)(maps)
        ref = np.stack([np_bilinear(m.astype(np.float64), *dst, align_corners) for m in maps])
        close(out, ref, 1e-6)  # two-tap interpolation of O(1) values in float32
        if align_corners and dst[0] == dst[1] and src[0] == src[1]:  # the method oracles' formula agrees
            close(out, np.stack([np_bilinear_align_corners(m, dst[0]) for m in maps.astype(np.float64)]), 1e-6)

    @VARIANTS
    @parameterized.parameters(((2, 16, 12), 4.0, 4.0), ((1, 9, 9), 1.0, 4.0), ((3, 8, 5), 1.5, 2.0))
    def test_gaussian_blur(self, shape, sigma, truncate):
        maps = np.random.default_rng(51).random(shape).astype(np.float32)
        out = self.variant(functools.partial(postprocess.gaussian_blur, sigma=sigma, truncate=truncate))(maps)
        ref = np.stack([ndimage.gaussian_filter(m.astype(np.float64), sigma, truncate=truncate, mode="reflect")
                        for m in maps])
        close(out, ref, 1e-6)  # weights sum to 1 over values in [0, 1]: float32 accumulation only

    @VARIANTS
    @parameterized.parameters((3, "replicate"), (5, "replicate"), (3, "zero"), (5, "zero"))
    def test_mean_filter(self, size, padding):
        maps = gaussian(52, 2, 7, 6)
        out = self.variant(functools.partial(postprocess.mean_filter, size=size, padding=padding))(maps)
        mode = "nearest" if padding == "replicate" else "constant"  # scipy's names for the two paddings
        ref = np.stack([ndimage.uniform_filter(m.astype(np.float64), size, mode=mode, cval=0.0) for m in maps])
        close(out, ref, 1e-6)  # mean of ≤ 25 O(1) float32 values

    @VARIANTS
    @parameterized.parameters((None, None), (1, None), ((1, 2), None), (None, (1, 0, 1)), ((1, 2), (0, 1, 1)),
                              (1, (1, 1, 0)))
    def test_minmax_normalise(self, axis, valid):
        x = gaussian(53, 3, 4, 5, scale=10.0)
        x[1, 2] = 7.0  # a constant row: span 0 along axis 2 there
        valid = None if valid is None else np.asarray(valid, bool)
        out = self.variant(functools.partial(postprocess.minmax_normalise, axis=axis))(x, valid=valid)
        ref = np_minmax_masked(x, axis, np.ones(3, bool) if valid is None else valid)
        close(out, ref, 1e-6)  # (x − lo)/(hi − lo) in float32, result in [0, 1]

    @VARIANTS
    def test_minmax_constant_is_zero(self):
        out = self.variant(postprocess.minmax_normalise)(np.full((2, 3), 4.5, np.float32))
        np.testing.assert_array_equal(np.asarray(out), np.zeros((2, 3)))


# ------------------------------------------------------------------ views
class ViewsVariantsTest(chex.TestCase):

    @VARIANTS
    @parameterized.parameters(True, False)
    def test_affine_sample(self, align_corners):
        pixels = gaussian(60, 2, 9, 7, 3)
        rng = np.random.default_rng(61)
        thetas = [views.rotation_theta(a) for a in views.ROTATION_ANGLES[::3]]
        thetas += [views.translation_theta(*t) for t in views.TRANSLATIONS[::3]]
        # random affine maps reaching far outside [-1, 1], so the reflection folds more than once
        thetas += [rng.uniform(-2.5, 2.5, size=(2, 3)).astype(np.float32) for _ in range(3)]
        fn = self.variant(functools.partial(views.affine_sample, align_corners=align_corners))
        for theta in thetas:
            # float32 source coordinates: a rounding of ~1e-6·W pixels times a slope of O(1) per pixel
            close(fn(pixels, theta), np_affine_sample(pixels, theta, align_corners), 2e-5)

    @VARIANTS
    @parameterized.parameters(False, True)
    def test_grayscale(self, pixel_space):
        pixels = gaussian(62, 2, 4, 5, 3)
        kw = dict(mean=views.CLIP_MEAN, std=views.CLIP_STD) if pixel_space else {}
        out = self.variant(functools.partial(views.grayscale, **kw))(pixels)
        x = pixels.astype(np.float64)
        mean, std = np.asarray(views.CLIP_MEAN), np.asarray(views.CLIP_STD)
        if pixel_space:
            x = x * std + mean
        gray = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]  # kornia rgb_to_grayscale
        ref = np.repeat(gray[..., None], 3, axis=-1)
        if pixel_space:
            ref = (ref - mean) / std
        close(out, ref, 1e-6 if not pixel_space else 5e-6)  # /std ≈ 1/0.27 scales float32 rounding by ~4


# ------------------------------------------------------------------ methods
class MethodVariantsTest(chex.TestCase):

    @VARIANTS
    @parameterized.parameters(1.0, 100.0)
    def test_text_alignment(self, tau):
        embeds, text = gaussian(70, 3, 7, D), gaussian(71, 2, D)
        out = self.variant(functools.partial(fj.methods.text_alignment, tau=tau))(embeds, text)
        # τ = 100 multiplies float32 cosine rounding (~1e-7) by 100 before a softmax of slope ≤ ¼
        close(out, np_text_alignment(embeds.astype(np.float64), text.astype(np.float64), tau), 1e-5)

    @VARIANTS
    @parameterized.parameters(((1,), False), ((1, 3), True), ((1, 3, 5), False))
    def test_matching_scores(self, r_list, filtered):
        tokens = gaussian(72, B, NL, G * G, W)
        allowed = (np.random.default_rng(73).random((B, G * G)) < 0.6) if filtered else np.ones((B, G * G), bool)
        fn = self.variant(functools.partial(common.matching_scores, r_list=r_list, alpha=0.3, chunk_size=2))
        patch, num_refs = fn(tokens, np.ones(B, bool), allowed)
        ref, ref_refs = np_matching(tokens, allowed, r_list, 0.3)
        np.testing.assert_array_equal(np.asarray(num_refs), ref_refs)
        close(patch, ref, 1e-5)  # mean of float32 distances between unit vectors

    @VARIANTS
    def test_musc_score(self):
        config = fj.MuScConfig()  # defaults: r (1, 3, 5), k (1, 2, 3), the default σ
        f = method_feats(80)
        det = self.variant(functools.partial(config.score, size=S))(f, None, jnp.ones(B, bool))
        scores, maps, refs = np_musc(f["tokens"], f["cls"], S, config)
        np.testing.assert_array_equal(np.asarray(det.num_refs), refs)
        close(det.anomaly_maps, maps, 1e-5)  # patch scores (1e-5 class) through interpolation and blur
        close(det.image_scores, scores, 2e-5)  # ... then min-max over the batch inside RsCIN

    @VARIANTS
    @parameterized.parameters(
        dict(),  # the defaults: threshold filter at θ = 0.5 with τ = 100, min-max fusion, "sum" score
        dict(text_filter="share", rho=0.3, image_score="max", r_list=(1,)),
        dict(fusion_norm="fixed", match_scale=2.0, fusion_weight=0.7, tau=5.0, r_list=(3,)))
    def test_fiseclip_score(self, **fields):
        config = fj.FiSeCLIPConfig(**fields)
        f, text = method_feats(81), gaussian(82, 2, D)
        det = self.variant(functools.partial(config.score, size=S))(f, text, jnp.ones(B, bool))
        scores, maps, refs = np_fiseclip(f["tokens"], f["local"], f["cls"], text, S, config)
        np.testing.assert_array_equal(np.asarray(det.num_refs), refs)
        assert (refs > 0).all()  # the reference filter left every image something to match
        close(det.anomaly_maps, maps, 2e-5)  # matching scores min-max normalised over the batch
        close(det.image_scores, scores, 2e-5)

    @VARIANTS
    @parameterized.parameters(0, 22)
    def test_anoclip_score(self, n_views):
        config = fj.AnoCLIPConfig()
        f, text = method_feats(83, views_=n_views), gaussian(84, 2, D)
        det = self.variant(functools.partial(config.score, size=S))(f, text, jnp.ones(B, bool))
        scores, maps = np_anoclip(f["local"], f["cls"], text, S, config)
        np.testing.assert_array_equal(np.asarray(det.num_refs), -np.ones(B))  # AnoCLIP does not match
        close(det.anomaly_maps, maps, 1e-6)  # τ = 1 softmax of cosines, 3×3 mean, two-tap interpolation
        close(det.image_scores, scores, 1e-6)

    @VARIANTS
    @parameterized.parameters(("text", 2), ("linear", 2))
    def test_anoclip_plus_score(self, kind, steps):
        """AnoCLIP+ (SPEC §4.5): the map of z' from the adapter that `steps` AdamW steps fit per image.

        Oracle: the documented key schedule of methods/tta.py (k_i = fold_in(key(seed), i);
        (init, noise) = split(k_i); W, b ~ U(±1/√D) from split(init); step s's noise from
        split(noise, steps)[s]) drawn with jax.random, then torch float64 AdamW on the SPEC
        §4.5 loss written in torch here, then the numpy AnoCLIP map of z'.
        """
        m = 3  # sentences per side
        text = TextFeatures(*(jnp.asarray(unit(gaussian(90 + i, n, D)), jnp.float32)
                              for i, n in enumerate((2, m, m))))
        config = fj.AnoCLIPConfig(tta=fj.TTAConfig(adapter=kind, steps=steps, seed=4))
        f = method_feats(85, b=3)
        f["local"] = 3.0 * f["local"]
        det = self.variant(functools.partial(config.score, size=S))(f, text, jnp.ones(3, bool))

        t = np.asarray(text.features, np.float64)
        sent = np.concatenate([text.normal_sentences, text.abnormal_sentences]).astype(np.float64)
        adapted = []
        for i, z in enumerate(f["local"]):
            k_init, k_noise = jax.random.split(jax.random.fold_in(jax.random.key(config.tta.seed), i))
            kw, kb = jax.random.split(k_init)
            bound = 1.0 / math.sqrt(D)
            rows = 2 * m if kind == "text" else D
            w = np.asarray(jax.random.uniform(kw, (rows, D), jnp.float32, -bound, bound), np.float64)
            b = np.asarray(jax.random.uniform(kb, (rows,), jnp.float32, -bound, bound), np.float64)
            noise = [np.asarray(config.tta.noise_sigma * jax.random.normal(k, z.shape), np.float64)
                     for k in jax.random.split(k_noise, steps)]
            w, b = torch_adamw(w, b, z.astype(np.float64), noise, t, sent, kind, config.tta)
            adapted.append(np_apply_adapter(w, b, z, sent, kind))
        scores, maps = np_anoclip(np.stack(adapted), f["cls"], t, S, config)
        # maps sit within ~1e-3 of ½ (τ = 1): the float32 adapter output carries ~1e-7 of rounding
        close(det.anomaly_maps, maps, 1e-6)
        close(det.image_scores, scores, 1e-6)  # AnoCLIP's image score, unchanged by the adapter (§4.5)

    @VARIANTS
    @parameterized.parameters("text", "linear")
    def test_apply_adapter(self, kind):
        rows = 8 if kind == "text" else D
        params = {"w": gaussian(100, rows, D, scale=0.4), "b": gaussian(101, rows, scale=0.4)}
        z, sent = gaussian(102, 2, 7, D, scale=3.0), unit(gaussian(103, 8, D))
        fn = self.variant(functools.partial(tta.apply_adapter, kind=kind))
        out = fn(params, z, sent if kind == "text" else None)
        ref = np_apply_adapter(params["w"], params["b"], z, sent, kind)
        close(out, ref, 1e-5)  # O(3) values: a few float32 ulps of 3

    @VARIANTS
    @parameterized.parameters(("text", 0.5, 1), ("linear", 0.5, 1), ("text", 0.7, 3))
    def test_tta_loss(self, kind, hard_weight, copies):
        rows = 8 if kind == "text" else D
        params = {"w": gaussian(110, rows, D, scale=0.4), "b": gaussian(111, rows, scale=0.4)}
        z = gaussian(112, 9, D, scale=3.0)
        noisy = z + gaussian(113, copies, 9, D, scale=0.3)
        text, sent = unit(gaussian(114, 2, D)), unit(gaussian(115, 8, D))
        config = fj.TTAConfig(adapter=kind, hard_weight=hard_weight)
        fn = self.variant(functools.partial(tta.tta_loss, config=config))
        loss = fn(params, z, noisy, text, sent if kind == "text" else None)
        ref = np_tta_loss(params["w"], params["b"], z, noisy, text, sent, kind, hard_weight)
        close(loss, ref, 1e-5)  # a mean of logs of probabilities near ½: float32 rounding of ~1.5


def torch_adamw(w, b, z, noise, text, sentences, kind, config):
    """`len(noise)` torch.optim.AdamW steps (float64) on the SPEC §4.5 loss of one image -> (w, b)."""
    if not noise:
        return w, b
    import torch

    t64 = functools.partial(torch.tensor, dtype=torch.float64)
    w_t, b_t = t64(w).requires_grad_(), t64(b).requires_grad_()
    text_t, sent_t, z_t = t64(text), t64(sentences), t64(z)
    text_t = text_t / text_t.norm(dim=-1, keepdim=True)

    def log_probs(v):
        h = torch.nn.functional.linear(v / v.norm(dim=-1, keepdim=True), w_t, b_t)
        if kind == "text":
            h = torch.tanh(h) @ sent_t
        v = 0.5 * v + 0.5 * h
        return torch.log_softmax((v / v.norm(dim=-1, keepdim=True)) @ text_t.T, dim=-1)

    opt = torch.optim.AdamW([w_t, b_t], lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    for eps in noise:
        opt.zero_grad()
        lp0, lp1 = log_probs(z_t), log_probs(z_t + t64(eps))
        entropy = -(lp0.exp() * lp0).sum(-1).mean()
        loss = entropy + config.hard_weight * (-lp1[:, 1].mean() - lp0[:, 0].mean())
        loss.backward()
        opt.step()
    return w_t.detach().numpy(), b_t.detach().numpy()
