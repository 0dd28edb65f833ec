"""`detect` (one batch, one jit per shape), `detect_category` (a whole category in batches) and
`iter_detect_bank` (images scored against a reference bank, batch by batch)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .bank import Bank, detect_with_bank
from .cache import key_digest
from .clip.config import CLIPConfig
from .data import load_image
from .errors import FewImagesWarning, FiseclipError
from .distributed import pad_batch, replicate, shard_batch, sharded_encode_features
from .features import FeatureCache, image_hash
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
    # skip_errors=True: {index into the input list: why} of the images that could not be read; the arrays
    # above then hold the other images, in input order.
    errors: dict = dataclasses.field(default_factory=dict)


class GroupResult(NamedTuple):
    """One scored group of a category: `indices` [k] of the images scored (into the input list), their
    image_scores [k], anomaly_maps [k, H, W] (a list of [H_i, W_i] when their inputs differ in shape),
    num_refs [k]; `errors` {index: message} of images of this group that could not be read (skipped);
    `group` the group's number (stable from run to run)."""

    group: int
    indices: np.ndarray
    image_scores: np.ndarray
    anomaly_maps: Any
    num_refs: np.ndarray
    errors: dict


def _load(item, method, size, resample):
    if isinstance(item, (str, Path)):
        item = load_image(item)
    return method.prepare(item, size, resample)


_encode_jit = jax.jit(encode_features, static_argnames=("cfg", "method"))
_score_jit = jax.jit(score_features, static_argnames=("method", "size", "mesh"))


def _batches(n, b):
    return [(i, min(i + b, n)) for i in range(0, n, b)]


def _pad(x, b):
    pad = b - x.shape[0]
    return np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x


def _runs(xs):
    """Consecutive model inputs of one shape stacked: [(offset, [k, H, W, 3])] (file order kept)."""
    out, start = [], 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or xs[i].shape != xs[start].shape:
            out.append((start, np.stack(xs[start:i])))
            start = i
    return out


def _join_maps(maps):
    """[k_i, H, W] blocks -> one array, or a list of per-image maps when the blocks differ in shape."""
    maps = [m for m in maps if len(m)]
    if not maps:
        return np.zeros((0, 0, 0), np.float32)
    if len({m.shape[1:] for m in maps}) == 1:
        return np.concatenate(maps)
    return [m for block in maps for m in block]


def category_groups(method: Method, n: int, encode_batch: int = 8) -> list[tuple[int, int]]:
    """[(lo, hi)] the images each scoring call of `iter_detect` takes: one group for a whole-category
    method, else consecutive groups of `method.group(n, encode_batch)` in input order."""
    group = method.group(n, encode_batch)
    return [(0, n)] if group is None else _batches(n, group)


def _load_group(items, lo, hi, method, size, resample, skip_errors):
    """Model inputs of images lo..hi-1 -> (list of [H, W, 3], good indices, {index: error}); an unreadable
    file raises, or with skip_errors is left out and reported."""
    xs, good, errors = [], [], {}
    for i in range(lo, hi):
        try:
            xs.append(_load(items[i], method, size, resample))
            good.append(i)
        except FiseclipError as err:
            if not skip_errors:
                raise
            errors[i] = str(err)
    return xs, np.array(good, int), errors


def _save_state(store, key, state):
    store[key] = {"features": {f"{i:04d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))},
                  "indices": np.zeros(0, int), "errors": {}}


def _restore_state(stored, like):
    leaves = [stored["features"][k] for k in sorted(stored["features"])]
    return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(x) for x in leaves])


def _cached_group(params, cfg, items, lo, hi, method, size, resample, skip_errors, fcache: FeatureCache,
                  context: dict, width: int):
    """Images lo..hi-1 through the feature cache: ([(shape, {name: [..]}, content hash)] per readable image,
    good indices, {index: error}). Hits are read back; misses are loaded, encoded (runs of one shape padded
    to `width`, one compilation) and stored."""
    entries, good, errors, misses = {}, [], {}, []
    for i in range(lo, hi):
        digest = image_hash(items[i])
        hit = fcache.get(context, digest)
        if hit is not None:
            entries[i] = (hit[1], hit[0], digest)
            good.append(i)
            continue
        try:
            misses.append((i, digest, _load(items[i], method, size, resample)))
            good.append(i)
        except FiseclipError as err:
            if not skip_errors:
                raise
            errors[i] = str(err)
    for start, run in _runs([x for _, _, x in misses]):
        out = _encode_jit(params, cfg, jnp.asarray(_pad(run, max(width, len(run)))), method)
        out = jax.tree.map(np.asarray, out)
        for j in range(len(run)):
            i, digest, x = misses[start + j]
            feats = {k: v[j] for k, v in out.items()}
            fcache.put(context, digest, feats, x.shape)
            entries[i] = (x.shape, feats, digest)
    return [entries[i] for i in good], np.array(good, int), errors


def _stack_runs(entries):
    """[(shape, feats, hash)] -> [(hashes, shape, {name: [k, ..]})]: consecutive images of one input shape."""
    out, start = [], 0
    for i in range(1, len(entries) + 1):
        if i == len(entries) or entries[i][0] != entries[start][0]:
            block = entries[start:i]
            out.append(([h for _, _, h in block], block[0][0],
                        {k: np.stack([f[k] for _, f, _ in block]) for k in block[0][1]}))
            start = i
    return out


def _text_digest(text) -> str:
    return key_digest({"text": [hashlib.sha256(np.asarray(x).tobytes()).hexdigest() for x in jax.tree.leaves(text)]})


def _score_cached(feats, text, valid, method, size, state, fcache: FeatureCache, key: dict | None):
    """`score_features` on features from the cache; a method that splits its scoring (`stage_fields`) has its
    first stage read from / kept in the cache (memory and disk) under `key` + those fields (None: not kept)."""
    if state is not None or not method.stage_fields or key is None:
        return _score_jit(feats, text, valid, method, size, None, state)
    key = {**key, "stage": {f: getattr(method, f) for f in method.stage_fields}}
    stage = fcache.stage_get(key)
    if stage is None:
        stage = _stage_jit(feats, text, valid, method)
        fcache.stage_put(key, stage)
    return _from_stage_jit(feats, stage, text, valid, method, size)


@functools.partial(jax.jit, static_argnames=("method",))
def _stage_jit(feats, text, valid, method):
    return method.score_stage(feats, text, valid)


@functools.partial(jax.jit, static_argnames=("method", "size"))
def _from_stage_jit(feats, stage, text, valid, method, size):
    return method.score_from_stage(feats, stage, text, valid, size=size)


def _pad_tree(feats, b):
    return {k: _pad(v, b) for k, v in feats.items()}


def iter_detect(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *, size: int,
                encode_batch: int = 8, resample: str = "bicubic", text=None, progress: bool | Callable = True,
                mesh=None, skip_groups=(), feature_store=None, skip_errors: bool = False,
                feature_cache: FeatureCache | None = None) -> Iterator[GroupResult]:
    """`detect_category` one scored group at a time (what a caller writes as it goes).

    Groups are `category_groups(method, len(images), encode_batch)`, scored in file order; a method's
    carried state (`initial_state` / `score_state`, e.g. AnoCLIP+'s AdamW moments) is threaded from
    group to group. Groups in `skip_groups` are not computed (a resumed run); their carried state is
    read back from `feature_store` (a MutableMapping, e.g. on disk), which also keeps the encoded
    features of a whole-category method per encode batch, so a resumed run does not encode again.
    Images are decoded one group at a time, so memory does not grow with the number of images.
    skip_errors=True: an unreadable image is left out of its batch (reported in `errors`).
    feature_cache: a `FeatureCache` (`--cache DIR`): each image's features are read from it when stored
    (no forward pass, no decoding) and stored after encoding; scoring then runs on the features.
    """
    n = len(images)
    if feature_cache is not None and mesh is not None:
        raise FiseclipError("a feature cache (--cache) runs on one device: drop --devices or --cache")
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
    state = method.initial_state(cfg, text)
    if mesh is not None:  # once, on every device of the mesh
        params, text, state = replicate((params, text, state), mesh)
    encode = _encode_jit if mesh is None else functools.partial(sharded_encode_features, mesh=mesh)
    context = None if feature_cache is None else feature_cache.context(params, cfg, method, size, resample)
    text_digest = None if feature_cache is None else _text_digest(text)
    bar = _progress(progress, n, class_name)
    skip_groups = set(skip_groups)
    try:
        if not whole:
            width = groups[0][1] - groups[0][0]  # every batch padded to one shape: one compilation per shape
            for g, (lo, hi) in enumerate(groups):
                key = f"state-{g:06d}"
                if g in skip_groups:
                    stored = feature_store.get(key) if (state is not None and feature_store is not None) else None
                    if state is None or stored is not None:
                        state = state if state is None else _restore_state(stored, state)
                        bar.update(hi - lo)
                        continue
                scores, maps, refs = [], [], []
                if feature_cache is not None:  # encoding split from scoring: features from the cache
                    entries, good, errors = _cached_group(params, cfg, images, lo, hi, method, size, resample,
                                                          skip_errors, feature_cache, context, width)
                    for hashes, shape, feats in _stack_runs(entries):
                        k = len(feats[next(iter(feats))])
                        key = None if None in hashes else {**context, "images": hashes, "width": width,
                                                            "text": text_digest}
                        out = _score_cached(_pad_tree(feats, width), text, jnp.asarray(np.arange(width) < k),
                                            method, map_size(shape), state, feature_cache, key)
                        det, state = out if state is not None else (out, None)
                        scores.append(np.asarray(det.image_scores)[:k])
                        maps.append(np.asarray(det.anomaly_maps)[:k])
                        refs.append(np.asarray(det.num_refs)[:k])
                    xs = []
                else:
                    xs, good, errors = _load_group(images, lo, hi, method, size, resample, skip_errors)
                for _, run in _runs(xs):
                    k = len(run)
                    det, state = detect(params, cfg, _pad(run, width), text, method, np.arange(width) < k,
                                        mesh=mesh, state=state)
                    scores.append(np.asarray(det.image_scores)[:k])
                    maps.append(np.asarray(det.anomaly_maps)[:k])
                    refs.append(np.asarray(det.num_refs)[:k])
                if state is not None and feature_store is not None:
                    _save_state(feature_store, key, state)
                empty = np.zeros((0,), np.float32)
                yield GroupResult(g, good, np.concatenate(scores) if scores else empty, _join_maps(maps),
                                  np.concatenate(refs) if refs else empty.astype(np.int32), errors)
                bar.update(hi - lo)
            return
        if 0 in skip_groups:
            return
        feats, good, errors, shape, hashes = [], [], {}, None, []
        # As many encode batches as encode_batch asks for, evened out (10 images, encode_batch 8: two of 5,
        # not 8 and 2 padded to 8), so no forward pass is spent on padding; with a mesh, a multiple of its size.
        width = -(-n // -(-n // encode_batch))
        if mesh is not None:
            width = -(-width // mesh.size) * mesh.size
        for b, (lo, hi) in enumerate(_batches(n, width)):
            key = f"{b:06d}"
            stored = feature_store.get(key) if feature_store is not None else None
            if stored is not None:
                f, idx, err = stored["features"], stored["indices"], stored["errors"]
                hashes.append(None)  # features of a resumed run: no stage kept
            elif feature_cache is not None:
                entries, idx, err = _cached_group(params, cfg, images, lo, hi, method, size, resample, skip_errors,
                                                  feature_cache, context, width)
                runs = _stack_runs(entries)
                if len(runs) > 1 or (runs and shape is not None and runs[0][1] != shape):
                    raise FiseclipError(f"{method.label} scores the whole category at once, but the images of "
                                        f"{class_name!r} give model inputs of different shapes")
                f = runs[0][2] if runs else {}
                shape = runs[0][1] if runs else shape
                hashes.extend(runs[0][0] if runs else [])
                if feature_store is not None:
                    feature_store[key] = {"features": f, "indices": idx, "errors": err}
            else:
                xs, idx, err = _load_group(images, lo, hi, method, size, resample, skip_errors)
                f = {}
                if xs:
                    if len({x.shape for x in xs} | ({shape} if shape else set())) > 1:
                        raise FiseclipError(f"{method.label} scores the whole category at once, but the images of "
                                            f"{class_name!r} give model inputs of different shapes")
                    shape = xs[0].shape
                    out = encode(params, cfg, jnp.asarray(_pad(np.stack(xs), width)), method)
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
        map_hw = map_size(shape) if shape is not None else size
        if feature_cache is not None:
            key = None if None in hashes else {**context, "images": hashes, "text": text_digest}
            det = _score_cached(all_feats, text, jnp.ones(len(good), bool), method, map_hw, None, feature_cache, key)
        else:
            det = _score_jit(all_feats, text, jnp.ones(len(good), bool), method, map_hw, mesh)
        yield GroupResult(0, good, np.asarray(det.image_scores), np.asarray(det.anomaly_maps),
                          np.asarray(det.num_refs), errors)
    finally:
        bar.close()


def detect_category(params, cfg: CLIPConfig, images: Sequence[Any], class_name: str, method: Method, *,
                    size: int, encode_batch: int = 8, resample: str = "bicubic", text=None,
                    progress: bool | Callable = True, mesh=None, skip_errors: bool = False,
                    feature_cache: FeatureCache | None = None) -> CategoryResult:
    """Run a whole category: images are paths, PIL images or uint8 HWC arrays, in file order.

    Each image becomes a model input through `method.prepare(image, size, resample)` (S×S for
    most methods; AnoCLIP with tiles keeps the aspect, short side S). `method.group(n,
    encode_batch)` says how images are scored: None (MuSc; FiSeCLIP with batch_size 0) encodes
    in batches of `encode_batch`, then scores the whole category at once; a number scores
    batches of that size, in file order, threading the method's carried state from batch to
    batch (`method.initial_state` / `score_state`). The last partial batch is padded and
    masked, so one compilation serves every batch. With a `mesh` (`distributed.make_mesh`,
    one process), each batch is split over its devices (parameters replicated) and matching
    runs as `ring_mutual_scores`; `encode_batch` is then the global batch. Images are decoded
    one batch at a time; `iter_detect` gives the same results one group at a time.
    skip_errors=True: an unreadable image is left out (its index and error in `errors`) instead of
    raising.
    With a `feature_cache` (`features.FeatureCache`) stored features replace the forward pass.
    """
    if len(images) < method.min_images:
        warnings.warn(FewImagesWarning(few_images_message(method, len(images), class_name)), stacklevel=2)
    parts = list(iter_detect(params, cfg, images, class_name, method, size=size, encode_batch=encode_batch,
                             resample=resample, text=text, progress=progress, mesh=mesh, skip_errors=skip_errors,
                             feature_cache=feature_cache))
    blocks = [b for p in parts for b in ([m[None] for m in p.anomaly_maps] if isinstance(p.anomaly_maps, list)
                                          else [np.asarray(p.anomaly_maps)])]
    maps = _join_maps(blocks)
    result = CategoryResult(np.concatenate([p.image_scores for p in parts]), maps,
                            np.concatenate([p.num_refs for p in parts]),
                            {i: msg for p in parts for i, msg in p.errors.items()})
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
                xs, good, errors = _load_group(images, lo, hi, meta.method, meta.size, resample, skip_errors)
                k = len(good)
                valid = np.arange(encode_batch) < k  # padded to one shape: one compilation
                if not xs:
                    det = Detection(np.zeros((0,), np.float32), np.zeros((0, meta.size, meta.size), np.float32),
                                    np.zeros((0,), np.int32))
                else:
                    det = detect_with_bank(params, cfg, bank, _pad(np.stack(xs), encode_batch), text, None, valid)
                yield GroupResult(g, good, *(np.asarray(a)[:k] for a in det), errors)
            bar.update(hi - lo)
    finally:
        bar.close()
