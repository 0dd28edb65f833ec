"""Per-batch scoring of each method from encoded features (SPEC §4). Pure, jit-able.

Features come from `encode_features` in `fiseclip_jax.detect`:
    tokens [B, nL, P, W]  residual-stream patch tokens after the matching blocks
    local  [B, P, D]      projected local-path patch tokens
    cls    [B, D]         projected CLS embeddings (all views for AnoCLIP: [V, B, D])
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..distributed import ring_mutual_scores
from ..matching import lnamd, mutual_scores
from ..postprocess import gaussian_blur, mean_filter, minmax_normalise, upsample_bilinear
from ..rscin import rscin


class Detection(NamedTuple):
    """image_scores [B]; anomaly_maps [B, S, S]; num_refs [B] references each image was matched
    against (0: no reference, the map fell back to text only; -1: the method does not match)."""

    image_scores: jnp.ndarray
    anomaly_maps: jnp.ndarray
    num_refs: jnp.ndarray


def text_alignment(embeds, text, tau):
    """[..., D] image-side embeddings, [2, D] text -> [...] abnormal probability (SPEC §4.1)."""
    f = embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)
    t = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return jax.nn.softmax(tau * (f @ t.T), axis=-1)[..., 1]


def matching_scores(tokens, valid, allowed, r_list, alpha, chunk_size, mesh=None):
    """[B, nL, P, W] -> ([B, P] mean over r of the mean over layers of mutual scores, [B] refs).

    With a `mesh` the images are split over its devices and matched by `ring_mutual_scores`.
    """
    match = mutual_scores if mesh is None else functools.partial(ring_mutual_scores, mesh=mesh)
    b, n_layers, p, _ = tokens.shape
    grid = int(round(p ** 0.5))
    per_r = []
    num_refs = None
    for r in r_list:
        layer_scores = []
        for layer in range(n_layers):
            z = lnamd(tokens[:, layer], grid, r)
            out = match(z, allowed, valid, alpha=alpha, chunk_size=chunk_size)
            layer_scores.append(out.scores)
            num_refs = out.num_refs
        per_r.append(jnp.mean(jnp.stack(layer_scores), axis=0))
    return jnp.mean(jnp.stack(per_r), axis=0), num_refs


def _grid_maps(patch_scores):
    b, p = patch_scores.shape
    g = int(round(p ** 0.5))
    return patch_scores.reshape(b, g, g)


def score_musc(feats, valid, config, size, mesh=None):
    """MuSc (SPEC §4.2): mutual scores, Gaussian-blurred map, max then RsCIN over the batch."""
    patch, num_refs = matching_scores(feats["tokens"], valid, None, config.r_list, config.alpha,
                                      config.chunk_size, mesh)
    up = upsample_bilinear(_grid_maps(patch), size, config.align_corners)
    raw = jnp.max(up, axis=(1, 2))
    scores = rscin(raw, feats["cls"], config.k_list, valid=valid)
    maps = gaussian_blur(up, config.sigma)
    return Detection(scores, maps * valid[:, None, None], num_refs)


def reference_filter(a_txt, valid, config):
    """[B, P] allowed reference patches (SPEC §4.3 step 3): text filters the references."""
    if config.text_filter == "threshold":
        allowed = a_txt < config.theta
    else:  # keep the (1 - rho) share of each image's patches with the lowest text score
        p = a_txt.shape[1]
        keep = max(1, int(round((1.0 - config.rho) * p)))
        rank = jnp.argsort(jnp.argsort(a_txt, axis=1), axis=1)
        allowed = rank < keep
    return allowed & valid[:, None]


def score_fiseclip(feats, text, valid, config, size, mesh=None):
    """FiSeCLIP reconstruction (SPEC §4.3 steps 2–7)."""
    a_txt = text_alignment(feats["local"], text, config.tau)  # step 2
    allowed = reference_filter(a_txt, valid, config)  # step 3
    a_match, num_refs = matching_scores(feats["tokens"], valid, allowed, config.r_list, config.alpha,
                                        config.chunk_size, mesh)  # step 4
    if config.fusion_norm == "minmax":  # step 5: matching filters the text
        # images without any reference (score 0) must not set the batch minimum
        a_match = minmax_normalise(a_match, valid=valid & (num_refs > 0))
    else:
        a_match = a_match / config.match_scale
    fused = config.fusion_weight * a_match + (1.0 - config.fusion_weight) * a_txt
    fused = jnp.where(num_refs[:, None] > 0, fused, a_txt)  # no reference: text only
    maps = gaussian_blur(upsample_bilinear(_grid_maps(fused), size, config.align_corners), config.sigma)
    maps = maps * valid[:, None, None]
    map_max = jnp.max(maps, axis=(1, 2))  # step 7
    if config.image_score == "max":
        scores = map_max
    else:
        cls_score = text_alignment(feats["cls"], text, config.tau)
        scores = 0.5 * (minmax_normalise(map_max, valid=valid) + minmax_normalise(cls_score, valid=valid))
    return Detection(scores * valid, maps, num_refs)


def score_anoclip(feats, text, valid, config, size, local=None):
    """AnoCLIP (SPEC §4.4): τ = 1 softmax of cosines, 3×3 replicate mean filter, bilinear up."""
    local = feats["local"] if local is None else local
    grid_maps = _grid_maps(text_alignment(local, text, config.tau))
    if config.mean_filter > 1:
        grid_maps = mean_filter(grid_maps, config.mean_filter, padding="replicate")
    maps = upsample_bilinear(grid_maps, size, config.align_corners) * valid[:, None, None]
    cls = feats["cls"]
    probs = text_alignment(cls, text, config.tau)  # [B] or [V, B] with views
    scores = probs.mean(0) if cls.ndim == 3 else probs
    return Detection(scores * valid, maps, jnp.full(valid.shape, -1, jnp.int32))
