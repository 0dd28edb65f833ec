"""A feature cache: each image's encoded features on disk (`--cache DIR`), so a run that changes only
scoring options (a sweep, a rerun with another threshold) skips the forward pass.

    fc = FeatureCache("feats/")
    detect_category(params, cfg, paths, "bottle", method, size=224, feature_cache=fc)   # encodes, stores
    detect_category(params, cfg, paths, "bottle", other, size=224, feature_cache=fc)    # hits: no encode

An entry is one image's `method.encode` output (batch axis dropped) and its model-input shape,
keyed by the weights' fingerprint (`cache.tree_fingerprint`), the CLIP config the method encodes
with (dtype and activation included), the method's class and `encoding_fields`, the input size,
the resize filter and the sha256 of the image's content (file bytes, or the array's). Entries are
written atomically and read back only when their stored key matches, so a corrupt, truncated or
foreign file is recomputed, never trusted (`cache.load_arrays`).

It also keeps, in memory only, the first scoring stage of methods that split their scoring
(`Method.stage_fields`, e.g. FiSeCLIP's and MuSc's matching) per group of images, keyed by the
images, the text and those fields: a sweep over the later fields (fusion, σ, image-score rule,
RsCIN k) then skips the matching too. `max_stages` bounds how many are kept (oldest dropped).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from . import cache

KIND = "features"
FORMAT = 1
_SHAPE = "__input_shape__"


@dataclasses.dataclass
class FeatureCache:
    """Per-image encoded features under `folder`/features/; `hits` and `misses` count lookups."""

    folder: Path
    hits: int = 0
    misses: int = 0
    writes: int = 0
    stage_hits: int = 0
    max_stages: int = 4096

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._weights: tuple[Any, str] | None = None
        self._stages: dict[str, dict] = {}

    def stage_get(self, key: dict) -> dict | None:
        """A first scoring stage kept for `key` (in memory), or None."""
        stage = self._stages.get(cache.key_digest(key))
        self.stage_hits += stage is not None
        return stage

    def stage_put(self, key: dict, stage: dict) -> None:
        if len(self._stages) >= self.max_stages:
            self._stages.pop(next(iter(self._stages)))
        self._stages[cache.key_digest(key)] = stage

    def context(self, params, cfg, method, size, resample: str = "bicubic") -> dict:
        """The part of every key that one run shares (weights, CLIP config, encoding options, size)."""
        if self._weights is None or self._weights[0] is not params:  # fingerprint once per parameter tree
            self._weights = (params, cache.tree_fingerprint(params))
        encoding = {f: getattr(method, f) for f in method.encoding_fields}
        return {"format": FORMAT, "weights": self._weights[1], "clip": method.clip_config(cfg).to_dict(),
                "method": f"{type(method).__module__}.{type(method).__qualname__}", "encoding": encoding,
                "size": size, "resample": resample}

    def get(self, context: dict, image_hash: str | None):
        """(features {name: array}, input shape) stored for this image, or None (missing, corrupt, foreign)."""
        arrays = None if image_hash is None else cache.load_arrays(KIND, {**context, "image": image_hash},
                                                                    self.folder)
        if arrays is None or _SHAPE not in arrays:
            self.misses += 1
            return None
        self.hits += 1
        shape = tuple(int(x) for x in arrays.pop(_SHAPE))
        return arrays, shape

    def put(self, context: dict, image_hash: str | None, features: dict, shape) -> None:
        """Store one image's features (a flat {name: array}, no batch axis) and its model-input shape."""
        if image_hash is None:
            return
        arrays = {k: np.asarray(v) for k, v in features.items()}
        arrays[_SHAPE] = np.asarray(shape, np.int64)
        if cache.save_arrays(KIND, {**context, "image": image_hash}, arrays, self.folder) is not None:
            self.writes += 1


def image_hash(item) -> str | None:
    """sha256 of an image's content: a file's bytes, or a PIL image's / array's pixels; None when a file
    cannot be read (the normal loading path then reports the error)."""
    h = hashlib.sha256()
    if isinstance(item, (str, Path)):
        try:
            h.update(Path(item).read_bytes())
        except OSError:
            return None
        return "file:" + h.hexdigest()
    arr = np.asarray(item)
    h.update(f"{arr.shape}|{arr.dtype.str};".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return "array:" + h.hexdigest()


__all__ = ["FeatureCache", "image_hash"]
