"""What a method is (the plug-in protocol), the registry that finds methods by name, and `Detection`.

A method is one frozen, hashable dataclass: its options are its fields, and the instance is
the static argument of the jitted `detect`. It carries two pure functions,

    encode(params, cfg, pixels [B, H, W, 3]) -> features: dict of arrays, batch axis first
    score(features, text, valid [B], *, size, mesh=None) -> Detection

and says how it groups images (`group`: images per scoring call, None = the whole category).
Three hooks have defaults that suit most methods:

    prepare(image, size, resample) -> [H, W, 3]   one image as model input (default: S×S)
    initial_state(cfg, text) / score_state(...)    a state carried from batch to batch of a
                                                   category, in file order (default: none)

`detect`, `evaluate`, the runner and the CLI only ever talk to this protocol, so a new method
is one file with one `@register("name")` line.

A method that matches images against references may also score new images against a stored
reference bank (online inspection, `fiseclip_jax.bank`): it sets `uses_bank = True` and provides
the four `bank_*` hooks below. The defaults say "this method does not use a bank".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from ..clip.config import CLIPConfig
from ..clip.preprocess import preprocess
from ..prompts import TextFeatures
from ..errors import FiseclipError


class Detection(NamedTuple):
    """image_scores [B]; anomaly_maps [B, H, W] (the model input's size: S×S, or e.g. 240×W' for tiled
    wide images); num_refs [B] references each image was matched against (0: no reference, the map fell
    back to text only; -1: the method does not match)."""

    image_scores: jnp.ndarray
    anomaly_maps: jnp.ndarray
    num_refs: jnp.ndarray


class BankRefs(NamedTuple):
    """What a method's bank scoring sees of a reference bank: cls [K, D] CLS embeddings of its slots,
    calib {name: [K]} the normal statistics each slot recorded (`Method.bank_calibrate`), valid [K]."""

    cls: jnp.ndarray
    calib: dict
    valid: jnp.ndarray


class Method:
    """Base of every method config (subclasses are frozen dataclasses).

    Class attributes: `name` (the registry name), `prompts` (a prompt set name, or None for
    a method without text; may also be a field), `run_options` (which common run options —
    "batch_size", "act", "seed" — map to which dotted field, see `with_run_options`),
    `encoding_fields` (the fields that change `encode`'s output; the others only change
    `score`), `min_images` and `no_reference` (see below).
    """

    name: ClassVar[str] = ""
    prompts: Optional[str] = None
    run_options: ClassVar[dict[str, str]] = {}
    encoding_fields: ClassVar[tuple[str, ...]] = ()
    # Fewest images a category needs (methods that match images against each other need 2), and what
    # the map falls back to for an image that has no reference to match.
    min_images: ClassVar[int] = 1
    no_reference: ClassVar[str] = ""

    # -- what a subclass provides ---------------------------------------------------------
    def encode(self, params, cfg: CLIPConfig, pixels) -> dict:
        """Everything `score` needs from one forward pass, every leaf batch-first. Pure, jit-able."""
        raise NotImplementedError

    def score(self, feats: dict, text: TextFeatures, valid, *, size, mesh=None) -> Detection:
        """Scores and maps of one group of images from its features; `size` is the map size, an int S
        (square inputs) or (H, W). Pure, jit-able (self, size, mesh static)."""
        raise NotImplementedError

    def group(self, n: int, encode_batch: int) -> Optional[int]:
        """Images per scoring call for a category of n images; None: the whole category at once."""
        return encode_batch

    # -- hooks with defaults ----------------------------------------------------------------
    def prepare(self, image, size: int, resample: str = "bicubic") -> np.ndarray:
        """One image (PIL or uint8 HWC) -> float32 CLIP-normalised model input [H, W, 3]; `encode` gets a
        batch of these and the maps come back at [H, W]. Default: the whole image resized to size×size."""
        return preprocess([image], size, resample)[0]

    def initial_state(self, cfg: CLIPConfig, text: TextFeatures) -> Any:
        """The state a category starts from (a pytree of arrays, or None: the method carries nothing)."""
        return None

    def score_state(self, feats: dict, text: TextFeatures, valid, state, *, size, mesh=None) -> tuple[Detection, Any]:
        """`score` that also threads a state from batch to batch in file order: -> (Detection, next state).
        Pure, jit-able. Default: no state, `score` itself."""
        return self.score(feats, text, valid, size=size, mesh=mesh), state

    # -- scoring in two stages (optional): a sweep reuses the costly first one --------------
    # A method whose scoring starts with a costly step (matching) that depends on few of its fields
    # lists them in `stage_fields` and provides the two stages, with
    #   score(feats, text, valid, size=S) == score_from_stage(feats, score_stage(feats, text, valid), text,
    #                                                         valid, size=S).
    # With a feature cache, `iter_detect` keeps each group's first stage in memory, keyed by the images,
    # the text and these fields: configurations that differ only in later fields skip the first stage.
    stage_fields: ClassVar[tuple[str, ...]] = ()

    def score_stage(self, feats: dict, text: TextFeatures, valid, *, mesh=None) -> dict:
        """The first, costly stage of `score` (a dict of arrays). Pure, jit-able."""
        raise NotImplementedError

    def score_from_stage(self, feats: dict, stage: dict, text: TextFeatures, valid, *, size) -> Detection:
        """The rest of `score`, from the first stage's output. Pure, jit-able."""
        raise NotImplementedError

    # -- reference bank (online inspection); by default a method does not use one ---------
    uses_bank: ClassVar[bool] = False
    # Entries of the per-image statistics (`bank_calibrate`) that must all be at most a quantile of
    # the bank's normal values for an image to join the bank (gated updates); "score" always first.
    bank_gate_keys: ClassVar[tuple[str, ...]] = ()

    def no_bank_error(self) -> FiseclipError:
        """The error a bank function raises for this method (one that does not use a bank)."""
        return FiseclipError(f"{self.label} does not use a reference bank: it scores each image on its own "
                             "(use `detect` or `watch` without --bank)")

    def bank_match_options(self) -> dict:
        """{"r_list", "alpha", "chunk_size"}: how the bank matches (LNAMD radii, share of nearest references)."""
        raise self.no_bank_error()

    def bank_entries(self, feats: dict, text: TextFeatures, valid) -> dict:
        """From `encode`'s features: {"tokens" [B, nL, P, W] matching tokens, "allowed" [B, P] patches that may
        serve as references, "cls" [B, D]} plus whatever `bank_score` needs of a new image. Pure."""
        raise self.no_bank_error()

    def bank_calibrate(self, entries: dict, patch_scores, num_refs, valid, *, size: int) -> dict:
        """Leave-one-out statistics of the bank's own images: patch_scores [K, P] of each against the others,
        num_refs [K] -> {name: [K]}, with at least "score" (the image score), "map_min" and "map_max". Pure."""
        raise self.no_bank_error()

    def bank_score(self, entries: dict, patch_scores, num_refs, refs: BankRefs, valid, *,
                   size: int) -> tuple[Detection, dict]:
        """New images against the bank: patch_scores [B, P] matching scores against its references ->
        (Detection, {name: [B]} the same statistics `bank_calibrate` gives, for gated updates). Pure."""
        raise self.no_bank_error()

    # -- shared behaviour -----------------------------------------------------------------
    @property
    def label(self) -> str:
        """The name this configuration is registered under (e.g. "anoclip+" for AnoCLIP with an adapter)."""
        return self.name

    def clip_config(self, cfg: CLIPConfig) -> CLIPConfig:
        """The CLIP config `encode` runs with (a method may override e.g. the activation, SPEC §8)."""
        return cfg

    def with_run_options(self, **options) -> "Method":
        """Apply the common run options this method takes (None values and options it does not take are
        ignored): e.g. FiSeCLIP maps batch_size to its matching batch, MuSc act to its activation override."""
        out = self
        for key, value in options.items():
            path = self.run_options.get(key)
            if path is not None and value is not None:
                out = replace_path(out, path, value)
        return out

    def record(self) -> dict:
        """A JSON-able description: every field (nested configs included) and "method": the label."""
        return {**dataclasses.asdict(self), "method": self.label}


def option(default, meaning: str, choices: tuple = ()):
    """A config field with its one-line meaning and, for a closed set, its allowed values: the one place
    `fiseclip-jax methods` reads them from and `overrides.apply_overrides` checks values against."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "choices": tuple(choices)})


def replace_path(config, path: str, value):
    """`dataclasses.replace` along a dotted path ("tta.seed"); a None intermediate leaves config unchanged."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    inner = getattr(config, head)
    if inner is None:
        return config
    return dataclasses.replace(config, **{head: replace_path(inner, rest, value)})


def as_text(text) -> TextFeatures:
    """TextFeatures, or a bare [2, D] (normal, abnormal) array wrapped as one with no sentences."""
    if isinstance(text, TextFeatures):
        return text
    text = jnp.asarray(text)
    if text.ndim != 2 or text.shape[0] != 2:
        raise FiseclipError(f"text must be TextFeatures or [2, D] (normal, abnormal), got {text.shape}")
    empty = jnp.zeros((0, text.shape[1]), text.dtype)
    return TextFeatures(text, empty, empty)


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str, factory: Optional[Callable[..., Method]] = None):
    """Register a method under `name`: `@register("musc")` on the class, or
    `register("anoclip+", lambda **kw: AnoCLIPConfig(tta=TTAConfig(), **kw))` for a preset."""

    def add(f):
        if name in _REGISTRY:
            raise FiseclipError(f"a method named {name!r} is already registered")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


def unregister(name: str) -> None:
    """Remove a registered method (tests that register toy methods clean up with it)."""
    _REGISTRY.pop(name, None)


def get(name: str, **overrides: Any) -> Method:
    """The method registered as `name`, built with `overrides` as field values."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise FiseclipError(f"unknown method {name!r}; registered: {', '.join(names())}") from None
    return factory(**overrides)


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)
