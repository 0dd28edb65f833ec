"""Independent numpy (float64) implementations of the SPEC §4 batch scoring, for tests.

They share no code with fiseclip_jax: scipy's cdist, uniform_filter and gaussian_filter,
an explicit bilinear formula, and loops.
"""

import math

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import cdist


def np_text_alignment(embeds, text, tau):
    f = embeds / np.linalg.norm(embeds, axis=-1, keepdims=True)
    t = text / np.linalg.norm(text, axis=-1, keepdims=True)
    logits = tau * (f @ t.T)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[..., 1]


def np_lnamd(tokens, r):
    n, p, c = tokens.shape
    g = int(round(math.sqrt(p)))
    out = np.empty_like(tokens, dtype=np.float64)
    for i in range(n):
        x = tokens[i].astype(np.float64)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
        m = x.reshape(g, g, c)
        if r > 1:
            m = ndimage.uniform_filter(m, size=(r, r, 1), mode="constant", cval=0.0)
        x = m.reshape(p, c)
        out[i] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return out


def np_mutual(z, allowed, alpha):
    n, p, _ = z.shape
    scores, refs_count = np.zeros((n, p)), np.zeros(n, int)
    for i in range(n):
        refs = [j for j in range(n) if j != i and allowed[j].any()]
        refs_count[i] = len(refs)
        if not refs:
            continue
        d = np.stack([cdist(z[i], z[j][allowed[j]]).min(1) for j in refs], axis=1)  # [P, refs]
        k = max(1, math.floor(alpha * len(refs)))
        scores[i] = np.sort(d, axis=1)[:, :k].mean(1)
    return scores, refs_count


def np_matching(tokens, allowed, r_list, alpha):
    """tokens [B, nL, P, W] -> mean over r of the mean over layers."""
    per_r = []
    for r in r_list:
        per_r.append(np.mean([np_mutual(np_lnamd(tokens[:, l], r), allowed, alpha)[0]
                              for l in range(tokens.shape[1])], axis=0))
    return np.mean(per_r, axis=0), np_mutual(np_lnamd(tokens[:, 0], 1), allowed, alpha)[1]


def np_bilinear_align_corners(m, size):
    h, w = m.shape
    ys, xs = np.linspace(0, h - 1, size), np.linspace(0, w - 1, size)
    out = np.empty((size, size))
    for a, y in enumerate(ys):
        y0 = min(int(np.floor(y)), h - 2) if h > 1 else 0
        fy = y - y0
        for b, x in enumerate(xs):
            x0 = min(int(np.floor(x)), w - 2) if w > 1 else 0
            fx = x - x0
            out[a, b] = ((1 - fy) * (1 - fx) * m[y0, x0] + (1 - fy) * fx * m[y0, x0 + 1]
                         + fy * (1 - fx) * m[y0 + 1, x0] + fy * fx * m[y0 + 1, x0 + 1])
    return out


def np_minmax(x):
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def to_maps(patch, size):
    g = int(round(math.sqrt(patch.shape[1])))
    return np.stack([np_bilinear_align_corners(p.reshape(g, g), size) for p in patch])


def np_fiseclip(tokens, local, cls, text, size, c):
    """SPEC §4.3 steps 2–7 for one batch (no padding)."""
    a_txt = np_text_alignment(local, text, c.tau)
    if c.text_filter == "threshold":
        allowed = a_txt < c.theta
    else:
        keep = max(1, int(round((1 - c.rho) * a_txt.shape[1])))
        allowed = np.argsort(np.argsort(a_txt, axis=1, kind="stable"), axis=1) < keep
    a_match, refs = np_matching(tokens, allowed, c.r_list, c.alpha)
    if c.fusion_norm == "minmax":  # over the images that had at least one reference
        has = refs > 0
        norm = np.zeros_like(a_match)
        if has.any():
            lo, hi = a_match[has].min(), a_match[has].max()
            norm[has] = 0.0 if hi == lo else (a_match[has] - lo) / (hi - lo)
    else:
        norm = a_match / c.match_scale
    fused = c.fusion_weight * norm + (1 - c.fusion_weight) * a_txt
    fused = np.where(refs[:, None] > 0, fused, a_txt)
    maps = np.stack([ndimage.gaussian_filter(m, c.sigma) for m in to_maps(fused, size)])
    mx = maps.reshape(len(maps), -1).max(1)
    if c.image_score == "max":
        return mx, maps, refs
    cls_score = np_text_alignment(cls, text, c.tau)
    return 0.5 * (np_minmax(mx) + np_minmax(cls_score)), maps, refs


def np_rscin(scores, cls, k_list):
    s = np_minmax(scores)
    g = cls / np.linalg.norm(cls, axis=-1, keepdims=True)
    w = g @ g.T
    out = []
    for k in k_list:
        pk = np.zeros_like(w)
        for i in range(len(w)):
            idx = np.argsort(-w[i])[:k]
            pk[i, idx] = w[i, idx]
        pk /= pk.sum(1, keepdims=True)
        out.append(pk @ s)
    return np.mean(out, axis=0)


def np_musc(tokens, cls, size, c):
    patch, refs = np_matching(tokens, np.ones((tokens.shape[0], tokens.shape[2]), bool), c.r_list, c.alpha)
    up = to_maps(patch, size)
    scores = np_rscin(up.reshape(len(up), -1).max(1), cls, c.k_list)
    return scores, np.stack([ndimage.gaussian_filter(m, c.sigma) for m in up]), refs


def np_anoclip(local, cls, text, size, c):
    a = np_text_alignment(local, text, c.tau)
    g = int(round(math.sqrt(a.shape[1])))
    grids = a.reshape(-1, g, g)
    if c.mean_filter > 1:
        grids = np.stack([ndimage.uniform_filter(m, c.mean_filter, mode="nearest") for m in grids])
    maps = np.stack([np_bilinear_align_corners(m, size) for m in grids])
    probs = np_text_alignment(cls, text, c.tau)
    return (probs.mean(1) if cls.ndim == 3 else probs), maps  # cls [B, V, D] with views
