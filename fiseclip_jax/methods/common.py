"""Pieces several methods share: the text branch (SPEC §4.1), MuSc-style matching over layers and
r (SPEC §4.2, used by FiSeCLIP too) and the matching-token encoder. Pure and jit-able."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from ..clip.modeling import encode_image
from ..matching import lnamd, mutual_scores
from ..ring import ring_mutual_scores


def default_match_layers(n_layers: int) -> tuple[int, ...]:
    """MuSc's blocks: {6,12,18,24} for 24-block ViT-L, {3,6,9,12} for ViT-B (1-indexed)."""
    q = n_layers // 4
    return tuple(q * i for i in range(1, 5)) if q else (n_layers,)


def match_layers(cfg, layers) -> tuple[int, ...]:
    """The configured matching blocks, or the default for this tower depth."""
    return tuple(layers) if layers else default_match_layers(cfg.vision.layers)


def encode_matching(params, cfg, pixels, layers, local=None, local_blocks=1) -> dict:
    """One forward pass (SPEC §4.3 step 1): {"tokens" [B, nL, P, W] residual-stream patch tokens after
    `layers` (CLS dropped), "cls" [B, D], and with `local` also "local" [B, P, D]}."""
    out = encode_image(params, cfg, pixels, layers=layers, local=local, local_blocks=local_blocks)
    feats = {"tokens": jnp.stack([out["block_tokens"][l][:, 1:] for l in layers], axis=1),
             "cls": out["image_embeds"]}
    if local is not None:
        feats["local"] = out["local_embeds"]
    return feats


def text_alignment(embeds, text, tau):
    """[..., D] image-side embeddings, [2, D] text -> [...] abnormal probability (SPEC §4.1)."""
    chex.assert_shape(text, (2, embeds.shape[-1]))
    f = embeds / jnp.linalg.norm(embeds, axis=-1, keepdims=True)
    t = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return jax.nn.softmax(tau * (f @ t.T), axis=-1)[..., 1]


def matching_scores(tokens, valid, allowed, r_list, alpha, chunk_size, mesh=None):
    """[B, nL, P, W] -> ([B, P] mean over r of the mean over layers of mutual scores, [B] refs).

    With a `mesh` the images are split over its devices and matched by `ring_mutual_scores`.
    """
    chex.assert_rank(tokens, 4)
    chex.assert_shape(valid, tokens.shape[:1])
    match = mutual_scores if mesh is None else functools.partial(ring_mutual_scores, mesh=mesh)
    _, n_layers, p, _ = tokens.shape
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


def grid_maps(patch_scores):
    """[B, P] -> [B, g, g] on the square patch grid."""
    b, p = patch_scores.shape
    g = int(round(p ** 0.5))
    return patch_scores.reshape(b, g, g)


# ------------------------------------------------------------------ reference-bank helpers
def masked_range(x, ok):
    """[K] values, [K] bool -> (min, max) over the ok entries ((inf, -inf) when none is)."""
    return jnp.min(jnp.where(ok, x, jnp.inf)), jnp.max(jnp.where(ok, x, -jnp.inf))


def scale_to(x, lo, hi):
    """(x − lo)/(hi − lo): min-max with a range fixed elsewhere (a bank's normal images); 0 for an empty range."""
    span = hi - lo
    ok = jnp.isfinite(span) & (span > 0)
    return jnp.where(ok, (x - jnp.where(ok, lo, 0.0)) / jnp.where(ok, span, 1.0), 0.0)


def map_stats(maps) -> dict:
    """[B, S, S] -> {"map_min" [B], "map_max" [B]}: what a bank records per image (overlay scale, scores)."""
    return {"map_min": jnp.min(maps, axis=(1, 2)), "map_max": jnp.max(maps, axis=(1, 2))}
