"""Saving and loading converted CLIP weights (orbax), and resolving a weights spec.

A checkpoint directory holds

    params/          orbax StandardCheckpointer tree (nested dicts of float32, blocks stacked)
    config.json      CLIPConfig.to_json()
    checksums.json   sha256 of every leaf's bytes (so a restore is verified bit-exact)
    source.json      what it was converted from (written by `convert_clip`; optional)

`load_clip` also takes a Hugging Face hub id: a conversion cached under `weights_dir()`
is used, else the hub is asked once (short timeout) and the result converted and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from .config import CLIPConfig, get_config
from .modeling import init_clip, param_shapes

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HOW_TO_CONVERT = ("convert a local copy with `fiseclip-jax convert SRC --out DIR` (SRC: a Hugging Face "
                   "CLIP directory, an OpenAI .pt file or an OpenCLIP state dict; see weights/README.md), "
                   "then pass DIR")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt, or does not match its config."""


def _flat(tree, is_leaf=None) -> dict[str, object]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _digest(a) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a))).hexdigest()


def _shape_problems(found: dict, expected: dict, what: str = "stored") -> list[str]:
    probs = [f"missing {k}" for k in expected if k not in found]
    probs += [f"unexpected {k}" for k in found if k not in expected]
    probs += [f"{k}: {what} {tuple(found[k].shape)} {np.dtype(found[k].dtype)} vs expected "
              f"{tuple(expected[k].shape)} float32" for k in expected
              if k in found and (tuple(found[k].shape) != tuple(expected[k].shape)
                                 or np.dtype(found[k].dtype) != np.float32)]
    return probs


def _summary(probs: list[str], n: int = 6) -> str:
    return "; ".join(probs[:n]) + (f"; ... ({len(probs) - n} more)" if len(probs) > n else "")


# ---------------------------------------------------------------- save
def save_clip(params, cfg: CLIPConfig, out, *, source: dict | None = None, overwrite: bool = False) -> Path:
    """Write `params` (numpy or jax leaves) and `cfg` to the directory `out`; returns its path.

    Written to a temporary sibling and renamed, so an interrupted save leaves no half checkpoint.
    """
    import orbax.checkpoint as ocp

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
        (tmp / "config.json").write_text(cfg.to_json() + "\n")
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
def _target(cfg: CLIPConfig, sharding, where: Path):
    shapes = param_shapes(cfg)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    try:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, sharding)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: `sharding` must be one jax.sharding.Sharding or a pytree of them "
                              f"with the parameter tree's structure ({e})") from e


def _looks_like_source(d: Path) -> bool:
    return any((d / n).exists() for n in ("open_clip_config.json", "model.safetensors", "pytorch_model.bin"))


def _load_dir(d: Path, sharding, verify: bool):
    import orbax.checkpoint as ocp

    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory (a weights file? {_HOW_TO_CONVERT})")
    if not (d / "params").is_dir() or not (d / "config.json").is_file():
        hint = (f"it looks like unconverted weights: {_HOW_TO_CONVERT}" if _looks_like_source(d)
                else "expected params/ and config.json written by save_clip / fiseclip-jax convert")
        raise CheckpointError(f"{d}: not a fiseclip_jax checkpoint; {hint}")
    try:
        cfg = CLIPConfig.from_json((d / "config.json").read_text())
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{d / 'config.json'}: not a valid CLIPConfig ({e})") from e

    target = _target(cfg, sharding, d)
    with ocp.StandardCheckpointer() as ckpt:
        try:
            meta = ckpt.metadata(d / "params").item_metadata
        except Exception as e:
            raise CheckpointError(f"{d}: checkpoint is incomplete or corrupt: cannot read its metadata "
                                  f"({type(e).__name__}: {_first_line(e)})") from e
        stored = _flat(getattr(meta, "tree", meta) or {}, is_leaf=lambda x: hasattr(x, "shape"))
        if not stored:  # orbax 0.12 only logs a warning when the OCDBT manifest is gone
            raise CheckpointError(f"{d}: checkpoint is incomplete or corrupt: no arrays listed in "
                                  f"{d / 'params'} (manifest.ocdbt or _METADATA missing?)")
        probs = _shape_problems(stored, _flat(target))
        if probs:
            raise CheckpointError(f"{d}: config.json describes {cfg.name} but the stored arrays do not fit "
                                  f"it: {_summary(probs)}")
        try:
            params = ckpt.restore(d / "params", target)
        except Exception as e:
            raise CheckpointError(f"{d}: checkpoint data is truncated or corrupt "
                                  f"({type(e).__name__}: {_first_line(e)})") from e

    if verify and (d / "checksums.json").is_file():
        sums = json.loads((d / "checksums.json").read_text())
        bad = [k for k, v in _flat(params).items()
               if k in sums and v.is_fully_addressable and _digest(np.asarray(v)) != sums[k]]
        if bad or set(sums) != set(_flat(params)):
            raise CheckpointError(f"{d}: restored arrays differ from checksums.json "
                                  f"({_summary(bad or sorted(set(sums) ^ set(_flat(params))))})")
    return params, cfg


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else ""


# ---------------------------------------------------------------- hub
def weights_dir() -> Path:
    """Where hub conversions are cached: $FISECLIP_WEIGHTS, else <repo>/weights in a checkout,
    else ~/.cache/fiseclip_jax/weights."""
    env = os.environ.get("FISECLIP_WEIGHTS")
    if env:
        return Path(env).expanduser()
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file():
        return root / "weights"
    return Path.home() / ".cache" / "fiseclip_jax" / "weights"


def hub_cache_path(hub_id: str) -> Path:
    return weights_dir() / hub_id.replace("/", "--")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")


def _snapshot(hub_id: str, offline: bool) -> Path:
    from huggingface_hub import snapshot_download

    kw = dict(etag_timeout=5, local_files_only=offline)
    snap = Path(snapshot_download(hub_id, allow_patterns=["config.json", "open_clip_config.json", "*.safetensors"],
                                  **kw))
    if not any(snap.glob("*.safetensors")):  # older repos: PyTorch pickles only (needs torch to read)
        snap = Path(snapshot_download(hub_id, allow_patterns=["config.json", "open_clip_config.json",
                                                              "pytorch_model.bin", "open_clip_pytorch_model.bin"],
                                      **kw))
    return snap


def _load_hub(hub_id: str, sharding, verify: bool):
    cached = hub_cache_path(hub_id)
    if (cached / "config.json").is_file():
        return _load_dir(cached, sharding, verify)
    import huggingface_hub.constants

    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") \
        or bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        snap = _snapshot(hub_id, offline)  # offline: only the local Hugging Face cache, no network
    except Exception as e:
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
               else f"the Hugging Face hub cannot be reached or has no such model ({type(e).__name__}: "
                    f"{_first_line(e)})")
        raise CheckpointError(f"{hub_id}: no converted checkpoint at {cached}, and {why}. To use it, convert "
                              f"a local copy (a Hugging Face CLIP directory, an OpenAI .pt file or an OpenCLIP "
                              f"state dict; see weights/README.md) with `fiseclip-jax convert SRC --out {cached}` "
                              f"and call again") from e
    from .convert import convert_clip

    print(f"fiseclip_jax: converting {hub_id} ({snap}) into {cached}", file=sys.stderr)
    convert_clip(snap, cached)
    return _load_dir(cached, sharding, verify)


# ---------------------------------------------------------------- public entry points
def load_clip(path_or_hub_id, *, sharding=None, verify: bool = True):
    """(params, cfg) from a checkpoint directory or a hub id (e.g. "openai/clip-vit-large-patch14-336").

    `sharding`: one `jax.sharding.Sharding` for every leaf, or a pytree of them shaped like the
    params; default the first device. `verify` checks every leaf against checksums.json.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        return _load_dir(p.resolve(), sharding, verify)
    s = str(path_or_hub_id)
    if _HUB_ID.fullmatch(s):
        return _load_hub(s, sharding, verify)
    raise CheckpointError(f"{s}: no such checkpoint directory, and not a hub id (owner/name); "
                          f"{_HOW_TO_CONVERT}")


def resolve_weights(spec: str, *, seed: int = 0, sharding=None):
    """(params, cfg, is_random) from a checkpoint dir, a hub id, or "random:PRESET".

    "random:PRESET" (e.g. "random:ViT-B/16", "random:tiny") gives `init_clip` weights: for smoke
    tests and benchmarks only; every score computed with them is meaningless.
    """
    if spec.startswith("random:"):
        cfg = get_config(spec[len("random:"):])
        params = init_clip(cfg, jax.random.key(seed))
        if sharding is not None:
            params = jax.device_put(params, sharding)
        return params, cfg, True
    params, cfg = load_clip(spec, sharding=sharding)
    return params, cfg, False
