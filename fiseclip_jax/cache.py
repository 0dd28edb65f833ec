"""The user cache folder: results worth keeping between runs (text features, XLA programs).

`cache_dir()` is `$FISECLIP_CACHE`, else the platform's cache folder + `fiseclip_jax`.
An entry is an .npz named after the hash of its key and holding the key itself; a read
checks that key and gives None for anything missing, unreadable or foreign, so a bad
entry is recomputed, never trusted. Writes go to a temporary file then `os.replace`, so
a reader never sees half a file. The cache only saves time: a failed write warns once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import numpy as np

ENV_VAR = "FISECLIP_CACHE"
_KEY_FIELD = "__cache_key__"
# Values sampled per parameter leaf for its fingerprint: enough to tell checkpoints apart,
# few enough that a ViT-L tree hashes in milliseconds.
FINGERPRINT_SAMPLES = 4096

_enabled = True
_warned = False


def cache_dir() -> Path:
    """$FISECLIP_CACHE, else the platform cache folder (XDG, ~/Library/Caches, %LOCALAPPDATA%)/fiseclip_jax."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fiseclip_jax"


def enabled() -> bool:
    """Whether library calls read and write the cache folder (`--no-cache` turns it off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def tree_fingerprint(tree) -> str:
    """sha256 of a pytree: its structure, every leaf's shape and dtype, and evenly spaced values.

    It never looks a leaf up by path, so it works for any parameter layout; a new layout is
    a new fingerprint (a cache miss, never a wrong hit). Leaves of up to FINGERPRINT_SAMPLES
    values are hashed whole; two trees that differ only between samples of a large leaf
    collide, which trained checkpoints (that differ everywhere) do not.
    """
    leaves, treedef = jax.tree.flatten(tree)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        flat = np.asarray(leaf).reshape(-1)  # no copy for CPU arrays
        if flat.size > FINGERPRINT_SAMPLES:
            flat = flat[np.linspace(0, flat.size - 1, FINGERPRINT_SAMPLES).astype(np.int64)]
        h.update(f"{np.shape(leaf)}|{flat.dtype.str};".encode())
        h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def key_digest(key: dict) -> str:
    """sha256 hex of a JSON-able key (dict order does not matter)."""
    return hashlib.sha256(_key_text(key).encode()).hexdigest()


def entry_path(kind: str, key: dict, root: Path | None = None) -> Path:
    """Where the entry for `key` lives: <root or cache_dir>/<kind>/<key digest>.npz."""
    return Path(root or cache_dir()) / kind / f"{key_digest(key)[:40]}.npz"


def load_arrays(kind: str, key: dict, root: Path | None = None) -> dict[str, np.ndarray] | None:
    """The arrays stored under `key` (in `root`, default the cache folder), or None when absent,
    unreadable or stored for another key."""
    path = entry_path(kind, key, root)
    try:
        with np.load(path, allow_pickle=False) as z:
            if _KEY_FIELD not in z.files or str(z[_KEY_FIELD]) != _key_text(key):
                return None
            return {name: z[name] for name in z.files if name != _KEY_FIELD}
    except Exception:  # noqa: BLE001 -- whatever is wrong with an entry, it is recomputed
        return None


def save_arrays(kind: str, key: dict, arrays: dict[str, np.ndarray], root: Path | None = None) -> Path | None:
    """Store `arrays` under `key` (in `root`, default the cache folder), atomically; None (and one warning
    per process) if it cannot."""
    global _warned
    path = entry_path(kind, key, root)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: concurrent writers of one key never share a file.
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **{_KEY_FIELD: np.asarray(_key_text(key))}, **arrays)
        os.replace(tmp, path)
        return path
    except OSError as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if not _warned:
            warnings.warn(f"cannot write to the cache folder {root or cache_dir()} ({e}); results are recomputed "
                          f"next run. Set ${ENV_VAR} to a writable folder or pass --no-cache.", stacklevel=2)
            _warned = True
        return None


class MemoryLRU:
    """An in-memory map holding at most `max_bytes` of arrays (a value's size: the `nbytes` of its
    leaves), the least recently used dropped first; a value larger than the budget is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: dict = {}
        self._sizes: dict = {}
        self.bytes = 0

    def get(self, key):
        """The value kept for `key` (now the most recently used), or None."""
        if key not in self._items:
            return None
        self._items[key] = value = self._items.pop(key)
        return value

    def put(self, key, value) -> None:
        size = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves(value))
        if key in self._items:
            self.bytes -= self._sizes.pop(key)
            del self._items[key]
        if size > self.max_bytes:
            return
        while self._items and self.bytes + size > self.max_bytes:
            oldest = next(iter(self._items))
            del self._items[oldest]
            self.bytes -= self._sizes.pop(oldest)
        self._items[key], self._sizes[key] = value, size
        self.bytes += size


def enable_compilation_cache(min_compile_secs: float = 0.2) -> Path:
    """Persist XLA programs that took >= min_compile_secs to compile under <cache_dir>/xla.

    0.2 s, not JAX's 1 s: a sweep compiles one scoring program per configuration, each ~0.5 s on
    CPU, and a warm rerun (benchmarks/sweep.py) reads them back instead."""
    path = cache_dir() / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    return path
