"""MuSc's default map is the authors' (SPEC §4.2): on real MVTec bottle images, `detect` with the default
`MuScConfig` equals a numpy MuSc written here in the structure of the authors' code (xrli-U/MuSc: LNAMD,
MSM, bilinear upsampling with align_corners=True, RsCIN), run on our own tokens. It shares no code with
fiseclip_jax's matching, post-processing or RsCIN."""

import math

import jax
import numpy as np
from PIL import Image

import fiseclip_jax as fj

SIZE = 64  # tiny CLIP, patch 8: an 8 x 8 grid


def ln_amd(tokens, r):
    """[N, P, C] one layer's patch tokens -> [N, P, C]: LayerNorm over each image's [C, H, W] (no affine,
    eps 1e-5), an r x r unfold with zero padding averaged per channel, L2-normalised."""
    n, p, c = tokens.shape
    g = int(round(math.sqrt(p)))
    out = np.empty((n, p, c))
    pad = (r - 1) // 2
    for i in range(n):
        x = tokens[i].astype(np.float64)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
        grid = np.pad(x.reshape(g, g, c), ((pad, pad), (pad, pad), (0, 0)))
        agg = np.empty((g, g, c))
        for y in range(g):
            for xx in range(g):
                agg[y, xx] = grid[y:y + r, xx:xx + r].reshape(r * r, c).mean(0)
        z = agg.reshape(p, c)
        out[i] = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return out


def msm(z, topmin_max=0.3):
    """[N, P, C] -> [N, P]: per image, the min distance of each patch to every other image, then the mean
    of the int(0.3 (N - 1)) smallest of those N - 1 values."""
    n = z.shape[0]
    out = np.empty(z.shape[:2])
    for i in range(n):
        cols = []
        for j in range(n):
            if j != i:
                d = np.sqrt(((z[i][:, None, :] - z[j][None, :, :]) ** 2).sum(-1))  # [P, P]
                cols.append(d.min(1))
        d = np.stack(cols, 1)
        k = int(d.shape[1] * topmin_max)
        out[i] = np.sort(d, axis=1)[:, :k].mean(1)
    return out


def bilinear_align_corners(m, size):
    h, w = m.shape
    out = np.empty((size, size))
    for a in range(size):
        y = a * (h - 1) / (size - 1)
        y0 = min(int(y), h - 2)
        for b in range(size):
            x = b * (w - 1) / (size - 1)
            x0 = min(int(x), w - 2)
            fy, fx = y - y0, x - x0
            out[a, b] = ((1 - fy) * (1 - fx) * m[y0, x0] + (1 - fy) * fx * m[y0, x0 + 1]
                         + fy * (1 - fx) * m[y0 + 1, x0] + fy * fx * m[y0 + 1, x0 + 1])
    return out


def rscin(scores, cls, k_list):
    s = (scores - scores.min()) / (scores.max() - scores.min())
    g = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
    w = g @ g.T
    per_k = []
    for k in k_list:
        kept = np.zeros_like(w)
        for i in range(len(w)):
            top = np.argsort(-w[i])[:k]
            kept[i, top] = w[i, top]
        per_k.append((kept / kept.sum(1, keepdims=True)) @ s)
    return np.mean(per_k, axis=0)


def numpy_musc(tokens, cls, size, r_list=(1, 3, 5), k_list=(1, 2, 3)):
    """tokens [N, layers, P, C], cls [N, D] -> (image scores [N], maps [N, size, size])."""
    per_r = [np.mean([msm(ln_amd(tokens[:, l], r)) for l in range(tokens.shape[1])], axis=0) for r in r_list]
    patch = np.mean(per_r, axis=0)
    g = int(round(math.sqrt(patch.shape[1])))
    maps = np.stack([bilinear_align_corners(p.reshape(g, g), size) for p in patch])
    return rscin(maps.reshape(len(maps), -1).max(1), np.asarray(cls, np.float64), k_list), maps


def bottle_images(root, n_good=4, n_bad=4):
    test = root / "bottle" / "test"
    paths = sorted((test / "good").glob("*.png"))[:n_good] + sorted((test / "broken_large").glob("*.png"))[:n_bad]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def test_default_musc_is_the_authors_map_on_real_bottles(mvtec_root):
    cfg = fj.get_config("tiny")
    # Random weights scaled x10, so tokens and CLS embeddings depend on the image as pretrained ones do: at
    # init scale every CLS is the same to 1e-7 and background patches are near-duplicates, and float32
    # rounding (which the authors' torch.cdist and topk share) then decides distances and RsCIN neighbours.
    params = jax.tree.map(lambda x: 10.0 * x, fj.init_clip(cfg, jax.random.key(0)))
    pixels = fj.preprocess(bottle_images(mvtec_root), SIZE)
    method = fj.MuScConfig()
    assert method.sigma == 0.0  # the default is the authors' map
    no_text = np.zeros((2, cfg.embed_dim), np.float32)  # MuSc has no text branch
    det = fj.detect(params, cfg, pixels, no_text, method)
    feats = jax.jit(method.encode, static_argnames="cfg")(params, cfg, pixels)
    scores, maps = numpy_musc(np.asarray(feats["tokens"]), np.asarray(feats["cls"]), SIZE)
    cls = np.asarray(feats["cls"], np.float64)
    cls /= np.linalg.norm(cls, axis=-1, keepdims=True)
    assert (cls @ cls.T).min() < 0.99  # RsCIN's neighbours are well defined

    rel = np.abs(np.asarray(det.anomaly_maps) - maps).max() / np.abs(maps).max()
    assert rel < 1e-5, rel
    np.testing.assert_allclose(det.image_scores, scores, rtol=0, atol=1e-5)
    assert np.corrcoef(np.asarray(det.anomaly_maps).ravel(), maps.ravel())[0, 1] > 0.999999

    # the Gaussian stays an option, and it is what made the maps differ from the authors'
    blurred = fj.detect(params, cfg, pixels, no_text, fj.MuScConfig(sigma=4.0))
    assert np.abs(np.asarray(blurred.anomaly_maps) - maps).max() / np.abs(maps).max() > 1e-3
