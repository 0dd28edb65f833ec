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
from .clip.preprocess import preprocess
from .data import load_image
from .distributed import pad_batch, replicate, shard_batch, sharded_encode_features
from .methods import Detection, Method, as_text
from .prompts import text_features_full


def encode_features(params, cfg: CLIPConfig, pixels, method: Method) -> dict:
    """`method.encode`: everything the method needs from one forward pass. Pure, jit-able."""
    return method.encode(params, cfg, pixels)


def score_features(feats, text, valid, method: Method, size: int, mesh=None) -> Detection:
    """`method.score`: scores and maps of one batch from its features. Pure, jit-able."""
    return method.score(feats, text, valid, size=size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _detect(params, cfg, pixels, text, valid, method):
    return method.score(method.encode(params, cfg, pixels), text, valid, size=pixels.shape[1])


def detect(params, cfg: CLIPConfig, pixels, text, method: Method, valid=None, *, mesh=None) -> Detection:
    """One method over one batch of one category: Detection(image_scores [B], anomaly_maps [B, S, S]).

    method: a method config (`fiseclip_jax.methods.get(name)`, or e.g. `FiSeCLIPConfig()`);
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
        return _detect(params, cfg, pixels, as_text(text), valid, method)
    b = pixels.shape[0]
    params, text = replicate((params, as_text(text)), mesh)
    feats, _ = sharded_encode_features(params, cfg, pixels, method, mesh, return_valid=True)
    valid_pad, _ = pad_batch(np.asarray(valid), mesh.size)  # padding rows are False
    valid_pad = shard_batch(valid_pad, mesh)
    det = _score_jit(feats, text, valid_pad, method, pixels.shape[1], mesh)
    return Detection(*(a[:b] for a in det))


# ------------------------------------------------------------------ categories
@dataclasses.dataclass
class CategoryResult:
    image_scores: np.ndarray  # [N]
    anomaly_maps: np.ndarray  # [N, S, S]
    num_refs: np.ndarray  # [N]


def _load(item, size, resample):
    if isinstance(item, (str, Path)):
        item = load_image(item)
    return preprocess([item], size, resample)[0]


_encode_jit = jax.jit(encode_features, static_argnames=("cfg", "method"))
_score_jit = jax.jit(score_features, static_argnames=("method", "size", "mesh"))


def _batches(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _pad(x, b):
    pad = b - x.shape[0]
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x


def detect_category(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *,
                    size: int, encode_batch: int = 8, resample: str = "bicubic", text=None,
                    progress: bool | Callable = True, mesh=None) -> CategoryResult:
    """Run a whole category: images are paths, PIL images or uint8 HWC arrays.

    `method.group(n, encode_batch)` says how images are scored: None (MuSc; FiSeCLIP with
    batch_size 0) encodes in batches of `encode_batch`, then scores the whole category at
    once; a number scores batches of that size. The last partial batch is padded and masked, so
    one compilation serves every batch. With a `mesh` (`distributed.make_mesh`, one process),
    each batch is split over its devices (parameters replicated) and matching runs as
    `ring_mutual_scores`; `encode_batch` is then the global batch.
    """
    n = len(images)
    if n == 0:
        raise ValueError(f"no images for category {class_name!r}")
    if text is not None:
        text = as_text(text)
    elif method.prompts is not None:
        text = text_features_full(params, cfg, class_name, method.prompts)
    else:  # a method without text
        text = as_text(jnp.zeros((2, cfg.embed_dim)))
    group = method.group(n, encode_batch)
    whole = group is None
    group = encode_batch if whole else group
    if mesh is not None:  # once, on every device of the mesh
        params, text = replicate((params, text), mesh)
    encode = _encode_jit if mesh is None else functools.partial(sharded_encode_features, mesh=mesh)
    bar = _progress(progress, n, class_name)
    scores, maps, refs, feats = [], [], [], []
    for lo, hi in _batches(n, group):
        pixels = _pad(np.stack([_load(im, size, resample) for im in images[lo:hi]]), group)
        valid = np.arange(group) < hi - lo
        if whole:
            f = encode(params, cfg, jnp.asarray(pixels), method)
            feats.append(jax.tree.map(lambda a: np.asarray(a)[: hi - lo], f))
        else:
            det = detect(params, cfg, pixels, text, method, valid, mesh=mesh)
            scores.append(np.asarray(det.image_scores)[: hi - lo])
            maps.append(np.asarray(det.anomaly_maps)[: hi - lo])
            refs.append(np.asarray(det.num_refs)[: hi - lo])
        bar.update(hi - lo)
    if whole:
        bar.set_postfix_str("matching")
        all_feats = jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *feats)
        det = _score_jit(all_feats, text, jnp.ones(n, bool), method, size, mesh)
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
