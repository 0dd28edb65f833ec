"""Prompt sets and text features (SPEC §3).

A `PromptSet` is plain data: print it, edit it with `dataclasses.replace`, pass it
back. `text_features` gives the [2, D] (normal, abnormal) class embeddings: the
L2-normalised mean of the *unnormalised* sentence embeddings of each side. Sentence
embeddings are cached in memory and in the user cache folder (SPEC §3: they depend
only on weights, class name and prompt set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .cache import key_digest, load_arrays, save_arrays, tree_fingerprint
from .cache import enabled as cache_enabled
from .clip.config import CLIPConfig
from .clip.modeling import encode_text
from .clip.tokenizer import tokenize, trim_context
from .errors import FiseclipError

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Sentences are `template.format(state.format(class_name))` for every pair, template-major (all
    states of the first template, then the next template): AnoVL's order, which decides which row of
    the AnoCLIP+ text adapter pairs with which sentence (SPEC §4.5)."""

    name: str
    normal_states: tuple[str, ...]
    abnormal_states: tuple[str, ...]
    templates: tuple[str, ...]

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        def side(states):
            return [t.format(s.format(class_name)) for t in self.templates for s in states]

        return side(self.normal_states), side(self.abnormal_states)


# WinCLIP's compositional ensemble: 7 normal and 5 abnormal states x 22 templates.
_WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)

WINCLIP = PromptSet(
    name="winclip",
    normal_states=("{}", "flawless {}", "perfect {}", "unblemished {}",
                   "{} without flaw", "{} without defect", "{} without damage"),
    abnormal_states=("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"),
    templates=_WINCLIP_TEMPLATES,
)

# AnoCLIP's domain-aware contrastive states: 7 pairs, 22 patterns x 3 domain phrases; as in the
# authors' code the first normal state is "normal {}" and the sentences end without a period.
_ANOCLIP_PAIRS = (("normal {}", "damaged {}"), ("flawless {}", "abnormal {}"), ("perfect {}", "imperfect {}"),
                  ("unblemished {}", "blemished {}"), ("{} without flaw", "{} with flaw"),
                  ("{} without defect", "{} with defect"), ("{} without damage", "{} with damage"))
OBJECT_DOMAINS = ("industrial photo", "industrial image", "manufacturing image")
TEXTURE_DOMAINS = ("industrial photo", "textural photo", "surface picture")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _anoclip_templates(domains) -> tuple[str, ...]:
    out = []
    for x in domains:
        an = f"{_article(x)} {x}"
        for adj, first, second in (("cropped", "the", "a"), ("close-up", "a", "the"), ("bright", "a", "the"),
                                   ("dark", "the", "a"), ("jpeg corrupted", "a", "the"), ("blurry", "the", "a")):
            out += [f"a {adj} {x} of {first} {{}}", f"a {adj} {x} of {second} {{}}"]  # AnoVL's article order
        out += [f"{an} of a {{}}", f"{an} of the {{}}",
                f"{an} of a small {{}}", f"{an} of the small {{}}",
                f"{an} of a large {{}}", f"{an} of the large {{}}",
                f"{an} of the {{}} for visual inspection", f"{an} of a {{}} for visual inspection",
                f"{an} of the {{}} for anomaly detection", f"{an} of a {{}} for anomaly detection"]
    return tuple(out)


ANOCLIP_OBJECT = PromptSet("anoclip-object", tuple(p[0] for p in _ANOCLIP_PAIRS),
                           tuple(p[1] for p in _ANOCLIP_PAIRS), _anoclip_templates(OBJECT_DOMAINS))
ANOCLIP_TEXTURE = PromptSet("anoclip-texture", tuple(p[0] for p in _ANOCLIP_PAIRS),
                            tuple(p[1] for p in _ANOCLIP_PAIRS), _anoclip_templates(TEXTURE_DOMAINS))


def clean_class_name(name: str) -> str:
    """Category folder names to words: 'metal_nut' -> 'metal nut'."""
    return name.replace("_", " ").strip()


# Prompt sets by name: class name -> PromptSet ("anoclip" picks texture phrases for MVTec textures).
PROMPT_SETS = {
    "winclip": lambda class_name: WINCLIP,
    "anoclip": lambda class_name: ANOCLIP_TEXTURE if clean_class_name(class_name) in MVTEC_TEXTURES
    else ANOCLIP_OBJECT,
}


def get_prompt_set(prompts: "str | PromptSet", class_name: str) -> PromptSet:
    """Resolve a name of PROMPT_SETS ('winclip' | 'anoclip') or a PromptSet."""
    if isinstance(prompts, PromptSet):
        return prompts
    if prompts not in PROMPT_SETS:
        raise FiseclipError(f"unknown prompt set {prompts!r}; use one of {sorted(PROMPT_SETS)} or a PromptSet")
    return PROMPT_SETS[prompts](class_name)


class TextFeatures(NamedTuple):
    """features [2, D] (normal, abnormal; L2-normalised); sentences: per side [M_side, D], normalised."""

    features: jnp.ndarray
    normal_sentences: jnp.ndarray
    abnormal_sentences: jnp.ndarray


_CACHE: dict = {}
# Bump when what a cached text entry holds, or how it is computed, changes.
TEXT_CACHE_FORMAT = 1
# Tokens per text-tower call: bounds memory; at 16-token prompts it is 256 sentences a call.
TOKENS_PER_CALL = 4096


def _row_chunks(n: int, width: int) -> tuple[int, int]:
    """(rows per call, calls) for n sentences of `width` tokens: equal calls, rows a multiple of 8."""
    max_rows = max(8, TOKENS_PER_CALL // width // 8 * 8)
    calls = -(-n // max_rows)
    rows = -(-n // calls)
    return -(-rows // 8) * 8, calls


def _embed_sentences(params, cfg: CLIPConfig, sentences: list[str]) -> np.ndarray:
    """Unnormalised text embeddings [N, D], the tower run at the shortest bucketed context."""
    ids = trim_context(tokenize(sentences, cfg.text.context_length))
    rows, calls = _row_chunks(len(ids), ids.shape[1])
    pad = rows * calls - len(ids)  # every call has one shape: one compilation
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)]) if pad else ids
    out = [np.asarray(encode_text(params, cfg, ids[i:i + rows])) for i in range(0, len(ids), rows)]
    return np.concatenate(out)[: len(sentences)]


def _text_cache_key(params, cfg: CLIPConfig, class_name: str, pset: PromptSet, sentences: list[str]) -> dict:
    """Everything the embeddings depend on: weights, architecture, the exact sentences."""
    return {"format": TEXT_CACHE_FORMAT, "weights": tree_fingerprint(params), "clip": cfg.to_dict(),
            "class_name": class_name, "prompt_set": pset.name,
            "sentences": hashlib.sha256(json.dumps(sentences).encode()).hexdigest()}


def _cached_embeddings(key: dict, num_sentences: int, dim: int) -> np.ndarray | None:
    arrays = load_arrays("text", key)
    emb = None if arrays is None else arrays.get("embeddings")
    if emb is None or emb.shape != (num_sentences, dim) or emb.dtype != np.float32 or not np.isfinite(emb).all():
        return None
    return emb


def text_features_full(params, cfg: CLIPConfig, class_name: str, prompts="winclip", *,
                       disk_cache: bool | None = None, verbatim: bool = False) -> TextFeatures:
    """Class features and per-sentence features, cached per (weights, class name, prompt set).

    Kept in memory for the process and, unless `disk_cache` is False (default: `cache.enabled()`),
    in the user cache folder (`fiseclip_jax.cache`), so a later run encodes no prompt.
    verbatim: use `class_name` as given (AnoVL prompts folder names such as "metal_nut" as they are).
    """
    class_name = class_name if verbatim else clean_class_name(class_name)
    pset = get_prompt_set(prompts, clean_class_name(class_name))
    normal, abnormal = pset.sentences(class_name)
    key = _text_cache_key(params, cfg, class_name, pset, normal + abnormal)
    mem_key = key_digest(key)
    if mem_key in _CACHE:
        return _CACHE[mem_key]
    use_disk = cache_enabled() if disk_cache is None else disk_cache
    emb = _cached_embeddings(key, len(normal) + len(abnormal), cfg.embed_dim) if use_disk else None
    if emb is None:
        emb = _embed_sentences(params, cfg, normal + abnormal).astype(np.float32)
        if use_disk:
            save_arrays("text", key, {"embeddings": emb})
    sides = (emb[: len(normal)], emb[len(normal):])
    feats = np.stack([s.mean(0) for s in sides])
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    normed = [s / np.linalg.norm(s, axis=-1, keepdims=True) for s in sides]
    _CACHE[mem_key] = TextFeatures(jnp.asarray(feats), jnp.asarray(normed[0]), jnp.asarray(normed[1]))
    return _CACHE[mem_key]


def text_features(params, cfg: CLIPConfig, class_name: str, prompts="winclip"):
    """[2, D] normal/abnormal text features for a class (SPEC §3)."""
    return text_features_full(params, cfg, class_name, prompts).features
