"""Conversion of PyTorch CLIP state dicts to the `CLIP` module's parameter tree (bonsai-style rule tables).

A rule is `(regex on the source key, handler)`; a handler returns a list of
`(target path, numpy array)`; block leaves go to `{tower}.transformer.blocks_{i}`
(the tree is documented in `model.py`). The result is checked against the abstract
tree of `CLIP(cfg).init` (`param_shapes`): every source key must be used exactly once,
every target filled exactly once, and every shape must match — otherwise
`ConversionError` names the offending keys.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import jax
import numpy as np

from .config import CLIPConfig
from .modeling import param_shapes
from ..errors import FiseclipError

Target = tuple[tuple[str, ...], np.ndarray]
Handler = Callable[[re.Match, np.ndarray], list[Target]]
Rule = tuple[str, Handler]


class ConversionError(FiseclipError):
    """A source state dict does not fit the target architecture."""


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


# ---------------------------------------------------------------- handlers
def tower(m: re.Match) -> str:
    return "vision" if m.group("tower") in ("vision", "visual") else "text"


def put(*path: str, transform=None) -> Handler:
    """Copy to a fixed path (optionally transformed); `{tower}` in a path is filled from the match."""

    def h(m, a):
        p = tuple(tower(m) if s == "{tower}" else s for s in path)
        return [(p, transform(a) if transform else a)]

    return h


def block_path(m: re.Match, *path: str) -> tuple[str, ...]:
    """{tower}.transformer.blocks_{layer}.<path>, the match's `layer` group giving the block."""
    return (tower(m), "transformer", f"blocks_{int(m.group('layer'))}", *path)


def block(*path: str, transform=None) -> Handler:
    """A per-block leaf; `<group>` in a path is filled from the match."""

    def h(m, a):
        p = block_path(m, *(m.group(s[1:-1]) if s.startswith("<") else s for s in path))
        return [(p, transform(a) if transform else a)]

    return h


def transpose(a):  # torch Linear [out, in] -> our kernel [in, out]
    return a.T


def conv_to_hwio(a):  # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
    return a.transpose(2, 3, 1, 0)


def ignore(m, a) -> list[Target]:
    return []


LN = {"weight": "scale", "bias": "bias"}


def ln_block(name: str) -> Handler:
    def h(m, a):
        return [(block_path(m, name, LN[m.group("wb")]), a)]

    return h


def ln_put(*path: str) -> Handler:
    def h(m, a):
        p = tuple(tower(m) if s == "{tower}" else s for s in path)
        return [(p + (LN[m.group("wb")],), a)]

    return h


# Hugging Face `CLIPModel` keys. `position_ids` are buffers, not parameters.
_T = r"(?P<tower>vision|text)_model"
_L = _T + r"\.encoder\.layers\.(?P<layer>\d+)\."
HF_RULES: list[Rule] = [
    (_T + r"\.embeddings\.position_ids", ignore),
    (r"logit_scale", put("logit_scale")),
    (r"(?P<tower>text)_model\.embeddings\.token_embedding\.weight", put("{tower}", "token_embed")),
    (_T + r"\.embeddings\.position_embedding\.weight", put("{tower}", "pos_embed")),
    (r"(?P<tower>vision)_model\.embeddings\.class_embedding", put("{tower}", "class_embed")),
    (r"(?P<tower>vision)_model\.embeddings\.patch_embedding\.weight",
     put("{tower}", "patch_embed", "kernel", transform=conv_to_hwio)),
    (r"(?P<tower>vision)_model\.pre_layrnorm\.(?P<wb>weight|bias)", ln_put("{tower}", "ln_pre")),
    (r"(?P<tower>vision)_model\.post_layernorm\.(?P<wb>weight|bias)", ln_put("{tower}", "ln_post")),
    (r"(?P<tower>text)_model\.final_layer_norm\.(?P<wb>weight|bias)", ln_put("{tower}", "ln_final")),
    (r"(?P<tower>visual)_projection\.weight", put("vision", "proj", transform=transpose)),
    (r"(?P<tower>text)_projection\.weight", put("text", "proj", transform=transpose)),
    (_L + r"self_attn\.(?P<qkv>q|k|v)_proj\.weight", block("attn", "<qkv>", "kernel", transform=transpose)),
    (_L + r"self_attn\.(?P<qkv>q|k|v)_proj\.bias", block("attn", "<qkv>", "bias")),
    (_L + r"self_attn\.out_proj\.weight", block("attn", "out", "kernel", transform=transpose)),
    (_L + r"self_attn\.out_proj\.bias", block("attn", "out", "bias")),
    (_L + r"layer_norm1\.(?P<wb>weight|bias)", ln_block("ln_1")),
    (_L + r"layer_norm2\.(?P<wb>weight|bias)", ln_block("ln_2")),
    (_L + r"mlp\.(?P<fc>fc1|fc2)\.weight", block("mlp", "<fc>", "kernel", transform=transpose)),
    (_L + r"mlp\.(?P<fc>fc1|fc2)\.bias", block("mlp", "<fc>", "bias")),
]


# ---------------------------------------------------------------- engine
def convert_state_dict(state_dict, cfg: CLIPConfig, rules: Iterable[Rule]):
    """Apply `rules` to a {key: array} mapping and return a parameter tree for `cfg`."""
    rules = [(re.compile(p), h) for p, h in rules]
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unused = []
    for key, value in state_dict.items():
        for pattern, handler in rules:
            m = pattern.fullmatch(key)
            if m:
                break
        else:
            unused.append(key)
            continue
        for path, arr in handler(m, to_numpy(value)):
            if path in flat:
                raise ConversionError(f"target {'.'.join(path)} written twice; last from {key}")
            flat[path] = arr
    if unused:
        raise ConversionError(f"{len(unused)} unused source keys: {unused[:20]}")

    expected = {tuple(k.key for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]}
    missing = sorted(".".join(p) for p in expected if p not in flat)
    extra = sorted(".".join(p) for p in flat if p not in expected)
    if missing or extra:
        raise ConversionError(f"missing parameters {_first(missing)}; unexpected parameters {_first(extra)}")
    bad = [f"{'.'.join(p)}: source {flat[p].shape} vs expected {expected[p].shape}"
           for p in expected if flat[p].shape != expected[p].shape]
    if bad:
        raise ConversionError(f"shape mismatch for {cfg.name}: " + "; ".join(bad))

    tree: dict = {}
    for path, arr in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr.astype(np.float32)
    return tree


def _first(names: list[str], n: int = 20) -> str:
    return str(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def from_hf_state_dict(state_dict, cfg: CLIPConfig):
    """Parameters from a transformers `CLIPModel` state dict."""
    return convert_state_dict(state_dict, cfg, HF_RULES)
