"""The function an export serializes, and the arrays passed to it (the calling convention).

    program(args, pixels [B, S, S, 3] float32, valid [B] bool, state)
        -> (image_scores [B], anomaly_maps [B, S, S], num_refs [B], next state)

args = {"params": CLIP parameters, "text": {"features" [2, D], "normal" [M, D], "abnormal" [M, D]} sentence features
(methods with prompts), "bank": the bank's arrays (bank detection)}; state: a dict of arrays carried
from call to call in file order ({"images": []} images scored so far, or the method's own carried state,
AnoCLIP+'s image index and AdamW moments, as flat leaves "s0000", ...). Everything is plain dicts and
tuples, so `jax.export.deserialize` needs no pytree registration from this library.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..bank import Bank, BankMeta, detect_with_bank
from ..clip.config import CLIPConfig
from ..detect import encode_features, score_features
from ..errors import FiseclipError
from ..methods import Method, as_text
from ..prompts import TextFeatures

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
BANK_ARRAYS = ("features", "allowed", "source", "cls", "valid", "ids", "count")


def batch_is_reference_set(method: Method) -> bool:
    """Methods that need two or more images (MuSc, FiSeCLIP in batch mode) match the images of one call
    against each other (top-k over the batch), so their program depends on the batch size."""
    return method.min_images > 1


@dataclasses.dataclass(frozen=True)
class Program:
    """What the exported function closes over (static): method, CLIP config, map size, and for bank
    detection the bank's static metadata and the shapes of its empty arrays (orbax stores no empty array)."""

    method: Method
    cfg: CLIPConfig
    size: int
    state_tree: Any  # treedef of the method's carried state (None: the method carries nothing)
    bank_meta: Optional[BankMeta] = None
    empty: tuple = ()  # ((name, shape, dtype), ...) bank arrays of size 0, rebuilt inside

    def __call__(self, args, pixels, valid, state):
        text = _text(args, self.cfg)
        if self.bank_meta is None:
            carried = None if self.state_tree is None else jax.tree.unflatten(
                self.state_tree, [state[k] for k in sorted(state)])
            feats = encode_features(args["params"], self.cfg, pixels, self.method)
            out = score_features(feats, text, valid, self.method, self.size, None, carried)
            det, carried = (out, None) if carried is None else out
        else:
            arrays = dict(args["bank"])
            for name, shape, dtype in self.empty:
                arrays[name] = jnp.zeros(shape, dtype)
            bank = Bank(**arrays, meta=self.bank_meta)
            det, carried = detect_with_bank(args["params"], self.cfg, bank, pixels, text, None, valid), None
        if carried is None:
            new_state = {"images": state["images"] + jnp.sum(valid.astype(jnp.int32))}
        else:
            new_state = flat_state(carried)
        return det.image_scores, det.anomaly_maps, det.num_refs, new_state


def _text(args, cfg: CLIPConfig) -> TextFeatures:
    if "text" not in args:  # a method without text
        return as_text(jnp.zeros((2, cfg.embed_dim), jnp.float32))
    return TextFeatures(args["text"]["features"], args["text"]["normal"], args["text"]["abnormal"])


def flat_state(state) -> dict:
    """A method's carried state as {"s0000": leaf, ...} (plain dict; None leaves dropped by flattening)."""
    return {f"s{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(state))}


def build_program(params, cfg: CLIPConfig, method: Method, size: int, text: Optional[TextFeatures],
                  bank: Optional[Bank] = None) -> tuple[Program, dict, dict]:
    """(program, args, initial state) of a method (or of bank detection), as plain dicts of arrays."""
    args: dict = {"params": params}
    if text is not None:
        args["text"] = {"features": text.features, "normal": text.normal_sentences,
                        "abnormal": text.abnormal_sentences}
        if any(np.size(v) == 0 for v in args["text"].values()):
            raise FiseclipError("the text features of an export need their sentences: pass the TextFeatures of "
                                "text_features_full, not a bare [2, D] array")
    if bank is not None:
        stored = {name: getattr(bank, name) for name in BANK_ARRAYS}
        stored["calib"] = dict(bank.calib)
        empty = tuple((name, tuple(np.shape(v)), str(jnp.asarray(v).dtype)) for name, v in stored.items()
                      if name != "calib" and np.size(v) == 0)
        args["bank"] = {k: v for k, v in stored.items() if k not in {e[0] for e in empty}}
        return Program(bank.meta.method, cfg, size, None, bank.meta, empty), args, {"images": np.zeros((), np.int32)}
    state = method.initial_state(cfg, as_text(text) if text is not None else None)
    if state is None:
        return Program(method, cfg, size, None), args, {"images": np.zeros((), np.int32)}
    return Program(method, cfg, size, jax.tree.structure(state)), args, flat_state(state)


def check_platforms(platforms) -> tuple[str, ...]:
    """--platforms as a tuple of jax.export platform names, each known, at least one."""
    names = tuple(p.strip().lower() for p in (platforms.split(",") if isinstance(platforms, str) else platforms))
    names = tuple(dict.fromkeys(p for p in names if p))
    bad = [p for p in names if p not in PLATFORMS]
    if bad or not names:
        raise FiseclipError(f"--platforms {platforms if isinstance(platforms, str) else ','.join(platforms)!r}: "
                            f"{', '.join(bad) or 'none given'}: each must be one of {', '.join(PLATFORMS)} "
                            "(comma-separated; jax.export calls NVIDIA GPUs cuda)")
    return names


def current_platform() -> str:
    """The jax.export name of the platform this process computes on (cpu, cuda, rocm, tpu)."""
    backend = jax.default_backend()
    if backend == "gpu":
        version = str(getattr(jax.devices()[0].client, "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return backend
