"""`detect` (one batch, one jit per shape), `detect_category` (a whole category in batches) and
`iter_detect_bank` (images scored against a reference bank, batch by batch)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .bank import Bank, detect_with_bank
from .clip.config import CLIPConfig
from .clip.preprocess import preprocess
from .data import load_image
from .errors import FewImagesWarning, FiseclipError
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


class GroupResult(NamedTuple):
    """One scored group of a category: `indices` [k] of the images scored (into the input list), their
    image_scores [k], anomaly_maps [k, S, S], num_refs [k]; `errors` {index: message} of images of this
    group that could not be read (skipped); `group` the group's number (stable from run to run)."""

    group: int
    indices: np.ndarray
    image_scores: np.ndarray
    anomaly_maps: np.ndarray
    num_refs: np.ndarray
    errors: dict


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


def category_groups(method: Method, n: int, encode_batch: int = 8) -> list[tuple[int, int]]:
    """[(lo, hi)] the images each scoring call of `iter_detect` takes: one group for a whole-category
    method, else consecutive groups of `method.group(n, encode_batch)` in input order."""
    group = method.group(n, encode_batch)
    return [(0, n)] if group is None else _batches(n, group)


def _load_batch(items, lo, hi, size, resample, width, skip_errors):
    """Decode images lo..hi-1 into a [width, S, S, 3] batch padded with copies of its last good image.
    -> (pixels, valid [width], good indices, {index: error}); unreadable files fail, or are skipped."""
    rows, good, errors = [], [], {}
    for i in range(lo, hi):
        try:
            rows.append(_load(items[i], size, resample))
            good.append(i)
        except FiseclipError as err:
            if not skip_errors:
                raise
            errors[i] = str(err)
    valid = np.arange(width) < len(rows)
    if not rows:
        return None, valid, np.array(good, int), errors
    pixels = np.stack(rows)
    return _pad(pixels, width), valid, np.array(good, int), errors


def iter_detect(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *, size: int,
                encode_batch: int = 8, resample: str = "bicubic", text=None, progress: bool | Callable = True,
                mesh=None, skip_groups=(), feature_store=None, skip_errors: bool = False) -> Iterator[GroupResult]:
    """`detect_category` one scored group at a time (what a caller writes as it goes).

    Groups are `category_groups(method, len(images), encode_batch)`; those in `skip_groups` are not
    computed (a resumed run). Images are decoded one batch at a time, so memory does not grow with
    the number of images. `feature_store` (a MutableMapping, e.g. on disk) keeps the encoded features
    of a whole-category method per encode batch: a resumed run finds them there instead of encoding
    again. skip_errors=True: an unreadable image is left out of its batch (reported in `errors`)
    instead of raising.
    """
    n = len(images)
    if n == 0:
        raise FiseclipError(f"no images for category {class_name!r}")
    if text is not None:
        text = as_text(text)
    elif method.prompts is not None:
        text = text_features_full(params, cfg, class_name, method.prompts)
    else:  # a method without text
        text = as_text(jnp.zeros((2, cfg.embed_dim)))
    whole = method.group(n, encode_batch) is None
    groups = category_groups(method, n, encode_batch)
    if mesh is not None:  # once, on every device of the mesh
        params, text = replicate((params, text), mesh)
    encode = _encode_jit if mesh is None else functools.partial(sharded_encode_features, mesh=mesh)
    bar = _progress(progress, n, class_name)
    skip_groups = set(skip_groups)
    try:
        if not whole:
            width = groups[0][1] - groups[0][0]  # every batch padded to one shape: one compilation
            for g, (lo, hi) in enumerate(groups):
                if g in skip_groups:
                    bar.update(hi - lo)
                    continue
                pixels, valid, good, errors = _load_batch(images, lo, hi, size, resample, width, skip_errors)
                if pixels is None:
                    empty = np.zeros((0,), np.float32)
                    yield GroupResult(g, good, empty, np.zeros((0, size, size), np.float32), empty.astype(np.int32),
                                      errors)
                else:
                    det = detect(params, cfg, pixels, text, method, valid, mesh=mesh)
                    k = len(good)
                    yield GroupResult(g, good, np.asarray(det.image_scores)[:k], np.asarray(det.anomaly_maps)[:k],
                                      np.asarray(det.num_refs)[:k], errors)
                bar.update(hi - lo)
            return
        if 0 in skip_groups:
            return
        feats, good, errors = [], [], {}
        for b, (lo, hi) in enumerate(_batches(n, encode_batch)):
            key = f"{b:06d}"
            stored = feature_store.get(key) if feature_store is not None else None
            if stored is not None:
                f, idx, err = stored["features"], stored["indices"], stored["errors"]
            else:
                pixels, valid, idx, err = _load_batch(images, lo, hi, size, resample, encode_batch, skip_errors)
                f = {}
                if pixels is not None:
                    out = encode(params, cfg, jnp.asarray(pixels), method)
                    f = jax.tree.map(lambda a: np.asarray(a)[: len(idx)], out)
                if feature_store is not None:
                    feature_store[key] = {"features": f, "indices": idx, "errors": err}
            if len(idx):
                feats.append(f)
            good.extend(int(i) for i in idx)
            errors.update(err)
            bar.update(hi - lo)
        good = np.array(good, int)
        if not feats:
            empty = np.zeros((0,), np.float32)
            yield GroupResult(0, good, empty, np.zeros((0, size, size), np.float32), empty.astype(np.int32), errors)
            return
        bar.set_postfix_str("matching")
        all_feats = jax.tree.map(lambda *a: jnp.asarray(np.concatenate(a)), *feats)
        det = _score_jit(all_feats, text, jnp.ones(len(good), bool), method, size, mesh)
        yield GroupResult(0, good, np.asarray(det.image_scores), np.asarray(det.anomaly_maps),
                          np.asarray(det.num_refs), errors)
    finally:
        bar.close()


def detect_category(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *,
                    size: int, encode_batch: int = 8, resample: str = "bicubic", text=None,
                    progress: bool | Callable = True, mesh=None) -> CategoryResult:
    """Run a whole category: images are paths, PIL images or uint8 HWC arrays.

    `method.group(n, encode_batch)` says how images are scored: None (MuSc; FiSeCLIP with
    batch_size 0) encodes in batches of `encode_batch`, then scores the whole category at
    once; a number scores batches of that size. The last partial batch is padded and masked, so
    one compilation serves every batch. With a `mesh` (`distributed.make_mesh`, one process),
    each batch is split over its devices (parameters replicated) and matching runs as
    `ring_mutual_scores`; `encode_batch` is then the global batch. Images are decoded one batch
    at a time. `iter_detect` gives the same results one group at a time.
    """
    if len(images) < method.min_images:
        warnings.warn(FewImagesWarning(few_images_message(method, len(images), class_name)), stacklevel=2)
    parts = list(iter_detect(params, cfg, images, class_name, method, size=size, encode_batch=encode_batch,
                             resample=resample, text=text, progress=progress, mesh=mesh))
    result = CategoryResult(*(np.concatenate([getattr(p, k) for p in parts])
                              for k in ("image_scores", "anomaly_maps", "num_refs")))
    if (result.num_refs == 0).any():
        warnings.warn(FewImagesWarning(f"{int((result.num_refs == 0).sum())} image(s) of {class_name!r} had no "
                                       f"reference image to match against: {method.no_reference}"), stacklevel=2)
    return result


def few_images_message(method: Method, n: int, class_name: str) -> str:
    return (f"{method.label} compares the images of a category with each other and needs at least "
            f"{method.min_images} of them; {class_name!r} has {n} ({method.no_reference}). Score single images "
            f"with a method that needs no references (anoclip)")


def _progress(progress, total, desc):
    if callable(progress) and not isinstance(progress, bool):
        return progress(total=total, desc=desc)
    return tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)


# ------------------------------------------------------------------ against a reference bank
def bank_groups(n: int, encode_batch: int = 8) -> list[tuple[int, int]]:
    """[(lo, hi)] the images each call of `iter_detect_bank` takes: consecutive batches of encode_batch."""
    return _batches(n, encode_batch)


def iter_detect_bank(params, cfg: CLIPConfig, bank: Bank, images: Sequence[Any], *, encode_batch: int = 8,
                     resample: str = "bicubic", text=None, progress: bool | Callable = True, skip_groups=(),
                     skip_errors: bool = False) -> Iterator[GroupResult]:
    """Score images against a reference bank (`bank.detect_with_bank`), one batch at a time: each image's
    result depends on the bank alone. Method, size and class name come from the bank; batches are padded to
    one shape (one compilation); `skip_groups` and `skip_errors` as in `iter_detect`."""
    meta = bank.meta
    if text is None and meta.method.prompts is not None:
        text = text_features_full(params, cfg, meta.class_name, meta.method.prompts)
    groups = bank_groups(len(images), encode_batch)
    bar = _progress(progress, len(images), meta.class_name)
    skip_groups = set(skip_groups)
    try:
        for g, (lo, hi) in enumerate(groups):
            if g not in skip_groups:
                pixels, valid, good, errors = _load_batch(images, lo, hi, meta.size, resample, encode_batch,
                                                          skip_errors)
                k = len(good)
                if pixels is None:
                    det = Detection(np.zeros((0,), np.float32), np.zeros((0, meta.size, meta.size), np.float32),
                                    np.zeros((0,), np.int32))
                else:
                    det = detect_with_bank(params, cfg, bank, pixels, text, None, valid)
                yield GroupResult(g, good, *(np.asarray(a)[:k] for a in det), errors)
            bar.update(hi - lo)
    finally:
        bar.close()
