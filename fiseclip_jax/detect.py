"""`detect` (one batch, one jit per shape) and `detect_category` (a whole category in batches)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .clip.config import CLIPConfig
from .clip.modeling import encode_image
from .clip.preprocess import preprocess
from .distributed import pad_batch, replicate, shard_batch, sharded_encode_features
from .methods.configs import AnoCLIPConfig, FiSeCLIPConfig, MuScConfig, default_match_layers
from .methods.scoring import Detection, score_anoclip, score_fiseclip, score_musc
from .prompts import TextFeatures, text_features_full

MethodConfig = MuScConfig | FiSeCLIPConfig | AnoCLIPConfig


def method_clip_config(cfg: CLIPConfig, config) -> CLIPConfig:
    """MuSc may override the activation (SPEC §8); other methods use the weights' own."""
    act = getattr(config, "act", None)
    return cfg.replace(act=act) if act else cfg


def _match_layers(cfg, config):
    return tuple(config.layers) if config.layers else default_match_layers(cfg.vision.layers)


def encode_features(params, cfg: CLIPConfig, pixels, config) -> dict:
    """Everything the method needs from one forward pass (SPEC §4.3 step 1). Pure, jit-able."""
    cfg = method_clip_config(cfg, config)
    if isinstance(config, AnoCLIPConfig):
        n = config.local_blocks or cfg.vision.layers
        out = encode_image(params, cfg, pixels, local="vv", local_blocks=n)
        cls = out["image_embeds"]
        if config.views:
            from .views import anoclip_views

            views = anoclip_views(pixels)  # [V, B, S, S, 3]
            cls = jax.lax.map(lambda v: encode_image(params, cfg, v)["image_embeds"], views)
        return {"local": out["local_embeds"], "cls": cls}
    layers = _match_layers(cfg, config)
    local = getattr(config, "local", None)
    out = encode_image(params, cfg, pixels, layers=layers, local=local,
                       local_blocks=getattr(config, "local_blocks", 1))
    feats = {"tokens": jnp.stack([out["block_tokens"][l][:, 1:] for l in layers], axis=1),
             "cls": out["image_embeds"]}
    if local is not None:
        feats["local"] = out["local_embeds"]
    return feats


def score_features(feats, text, valid, config, size: int, mesh=None) -> Detection:
    """Scores and maps of one batch from its features. Pure, jit-able (config, size, mesh static).

    With a `mesh`, MuSc/FiSeCLIP matching runs as `distributed.ring_mutual_scores` over it."""
    if isinstance(config, MuScConfig):
        return score_musc(feats, valid, config, size, mesh)
    if isinstance(config, FiSeCLIPConfig):
        return score_fiseclip(feats, text.features, valid, config, size, mesh)
    if isinstance(config, AnoCLIPConfig):
        if config.tta is not None:
            from .tta import adapt_tokens

            local = adapt_tokens(feats["local"], text, config.tta, valid=valid)
            return score_anoclip(feats, text.features, valid, config, size, local=local)
        return score_anoclip(feats, text.features, valid, config, size)
    raise TypeError(f"unknown method config {type(config).__name__}")


def _as_text(text) -> TextFeatures:
    if isinstance(text, TextFeatures):
        return text
    text = jnp.asarray(text)
    if text.shape[:1] != (2,):
        raise ValueError(f"text must be TextFeatures or [2, D] (normal, abnormal), got {text.shape}")
    empty = jnp.zeros((0, text.shape[1]), text.dtype)
    return TextFeatures(text, empty, empty)


@functools.partial(jax.jit, static_argnames=("cfg", "config"))
def _detect(params, cfg, pixels, text, valid, config):
    feats = encode_features(params, cfg, pixels, config)
    return score_features(feats, text, valid, config, pixels.shape[1])


def detect(params, cfg: CLIPConfig, pixels, text, config: MethodConfig, valid=None, *, mesh=None) -> Detection:
    """One method over one batch of one category: Detection(image_scores [B], anomaly_maps [B, S, S]).

    pixels: CLIP-normalised [B, S, S, 3]; text: [2, D] features or `TextFeatures`;
    valid: [B] bool marks real images in a padded batch. Compiled once per shape.
    MuSc and FiSeCLIP treat the batch as the reference set (MuSc: pass the whole category).
    mesh: optional `jax.sharding.Mesh` (`distributed.make_mesh`): the batch is split over its
    devices for encoding (B padded to a multiple of the device count) and matching runs on the
    device ring; the result equals the single-device one.
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    valid = jnp.ones(pixels.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    if mesh is None:
        return _detect(params, cfg, pixels, _as_text(text), valid, config)
    b = pixels.shape[0]
    params, text = replicate((params, _as_text(text)), mesh)
    feats, _ = sharded_encode_features(params, cfg, pixels, config, mesh, return_valid=True)
    valid_pad, _ = pad_batch(np.asarray(valid), mesh.size)  # padding rows are False
    valid_pad = shard_batch(valid_pad, mesh)
    det = _score_jit(feats, text, valid_pad, config, pixels.shape[1], mesh)
    return Detection(*(a[:b] for a in det))


# ------------------------------------------------------------------ categories
@dataclasses.dataclass
class CategoryResult:
    image_scores: np.ndarray  # [N]
    anomaly_maps: np.ndarray  # [N, S, S]
    num_refs: np.ndarray  # [N]


def _load(item, size, resample):
    if isinstance(item, (str, Path)):
        from .data import load_image

        item = load_image(item)
    return preprocess([item], size, resample)[0]


_encode_jit = jax.jit(encode_features, static_argnames=("cfg", "config"))
_score_jit = jax.jit(score_features, static_argnames=("config", "size", "mesh"))


def _batches(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _pad(x, b):
    pad = b - x.shape[0]
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x


def detect_category(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, config: MethodConfig, *,
                    size: int, encode_batch: int = 8, resample: str = "bicubic", text=None,
                    progress: bool | Callable = True, mesh=None) -> CategoryResult:
    """Run a whole category: images are paths, PIL images or uint8 HWC arrays.

    MuSc (and FiSeCLIP with batch_size 0) encode in batches of `encode_batch`, then score
    the whole category at once; FiSeCLIP scores batches of `config.batch_size`; AnoCLIP
    scores batches of `encode_batch`. The last partial batch is padded and masked, so
    one compilation serves every batch. With a `mesh` (`distributed.make_mesh`, one process),
    each batch is split over its devices (parameters replicated) and matching runs as
    `ring_mutual_scores`; `encode_batch` is then the global batch.
    """
    n = len(images)
    if n == 0:
        raise ValueError(f"no images for category {class_name!r}")
    if text is not None:
        text = _as_text(text)
    elif hasattr(config, "prompts"):
        text = text_features_full(params, cfg, class_name, config.prompts)
    else:  # MuSc uses no text
        text = _as_text(jnp.zeros((2, cfg.embed_dim)))
    whole = isinstance(config, MuScConfig) or (isinstance(config, FiSeCLIPConfig)
                                               and (config.batch_size == 0 or config.batch_size >= n))
    group = encode_batch if (whole or isinstance(config, AnoCLIPConfig)) else config.batch_size
    if mesh is not None:  # once, on every device of the mesh
        params, text = replicate((params, text), mesh)
    encode = _encode_jit if mesh is None else functools.partial(sharded_encode_features, mesh=mesh)
    bar = _progress(progress, n, class_name)
    scores, maps, refs, feats = [], [], [], []
    for lo, hi in _batches(n, group):
        pixels = _pad(np.stack([_load(im, size, resample) for im in images[lo:hi]]), group)
        valid = np.arange(group) < hi - lo
        if whole:
            f = encode(params, cfg, jnp.asarray(pixels), config)
            feats.append(jax.tree.map(lambda a: np.asarray(a)[: hi - lo], f))
        else:
            det = detect(params, cfg, pixels, text, config, valid, mesh=mesh)
            scores.append(np.asarray(det.image_scores)[: hi - lo])
            maps.append(np.asarray(det.anomaly_maps)[: hi - lo])
            refs.append(np.asarray(det.num_refs)[: hi - lo])
        bar.update(hi - lo)
    if whole:
        bar.set_postfix_str("matching")
        all_feats = jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *feats)
        det = _score_jit(all_feats, text, jnp.ones(n, bool), config, size, mesh)
        scores, maps, refs = [np.asarray(det.image_scores)], [np.asarray(det.anomaly_maps)], [np.asarray(det.num_refs)]
    bar.close()
    result = CategoryResult(np.concatenate(scores), np.concatenate(maps), np.concatenate(refs))
    if (result.num_refs == 0).any():
        warnings.warn(f"{int((result.num_refs == 0).sum())} image(s) of {class_name!r} had no reference image "
                      "to match against (batch of one, or every reference filtered): text-only maps",
                      stacklevel=2)
    return result


def _progress(progress, total, desc):
    from tqdm.auto import tqdm

    if callable(progress) and not isinstance(progress, bool):
        return progress(total=total, desc=desc)
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
