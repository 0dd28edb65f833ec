"""Checkpoint directories of converted CLIP weights (orbax): write, read, verify, upgrade old layouts.

A checkpoint directory holds

    params/          orbax StandardCheckpointer tree (nested dicts of float32)
    config.json      CLIPConfig.to_dict() plus "format_version"
    checksums.json   sha256 of every leaf's bytes (so a restore is verified bit-exact)
    source.json      what it was converted from (written by `convert_clip`; optional)

Format versions (the parameter layout of params/):
    1  (no "format_version" key) blocks of a tower stacked on a leading axis under `blocks`
    2  the `CLIP` module tree: blocks as `transformer.blocks_{i}` (see model.py)
A version 1 checkpoint is upgraded on load (unstacked); the files are left as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np

from .config import CLIPConfig
from .modeling import param_shapes
from ..errors import FiseclipError

FORMAT_VERSION = 2
HOW_TO_CONVERT = ("convert a local copy with `fiseclip-jax convert SRC --out DIR` (SRC: a Hugging Face "
                  "CLIP directory, an OpenAI .pt file or an OpenCLIP state dict; see weights/README.md), "
                  "then pass DIR")


class CheckpointError(FiseclipError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not match its config."""


def _flat(tree, is_leaf=None) -> dict[str, object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _digest(a) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a))).hexdigest()


def _shape_problems(found: dict, expected: dict, what: str = "stored") -> list[str]:
    probs = [f"{k}: {what} {tuple(found[k].shape)} {np.dtype(found[k].dtype)} vs expected "
             f"{tuple(expected[k].shape)} float32" for k in expected
             if k in found and (tuple(found[k].shape) != tuple(expected[k].shape)
                                or np.dtype(found[k].dtype) != np.float32)]
    probs += [f"missing {k}" for k in expected if k not in found]
    probs += [f"unexpected {k}" for k in found if k not in expected]
    return probs


def _summary(probs: list[str], n: int = 6) -> str:
    return "; ".join(probs[:n]) + (f"; ... ({len(probs) - n} more)" if len(probs) > n else "")


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


# ---------------------------------------------------------------- layouts
def unstack_blocks(params):
    """Format 1 -> format 2: `blocks` [L, ...] split into `transformer.blocks_{i}` (numpy leaves)."""
    out = dict(params)
    for tower in ("vision", "text"):
        t = dict(params[tower])
        stacked = jax.tree.map(np.asarray, t.pop("blocks"))
        n = jax.tree.leaves(stacked)[0].shape[0]
        t["transformer"] = {f"blocks_{i}": jax.tree.map(lambda a: np.ascontiguousarray(a[i]), stacked)
                            for i in range(n)}
        out[tower] = t
    return out


def _stacked_shapes(cfg: CLIPConfig):
    """The abstract format-1 tree for `cfg`."""
    shapes = param_shapes(cfg)
    out = dict(shapes)
    for tower in ("vision", "text"):
        t = dict(shapes[tower])
        blocks = t.pop("transformer")
        t["blocks"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(blocks),) + x.shape, x.dtype),
                                   blocks["blocks_0"])
        out[tower] = t
    return out


# ---------------------------------------------------------------- save
def save_clip(params, cfg: CLIPConfig, out, *, source: dict | None = None, overwrite: bool = False) -> Path:
    """Write `params` (numpy or jax leaves, the `CLIP` tree) and `cfg` to the directory `out`; returns its path.

    Written to a temporary sibling and renamed, so an interrupted save leaves no half checkpoint.
    """
    import orbax.checkpoint as ocp  # 2 s to import: only when a checkpoint is written or read

    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise CheckpointError(f"{out}: already exists and is not empty (pass overwrite=True / --force)")
    probs = _shape_problems(_flat(params), _flat(param_shapes(cfg)), "given")
    if probs:
        raise CheckpointError(f"{out}: params do not match config {cfg.name}: {_summary(probs)}")

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", params)
            ckpt.wait_until_finished()
        config = dict(cfg.to_dict(), format_version=FORMAT_VERSION)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        sums = {k: _digest(np.asarray(v)) for k, v in _flat(params).items()}
        (tmp / "checksums.json").write_text(json.dumps(sums, indent=1, sort_keys=True) + "\n")
        if source is not None:
            (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- load
def _target(shapes, sharding, where: Path):
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    try:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: `sharding` must be one jax.sharding.Sharding or a pytree of them "
                              f"with the parameter tree's structure ({e})") from e


def looks_like_source(d: Path) -> bool:
    """Unconverted weights (a Hugging Face or OpenCLIP directory) rather than a checkpoint."""
    return any((d / n).exists() for n in ("open_clip_config.json", "model.safetensors", "pytorch_model.bin"))


def _read_config(d: Path) -> tuple[CLIPConfig, int]:
    try:
        raw = json.loads((d / "config.json").read_text())
        version = raw.pop("format_version", 1)
        cfg = CLIPConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not a valid CLIPConfig ({e})") from e
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{d}: checkpoint format_version {version!r} is not one this fiseclip_jax reads "
                              f"(1..{FORMAT_VERSION}; written by a newer version?); re-convert the original "
                              f"weights with this version: `fiseclip-jax convert SRC --out DIR --force`")
    return cfg, version


def read_checkpoint(d: Path, sharding=None, verify: bool = True):
    """(params, cfg) of the checkpoint directory `d`, in the current layout whatever its format version.

    `sharding`: one `jax.sharding.Sharding` for every leaf, or a pytree of them shaped like the
    params; default the first device. `verify` checks every leaf against checksums.json.
    """
    import orbax.checkpoint as ocp

    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory (a weights file? {HOW_TO_CONVERT})")
    if not (d / "params").is_dir() or not (d / "config.json").is_file():
        hint = (f"it looks like unconverted weights: {HOW_TO_CONVERT}" if looks_like_source(d)
                else "expected params/ and config.json written by save_clip / fiseclip-jax convert")
        raise CheckpointError(f"{d}: not a fiseclip_jax checkpoint; {hint}")
    cfg, version = _read_config(d)

    final = _target(param_shapes(cfg), sharding, d)
    # Format 1 is restored as stored (stacked, first device), then unstacked and placed.
    target = final if version == FORMAT_VERSION else _target(_stacked_shapes(cfg), None, d)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            meta = ckpt.metadata(d / "params").item_metadata
        except Exception as e:
            raise CheckpointError(f"{d}: checkpoint is incomplete or corrupt: cannot read its metadata "
                                  f"({type(e).__name__}: {first_line(e)})") from e
        stored = _flat(getattr(meta, "tree", meta) or {}, is_leaf=lambda x: hasattr(x, "shape"))
        if not stored:  # orbax 0.12 only logs a warning when the OCDBT manifest is gone
            raise CheckpointError(f"{d}: checkpoint is incomplete or corrupt: no arrays listed in "
                                  f"{d / 'params'} (manifest.ocdbt or _METADATA missing?)")
        probs = _shape_problems(stored, _flat(target))
        if probs:
            raise CheckpointError(f"{d}: config.json describes {cfg.name} (format_version {version}) but the "
                                  f"stored arrays do not fit it: {_summary(probs)}")
        try:
            params = ckpt.restore(d / "params", target)
        except Exception as e:
            raise CheckpointError(f"{d}: checkpoint data is truncated or corrupt "
                                  f"({type(e).__name__}: {first_line(e)})") from e

    if verify and (d / "checksums.json").is_file():
        sums = json.loads((d / "checksums.json").read_text())
        flat = _flat(params)
        bad = [k for k, v in flat.items()
               if k in sums and v.is_fully_addressable and _digest(np.asarray(v)) != sums[k]]
        if bad or set(sums) != set(flat):
            raise CheckpointError(f"{d}: restored arrays differ from checksums.json "
                                  f"({_summary(bad or sorted(set(sums) ^ set(flat)))})")
    if version == 1:
        params = jax.device_put(unstack_blocks(params), jax.tree.map(lambda t: t.sharding, final))
    return params, cfg
