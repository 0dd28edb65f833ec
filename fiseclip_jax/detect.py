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
from .data import load_image
from .distributed import pad_batch, replicate, shard_batch, sharded_encode_features
from .methods import Detection, Method, as_text
from .prompts import text_features_full


def encode_features(params, cfg: CLIPConfig, pixels, method: Method) -> dict:
    """`method.encode`: everything the method needs from one forward pass. Pure, jit-able."""
    return method.encode(params, cfg, pixels)


def score_features(feats, text, valid, method: Method, size, mesh=None, state=None):
    """`method.score`: scores and maps of one batch from its features. Pure, jit-able. With a carried
    `state` (see `detect`), `method.score_state`: -> (Detection, next state)."""
    if state is None:
        return method.score(feats, text, valid, size=size, mesh=mesh)
    return method.score_state(feats, text, valid, state, size=size, mesh=mesh)


def map_size(shape):
    """The map size of model inputs of shape [H, W, 3]: S when square, else (H, W)."""
    h, w = shape[:2]
    return h if h == w else (h, w)


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _detect(params, cfg, pixels, text, valid, method, state=None):
    feats = method.encode(params, cfg, pixels)
    return score_features(feats, text, valid, method, map_size(pixels.shape[1:]), None, state)


_NO_STATE = object()


def detect(params, cfg: CLIPConfig, pixels, text, method: Method, valid=None, *, mesh=None, state=_NO_STATE):
    """One method over one batch of one category: Detection(image_scores [B], anomaly_maps [B, H, W]).

    method: a method config (`fiseclip_jax.methods.get(name)`, or e.g. `FiSeCLIPConfig()`);
    pixels: CLIP-normalised model inputs [B, H, W, 3] (`method.prepare`; S×S for most methods);
    text: [2, D] features or `TextFeatures`; valid: [B] bool marks real images in a padded batch.
    Compiled once per shape. MuSc and FiSeCLIP treat the batch as the reference set (MuSc: pass
    the whole category).
    state: what the previous batch of the category returned (`method.initial_state(cfg, text)` for
    the first); given, the call returns (Detection, next state): how AnoCLIP+ carries its image
    index and AdamW moments through a category in file order.
    mesh: optional `jax.sharding.Mesh` (`distributed.make_mesh`): the batch is split over its
    devices for encoding (B padded to a multiple of the device count) and matching runs on the
    device ring; the result equals the single-device one.
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    valid = jnp.ones(pixels.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    text = as_text(text)
    carried = method.initial_state(cfg, text) if state is _NO_STATE else state
    if mesh is None:
        out = _detect(params, cfg, pixels, text, valid, method, carried)
    else:
        params, text, carried = replicate((params, text, carried), mesh)
        feats, _ = sharded_encode_features(params, cfg, pixels, method, mesh, return_valid=True)
        valid_pad, _ = pad_batch(np.asarray(valid), mesh.size)  # padding rows are False
        valid_pad = shard_batch(valid_pad, mesh)
        out = _score_jit(feats, text, valid_pad, method, map_size(pixels.shape[1:]), mesh, carried)
    det, carried = out if carried is not None else (out, None)
    if mesh is not None:
        det = Detection(*(a[: pixels.shape[0]] for a in det))
    return det if state is _NO_STATE else (det, carried)


# ------------------------------------------------------------------ categories
@dataclasses.dataclass
class CategoryResult:
    image_scores: np.ndarray  # [N]
    anomaly_maps: np.ndarray  # [N, H, W]; a list of [H_i, W_i] when the images' model inputs differ in shape
    num_refs: np.ndarray  # [N]


def _load(item, method, size, resample):
    if isinstance(item, (str, Path)):
        item = load_image(item)
    return method.prepare(item, size, resample)


_encode_jit = jax.jit(encode_features, static_argnames=("cfg", "method"))
_score_jit = jax.jit(score_features, static_argnames=("method", "size", "mesh"))


def _batches(images, group, load):
    """(lo, hi, [hi - lo, H, W, 3]) runs of consecutive images, at most `group` each, of one input shape
    (file order kept, so a carried state sees the images in order). Loads lazily."""
    lo, run = 0, []
    for i, item in enumerate(images):
        x = load(item)
        if run and (len(run) == group or x.shape != run[0].shape):
            yield lo, i, np.stack(run)
            lo, run = i, []
        run.append(x)
    if run:
        yield lo, len(images), np.stack(run)


def _pad(x, b):
    pad = b - x.shape[0]
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x


def detect_category(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *,
                    size: int, encode_batch: int = 8, resample: str = "bicubic", text=None,
                    progress: bool | Callable = True, mesh=None) -> CategoryResult:
    """Run a whole category: images are paths, PIL images or uint8 HWC arrays, in file order.

    Each image becomes a model input through `method.prepare(image, size, resample)` (S×S for
    most methods; AnoCLIP with tiles keeps the aspect, short side S). `method.group(n,
    encode_batch)` says how images are scored: None (MuSc; FiSeCLIP with batch_size 0) encodes
    in batches of `encode_batch`, then scores the whole category at once; a number scores
    batches of that size, in file order, threading the method's carried state from batch to
    batch (`method.initial_state` / `score_state`). The last partial batch is padded and
    masked, so one compilation serves every batch. With a `mesh` (`distributed.make_mesh`,
    one process), each batch is split over its devices (parameters replicated) and matching
    runs as `ring_mutual_scores`; `encode_batch` is then the global batch.
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
    state = method.initial_state(cfg, text)
    if mesh is not None:  # once, on every device of the mesh
        params, text, state = replicate((params, text, state), mesh)
    encode = _encode_jit if mesh is None else functools.partial(sharded_encode_features, mesh=mesh)
    bar = _progress(progress, n, class_name)
    scores, maps, refs, feats, shape = [], [], [], [], None
    for lo, hi, pixels in _batches(images, group, lambda im: _load(im, method, size, resample)):
        pixels = _pad(pixels, group)
        valid = np.arange(group) < hi - lo
        if whole:
            if shape is not None and pixels.shape[1:] != shape:
                raise ValueError(f"{method.label} scores the whole category at once, but the images of "
                                 f"{class_name!r} give model inputs of different shapes ({shape} and "
                                 f"{pixels.shape[1:]})")
            shape = pixels.shape[1:]
            f = encode(params, cfg, jnp.asarray(pixels), method)
            feats.append(jax.tree.map(lambda a: np.asarray(a)[: hi - lo], f))
        else:
            det, state = detect(params, cfg, pixels, text, method, valid, mesh=mesh, state=state)
            scores.append(np.asarray(det.image_scores)[: hi - lo])
            maps.append(np.asarray(det.anomaly_maps)[: hi - lo])
            refs.append(np.asarray(det.num_refs)[: hi - lo])
        bar.update(hi - lo)
    if whole:
        bar.set_postfix_str("matching")
        all_feats = jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *feats)
        det = _score_jit(all_feats, text, jnp.ones(n, bool), method, map_size(shape), mesh)
        scores, maps, refs = [np.asarray(det.image_scores)], [np.asarray(det.anomaly_maps)], [np.asarray(det.num_refs)]
    bar.close()
    if len({m.shape[1:] for m in maps}) == 1:
        all_maps = np.concatenate(maps)
    else:  # inputs of several shapes (e.g. tiled images of several aspect ratios): one map per image
        all_maps = [m for batch in maps for m in batch]
    result = CategoryResult(np.concatenate(scores), all_maps, np.concatenate(refs))
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
