"""Convert released CLIP weights to our parameter tree and write a checkpoint (SPEC §1, §8).

Sources (detected from the files and keys, never from a guess):

    hf        a Hugging Face CLIP directory: config.json + model*.safetensors or pytorch_model.bin
    openai    an OpenAI CLIP `.pt` TorchScript archive (or its state dict, which keeps the
              `input_resolution` / `context_length` / `vocab_size` entries)
    openclip  an OpenCLIP state dict (.pt, .bin, .safetensors; possibly {"state_dict": ...}
              with a "module." prefix), or an OpenCLIP hub directory (open_clip_config.json)

The MLP activation cannot be read from weight shapes and a wrong one runs without
error, so it comes from the source when the source states it (OpenAI: QuickGELU;
HF: `hidden_act`; open_clip_config.json: `quick_gelu`) and otherwise from the caller;
see `resolve_act`.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from .config import ACTIVATIONS, PRESETS, CLIPConfig, TextConfig, VisionConfig, get_config
from .params import (HF_RULES, ConversionError, Rule, block, block_path, conv_to_hwio, convert_state_dict,
                     ignore, ln_block, ln_put, put, transpose)
from .sources import read_source, sha256_file
from .store import save_clip
from ..errors import FiseclipError

# Presets that exist only as OpenCLIP models; all their released weights use exact GELU.
OPENCLIP_NATIVE_PRESETS = ("ViT-B-16-plus-240",)


class ActivationError(ConversionError):
    """The activation of a source cannot be determined: the caller must say it."""


class ActivationOverrideWarning(UserWarning):
    """An explicit `act` overrides the activation the source declares."""


def _notice(msg: str) -> None:
    print(f"fiseclip_jax: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- OpenAI / OpenCLIP key layout
def _fused_qkv(kind: str):
    """`attn.in_proj_{weight,bias}` [3W, W] / [3W] -> q, k, v (weights transposed to [in, out])."""

    def h(m, a):
        if a.shape[0] % 3:
            raise ConversionError(f"{m.string}: first axis {a.shape[0]} is not 3 x width (fused q, k, v)")
        return [(block_path(m, "attn", name, kind), part.T if kind == "kernel" else part)
                for name, part in zip(("q", "k", "v"), np.split(a, 3, axis=0))]

    return h


# The optional group is absent for text keys, so `params.tower` maps them to "text".
_R = r"(?:(?P<tower>visual)\.)?transformer\.resblocks\.(?P<layer>\d+)\."
OPENAI_RULES: list[Rule] = [
    # Metadata of the OpenAI TorchScript archive and OpenCLIP's causal-mask buffer: not parameters.
    (r"input_resolution|context_length|vocab_size", ignore),
    (r"attn_mask", ignore),
    (r"logit_scale", put("logit_scale")),
    (r"visual\.class_embedding", put("vision", "class_embed")),
    (r"visual\.positional_embedding", put("vision", "pos_embed")),
    (r"visual\.conv1\.weight", put("vision", "patch_embed", "kernel", transform=conv_to_hwio)),
    (r"visual\.ln_pre\.(?P<wb>weight|bias)", ln_put("vision", "ln_pre")),
    (r"visual\.ln_post\.(?P<wb>weight|bias)", ln_put("vision", "ln_post")),
    (r"visual\.proj", put("vision", "proj")),  # already [W, D]: x @ proj
    (r"token_embedding\.weight", put("text", "token_embed")),
    (r"positional_embedding", put("text", "pos_embed")),
    (r"ln_final\.(?P<wb>weight|bias)", ln_put("text", "ln_final")),
    (r"text_projection", put("text", "proj")),  # already [W, D]
    (_R + r"attn\.in_proj_weight", _fused_qkv("kernel")),
    (_R + r"attn\.in_proj_bias", _fused_qkv("bias")),
    (_R + r"attn\.out_proj\.weight", block("attn", "out", "kernel", transform=transpose)),
    (_R + r"attn\.out_proj\.bias", block("attn", "out", "bias")),
    (_R + r"ln_1\.(?P<wb>weight|bias)", ln_block("ln_1")),
    (_R + r"ln_2\.(?P<wb>weight|bias)", ln_block("ln_2")),
    (_R + r"mlp\.c_fc\.weight", block("mlp", "fc1", "kernel", transform=transpose)),
    (_R + r"mlp\.c_fc\.bias", block("mlp", "fc1", "bias")),
    (_R + r"mlp\.c_proj\.weight", block("mlp", "fc2", "kernel", transform=transpose)),
    (_R + r"mlp\.c_proj\.bias", block("mlp", "fc2", "bias")),
]

RULES = {"openai": OPENAI_RULES, "hf": HF_RULES}


def from_openai_state_dict(state_dict, cfg: CLIPConfig):
    """Parameters from an OpenAI or OpenCLIP (ViT) state dict."""
    return convert_state_dict(state_dict, cfg, OPENAI_RULES)


# ---------------------------------------------------------------- architecture from shapes
def _arch_key(cfg: CLIPConfig, heads: bool = True) -> dict:
    """Everything that fixes the parameter shapes (and, optionally, the head count)."""
    d = cfg.to_dict()
    del d["name"], d["act"], d["dtype"]
    if not heads:
        del d["vision"]["heads"], d["text"]["heads"]
    return d


def _arch_diff(a: CLIPConfig, b: CLIPConfig, heads: bool = True) -> str:
    ka, kb = _arch_key(a, heads), _arch_key(b, heads)
    diffs = []
    for k in ka:
        if isinstance(ka[k], dict):
            diffs += [f"{k}.{s}: {ka[k][s]} vs {kb[k][s]}" for s in ka[k] if ka[k][s] != kb[k][s]]
        elif ka[k] != kb[k]:
            diffs.append(f"{k}: {ka[k]} vs {kb[k]}")
    return "; ".join(diffs)


def _count_layers(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


def _shape(sd, key: str, where: str = "") -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"{where}cannot infer the architecture: key {key!r} is missing")
    return tuple(sd[key].shape)


# Where each shape-visible size sits in each key layout; proj is (key, axis of the embed dim).
_SHAPE_KEYS = {
    "openai": dict(patch="visual.conv1.weight", vision_pos="visual.positional_embedding",
                   proj=("visual.proj", 1), token="token_embedding.weight", text_pos="positional_embedding",
                   vision_blocks="visual.transformer.resblocks.", text_blocks="transformer.resblocks.",
                   fc1="0.mlp.c_fc.weight"),
    "hf": dict(patch="vision_model.embeddings.patch_embedding.weight",
               vision_pos="vision_model.embeddings.position_embedding.weight",
               proj=("visual_projection.weight", 0), token="text_model.embeddings.token_embedding.weight",
               text_pos="text_model.embeddings.position_embedding.weight",
               vision_blocks="vision_model.encoder.layers.", text_blocks="text_model.encoder.layers.",
               fc1="0.mlp.fc1.weight"),
}


def _infer_shapes(sd, layout: str, where: str = "") -> dict:
    """Shape-visible architecture: widths, depths, patch, grid, vocab, context, embed dim."""
    if layout not in _SHAPE_KEYS:
        raise FiseclipError(f"layout must be one of {sorted(RULES)}, got {layout!r}")
    k = _SHAPE_KEYS[layout]
    w, _, p, _ = _shape(sd, k["patch"], where)
    n_pos = _shape(sd, k["vision_pos"], where)[0]
    embed = _shape(sd, k["proj"][0], where)[k["proj"][1]]
    vocab, tw = _shape(sd, k["token"], where)
    ctx = _shape(sd, k["text_pos"], where)[0]
    vl, tl = _count_layers(sd, k["vision_blocks"]), _count_layers(sd, k["text_blocks"])
    vm, tm = sd.get(k["vision_blocks"] + k["fc1"]), sd.get(k["text_blocks"] + k["fc1"])
    g = math.isqrt(n_pos - 1)
    if g * g != n_pos - 1:
        raise ConversionError(f"{where}vision position embedding has {n_pos} rows, not 1 + a square grid")
    return dict(embed_dim=embed, vw=w, vl=vl, patch=p, size=g * p, vm=vm.shape[0] if vm is not None else 4 * w,
                tw=tw, tl=tl, vocab=vocab, ctx=ctx, tm=tm.shape[0] if tm is not None else 4 * tw)


def _preset_candidates(cfg: CLIPConfig, heads: bool) -> list[CLIPConfig]:
    return [p for p in PRESETS.values() if _arch_key(p, heads) == _arch_key(cfg, heads)]


def _from_shapes(s: dict, where: str = "") -> tuple[CLIPConfig, list[CLIPConfig]]:
    """A config for the shapes (act a placeholder) and the presets with the same shapes."""

    def heads(w, tower):  # OpenAI / OpenCLIP rule: 64-wide heads
        if w % 64:
            raise ConversionError(f"{where}cannot infer the {tower} head count: width {w} is not a multiple "
                                  f"of 64 and matches no preset; pass arch=PRESET")
        return w // 64

    def build(vh, th):
        return CLIPConfig(
            name=f"ViT-w{s['vw']}-L{s['vl']}-p{s['patch']}-{s['size']}", embed_dim=s["embed_dim"],
            vision=VisionConfig(width=s["vw"], layers=s["vl"], heads=vh, patch_size=s["patch"],
                                image_size=s["size"], mlp_dim=s["vm"]),
            text=TextConfig(width=s["tw"], layers=s["tl"], heads=th, vocab_size=s["vocab"],
                            context_length=s["ctx"], mlp_dim=s["tm"]))

    probe = build(1, 1)  # heads=1 is valid for any width; only used for shape matching
    candidates = _preset_candidates(probe, heads=False)
    if candidates:
        return candidates[0], candidates
    return build(heads(s["vw"], "vision"), heads(s["tw"], "text")), []


def _pick(candidates: list[CLIPConfig], act: str) -> CLIPConfig:
    same = [c for c in candidates if c.act == act]
    return (same or candidates)[0].replace(act=act)


def infer_config(state_dict, layout: str = "openai", act: str = "quick_gelu") -> CLIPConfig:
    """The architecture of a state dict from its shapes (SPEC §1); `act` must be given: shapes hide it.

    heads = width // 64 (OpenAI / OpenCLIP rule) unless the shapes equal a preset's, whose
    name and head count are then used.
    """
    if act not in ACTIVATIONS:
        raise FiseclipError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    cfg, candidates = _from_shapes(_infer_shapes(state_dict, layout))
    return _pick(candidates, act) if candidates else cfg.replace(act=act)


# ---------------------------------------------------------------- activation (SPEC §1, §8)
def resolve_act(declared: str | None, declared_by: str, *, act: str | None = None, arch: str | None = None,
                shape_presets: tuple[str, ...] = (), filename: str = "") -> tuple[str, str]:
    """(activation, where it came from). Never a silent guess.

    1. `act` given: used. If the source declares another one, a loud warning (SPEC §8: MuSc
       runs OpenAI weights with GELU on purpose).
    2. Else the source's declaration (OpenAI archive, HF config.json, open_clip_config.json).
    3. Else (a bare OpenCLIP state dict): "quickgelu" in the file name -> quick_gelu; `arch`
       or the shapes naming an OpenCLIP-native preset -> its activation; each with a notice,
       and an error if they disagree.
    4. Else an `ActivationError` asking for `--act quick_gelu|gelu`.
    """
    if act is not None:
        if act not in ACTIVATIONS:
            raise ActivationError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        if declared is not None and declared != act:
            msg = (f"activation OVERRIDE: {declared_by} declares {declared!r} but act={act!r} was given; "
                   f"the model will run with {act!r} (correct only to reproduce code that does this "
                   f"on purpose, e.g. MuSc, SPEC §8)")
            warnings.warn(msg, ActivationOverrideWarning, stacklevel=3)
            _notice("WARNING: " + msg)
            return act, f"argument (overrides {declared!r} from {declared_by})"
        return act, "argument"
    if declared is not None:
        return declared, declared_by

    hints: dict[str, str] = {}
    if "quickgelu" in filename.lower().replace("_", "").replace("-", ""):
        hints["quick_gelu"] = f"file name {filename!r} contains 'quickgelu'"
    native = [n for n in ([arch] if arch else []) + list(shape_presets) if n in OPENCLIP_NATIVE_PRESETS]
    for n in native:
        hints.setdefault(PRESETS[n].act, f"OpenCLIP-native preset {n} uses {PRESETS[n].act}")
    if len(hints) > 1:
        raise ActivationError("conflicting activation hints: " + "; ".join(f"{k} ({v})" for k, v in hints.items())
                              + "; pass --act quick_gelu|gelu")
    if hints:
        (a, why), = hints.items()
        _notice(f"activation {a!r} inferred: {why} ({declared_by} does not state it)")
        return a, why
    raise ActivationError(
        f"{declared_by} does not state the MLP activation and it cannot be seen in the weights; "
        f"pass --act quick_gelu|gelu (act='quick_gelu' or 'gelu'): OpenAI-trained and '*-quickgelu' "
        f"OpenCLIP models use quick_gelu, other OpenCLIP models (e.g. ViT-B-16-plus-240 laion400m) gelu. "
        f"A wrong activation runs without error and ruins every score (SPEC §1).")


def convert_clip(src, out=None, arch: str | None = None, act: str | None = None, *, overwrite: bool = False):
    """Convert `src` (HF dir, OpenAI .pt, OpenCLIP state dict) -> (params, cfg); write a checkpoint to `out`.

    `arch` (a preset name), if given, must match the weights' shapes. `act` follows
    `resolve_act`. `out` (if not None) receives the orbax checkpoint, config.json and
    source.json (source path, format, sha256, activation and where it came from).
    Returned params are numpy float32 (host memory).
    """
    src = Path(src).expanduser().resolve()
    sd, layout, fmt, cfg, declared, declared_by, files = read_source(src)
    where = f"{src}: "
    preset = get_config(arch) if arch is not None else None

    if cfg is None:  # shapes only
        shaped, candidates = _from_shapes(_infer_shapes(sd, layout, where), where)
        if preset is not None and _arch_key(preset, heads=False) != _arch_key(shaped, heads=False):
            raise ConversionError(f"{where}arch {arch!r} does not match the weights, which are "
                                  f"{shaped.name} ({_arch_diff(shaped, preset, heads=False)} [weights vs {arch}])")
        names = tuple(c.name for c in candidates)
        act, act_source = resolve_act(declared, declared_by, act=act, arch=arch, shape_presets=names,
                                      filename=src.name)
        cfg = preset.replace(act=act) if preset is not None else (
            _pick(candidates, act) if candidates else shaped.replace(act=act))
    else:  # Hugging Face: config.json gives the architecture, heads included
        if preset is not None and _arch_key(preset) != _arch_key(cfg):
            raise ConversionError(f"{where}arch {arch!r} does not match config.json "
                                  f"({_arch_diff(cfg, preset)} [config.json vs {arch}])")
        act, act_source = resolve_act(declared, declared_by, act=act, arch=arch)
        same = _preset_candidates(cfg, heads=True)
        cfg = preset.replace(act=act) if preset is not None else (
            _pick(same, act) if same else cfg.replace(act=act))

    try:
        params = convert_state_dict(sd, cfg, RULES[layout])
    except ConversionError as e:
        raise ConversionError(f"{where}{e}") from e

    if out is not None:
        base = src if src.is_dir() else src.parent
        hashes = {str(f.relative_to(base)): sha256_file(f) for f in files}
        main = files[-1]
        source = {"source": str(src), "format": fmt, "layout": layout,
                  "sha256": hashes[str(main.relative_to(base))], "files": hashes,
                  "act": act, "act_source": act_source, "arch": cfg.name}
        save_clip(params, cfg, out, source=source, overwrite=overwrite)
    return params, cfg
