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

It also keeps the first scoring stage of methods that split their scoring (`Method.stage_fields`,
e.g. FiSeCLIP's and MuSc's matching) per group of images, keyed by everything an image entry is
keyed by (for every image of the group, in order), the padded width, the text features and those
fields: a sweep over the later fields (fusion, σ, image-score rule, RsCIN k) then skips the
matching too, and a rerun on the same cache (a warm sweep) matches nothing. A stage is small (a
few numbers per patch); it is kept in memory and on disk under `folder`/stages/, written and
checked like an image entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from . import cache

KIND = "features"
STAGE_KIND = "stages"
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
    memory_bytes: int = 512 << 20

    def __post_init__(self):
        self.folder = Path(self.folder)
        self._weights: tuple[Any, str] | None = None
        self._stages = cache.MemoryLRU(64 << 20)
        self._recent = cache.MemoryLRU(self.memory_bytes)  # entries read or written lately

    def stage_get(self, key: dict) -> dict | None:
        """A first scoring stage ({name: array}) kept for `key` (in memory, else on disk), or None."""
        digest = cache.key_digest(key)
        stage = self._stages.get(digest)
        if stage is None:
            stage = cache.load_arrays(STAGE_KIND, {"format": FORMAT, **key}, self.folder)
            if stage is not None:
                self._stages.put(digest, stage)
        self.stage_hits += stage is not None
        return stage

    def stage_put(self, key: dict, stage: dict) -> None:
        """Keep a first scoring stage ({name: array}) for `key`, in memory and on disk."""
        stage = {k: np.asarray(v) for k, v in stage.items()}
        self._stages.put(cache.key_digest(key), stage)
        cache.save_arrays(STAGE_KIND, {"format": FORMAT, **key}, stage, self.folder)

    def context(self, params, cfg, method, size, resample: str = "bicubic") -> dict:
        """The part of every key that one run shares (weights, CLIP config, encoding options, size)."""
        if self._weights is None or self._weights[0] is not params:  # fingerprint once per parameter tree
            self._weights = (params, cache.tree_fingerprint(params))
        encoding = {f: getattr(method, f) for f in method.encoding_fields}
        return {"format": FORMAT, "weights": self._weights[1], "clip": method.clip_config(cfg).to_dict(),
                "method": f"{type(method).__module__}.{type(method).__qualname__}", "encoding": encoding,
                "size": size, "resample": resample}

    def get(self, context: dict, image_hash: str | None):
        """(features {name: array}, input shape) stored for this image, or None (missing, corrupt, foreign).
        The last `memory_bytes` of entries read or written are also kept in memory (a sweep scores the
        same images once per configuration)."""
        if image_hash is None:
            self.misses += 1
            return None
        key = {**context, "image": image_hash}
        digest = cache.key_digest(key)
        kept = self._recent.get(digest)
        if kept is not None:
            self.hits += 1
            return kept
        arrays = cache.load_arrays(KIND, key, self.folder)
        if arrays is None or _SHAPE not in arrays:
            self.misses += 1
            return None
        self.hits += 1
        shape = tuple(int(x) for x in arrays.pop(_SHAPE))
        self._recent.put(digest, (arrays, shape))
        return arrays, shape

    def put(self, context: dict, image_hash: str | None, features: dict, shape) -> None:
        """Store one image's features (a flat {name: array}, no batch axis) and its model-input shape."""
        if image_hash is None:
            return
        arrays = {k: np.array(v) for k, v in features.items()}  # a copy: not a view of a whole batch
        key = {**context, "image": image_hash}
        if cache.save_arrays(KIND, key, {**arrays, _SHAPE: np.asarray(shape, np.int64)}, self.folder) is not None:
            self.writes += 1
        self._recent.put(cache.key_digest(key), (arrays, tuple(int(x) for x in shape)))


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
