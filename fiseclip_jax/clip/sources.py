"""Reading released CLIP weight files: Hugging Face, OpenAI TorchScript, OpenCLIP (for `convert`)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .config import CLIPConfig
from .params import ConversionError

# Entries an OpenAI CLIP archive carries beside its weights.
OPENAI_MARKERS = ("input_resolution", "context_length", "vocab_size")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _torch(path: Path):
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading PyTorch files needs torch (pip install torch); "
                              f".safetensors files need only safetensors") from None
    return torch


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for k in f.keys():
                try:
                    out[k] = f.get_tensor(k)
                except TypeError:  # bfloat16 has no numpy dtype: read through jax
                    with safe_open(str(path), framework="flax") as g:
                        out[k] = np.asarray(g.get_tensor(k), np.float32)
    except SafetensorError as e:  # a corrupt or truncated file
        raise ConversionError(f"{path}: not a readable .safetensors file ({e})") from None
    return out


def _read_torch(path: Path) -> tuple[dict, bool]:
    """(state dict, came from a TorchScript archive)."""
    torch = _torch(path)
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's archives are TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), True
        except RuntimeError:
            pass  # not loadable as TorchScript: try as a plain state dict, like clip.load
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read as a TorchScript archive or a state dict "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return obj, False


def _unwrap(obj, path: Path) -> dict:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # OpenCLIP training checkpoint {"epoch", "name", "state_dict", ...}
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: expected a state dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _read_weights(path: Path) -> tuple[dict, bool]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), False
    if path.suffix in (".pt", ".pth", ".bin"):
        obj, jit = _read_torch(path)
        return _unwrap(obj, path), jit
    raise ConversionError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors, .pt, .pth or .bin")


def _layout(sd: dict, path: Path) -> str:
    keys = list(sd)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith(("visual.attnpool.", "visual.layer1.")) for k in keys):
        raise ConversionError(f"{path}: a ResNet CLIP; only ViT models are supported")
    if "visual.proj" in sd or any(k.startswith("visual.transformer.") for k in keys):
        return "openai"
    raise ConversionError(f"{path}: unknown key layout (neither OpenAI/OpenCLIP ViT nor Hugging Face "
                          f"CLIPModel); first keys: {keys[:8]}")


def _weights_in_dir(d: Path, names: tuple[str, ...]) -> list[Path]:
    for pattern in names:
        found = sorted(d.glob(pattern))
        if found:
            return found
    raise FileNotFoundError(f"{d}: no weights file found (looked for {', '.join(names)})")


def read_source(src: Path):
    """(state dict, layout, format, config or None, declared act, declared by, files read)."""
    if src.is_file() and (src.parent / "config.json").is_file() and src.suffix in (".safetensors", ".bin") \
            and _is_hf_config(src.parent / "config.json"):
        src = src.parent  # a weights file inside a Hugging Face directory
    if src.is_dir():
        if (src / "config.json").is_file() and _is_hf_config(src / "config.json"):
            files = _weights_in_dir(src, ("model.safetensors", "model-*.safetensors", "pytorch_model.bin"))
            sd = {}
            for f in files:
                sd.update(_read_weights(f)[0])
            from transformers import CLIPConfig as HFCLIPConfig
            try:
                hf = HFCLIPConfig.from_pretrained(str(src))
                cfg = CLIPConfig.from_hf_config(hf, name=_hf_name(src))
            except Exception as e:
                raise ConversionError(f"{src / 'config.json'}: not a usable CLIP config ({e})") from e
            declared = cfg.act
            return sd, "hf", "hf", cfg, declared, f"{src / 'config.json'} (hidden_act)", [src / "config.json", *files]
        if (src / "open_clip_config.json").is_file():
            files = _weights_in_dir(src, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
            sd, _ = _read_weights(files[0])
            meta = json.loads((src / "open_clip_config.json").read_text())
            quick = bool(meta.get("model_cfg", {}).get("quick_gelu", False))
            declared = "quick_gelu" if quick else "gelu"
            return (sd, _layout(sd, files[0]), "openclip", None, declared,
                    f"{src / 'open_clip_config.json'} (model_cfg.quick_gelu={quick})",
                    [src / "open_clip_config.json", files[0]])
        raise ConversionError(f"{src}: a directory without a Hugging Face CLIP config.json or an "
                              f"open_clip_config.json; pass the weights file itself")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    sd, jit = _read_weights(src)
    layout = _layout(sd, src)
    if jit or any(k in sd for k in OPENAI_MARKERS):
        if layout != "openai":
            raise ConversionError(f"{src}: OpenAI archive without the OpenAI key layout")
        what = "OpenAI TorchScript archive" if jit else "OpenAI CLIP state dict"
        return sd, "openai", "openai", None, "quick_gelu", f"{src} ({what})", [src]
    fmt = "openclip" if layout == "openai" else "hf-state-dict"
    return sd, layout, fmt, None, None, f"{src} ({fmt} state dict)", [src]


def _hf_name(d: Path) -> str:
    """The directory name, or "owner/name" for a hub cache snapshot (models--owner--name/snapshots/<sha>)."""
    if re.fullmatch(r"[0-9a-f]{40}", d.name) and d.parent.name == "snapshots":
        return d.parents[1].name.removeprefix("models--").replace("--", "/")
    return d.name


def _is_hf_config(path: Path) -> bool:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and ("vision_config" in d or d.get("model_type") == "clip")


# ---------------------------------------------------------------- entry point
