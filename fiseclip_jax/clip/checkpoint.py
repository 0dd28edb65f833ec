"""Loading CLIP weights by name: a checkpoint directory, a Hugging Face hub id, or "random:PRESET".

The one module that uses both the checkpoint store (`store.py`: orbax directories and their
format versions) and the converters (`convert.py`): a hub id is served from a conversion
cached under `weights_dir()`, else the hub is asked once (short timeout) and the download
converted and cached.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import jax

from .config import get_config
from .convert import convert_clip
from .modeling import init_clip
from .store import HOW_TO_CONVERT, CheckpointError, first_line, read_checkpoint, save_clip

__all__ = ["CheckpointError", "hub_cache_path", "load_clip", "resolve_weights", "save_clip", "weights_dir"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
        return read_checkpoint(cached, sharding, verify)
    import huggingface_hub.constants

    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") \
        or bool(huggingface_hub.constants.HF_HUB_OFFLINE)
    try:
        snap = _snapshot(hub_id, offline)  # offline: only the local Hugging Face cache, no network
    except Exception as e:
        why = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
               else f"the Hugging Face hub cannot be reached or has no such model ({type(e).__name__}: "
                    f"{first_line(e)})")
        raise CheckpointError(f"{hub_id}: no converted checkpoint at {cached}, and {why}. To use it, convert "
                              f"a local copy (a Hugging Face CLIP directory, an OpenAI .pt file or an OpenCLIP "
                              f"state dict; see weights/README.md) with `fiseclip-jax convert SRC --out {cached}` "
                              f"and call again") from e
    print(f"fiseclip_jax: converting {hub_id} ({snap}) into {cached}", file=sys.stderr)
    convert_clip(snap, cached)
    return read_checkpoint(cached, sharding, verify)


# ---------------------------------------------------------------- public entry points
def load_clip(path_or_hub_id, *, sharding=None, verify: bool = True):
    """(params, cfg) from a checkpoint directory or a hub id (e.g. "openai/clip-vit-large-patch14-336").

    `sharding`: one `jax.sharding.Sharding` for every leaf, or a pytree of them shaped like the
    params; default the first device. `verify` checks every leaf against checksums.json.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        return read_checkpoint(p.resolve(), sharding, verify)
    s = str(path_or_hub_id)
    if _HUB_ID.fullmatch(s):
        return _load_hub(s, sharding, verify)
    raise CheckpointError(f"{s}: no such checkpoint directory, and not a hub id (owner/name); "
                          f"{HOW_TO_CONVERT}")


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
