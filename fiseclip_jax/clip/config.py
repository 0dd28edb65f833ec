"""CLIP configurations: frozen dataclasses with named presets (SPEC §1).

A config is hashable, so it is passed to jitted functions as a static argument.
The MLP activation is part of the config because it cannot be read from weight
shapes: QuickGELU for OpenAI weights, exact-erf GELU for most OpenCLIP weights.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from ..errors import FiseclipError

ACTIVATIONS = ("quick_gelu", "gelu")
# Computation dtypes; parameters and encoder outputs stay float32 whatever this says.
DTYPES = ("float32", "bfloat16")

# CLIP's image normalisation (OpenAI and OpenCLIP share it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int  # native size: the position-embedding grid is image_size // patch_size
    mlp_dim: int = 0  # 0 means 4 * width

    def __post_init__(self):
        if self.mlp_dim == 0:
            object.__setattr__(self, "mlp_dim", 4 * self.width)
        if self.width % self.heads:
            raise FiseclipError(f"vision width {self.width} not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise FiseclipError(f"image_size {self.image_size} not divisible by patch {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    width: int
    layers: int
    heads: int
    vocab_size: int = 49408
    context_length: int = 77
    mlp_dim: int = 0

    def __post_init__(self):
        if self.mlp_dim == 0:
            object.__setattr__(self, "mlp_dim", 4 * self.width)
        if self.width % self.heads:
            raise FiseclipError(f"text width {self.width} not divisible by heads {self.heads}")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    name: str
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"  # computation dtype of the towers (an old config.json without it: float32)

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise FiseclipError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.dtype not in DTYPES:
            raise FiseclipError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    def replace(self, **kw) -> "CLIPConfig":
        return dataclasses.replace(self, **kw)

    # -- serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        d = dict(d)
        d["vision"] = VisionConfig(**d["vision"])
        d["text"] = TextConfig(**d["text"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "CLIPConfig":
        return cls.from_dict(json.loads(s))

    # -- transformers interop (used by tests and by the HF converter) --
    @classmethod
    def from_hf_config(cls, hf: Any, name: str = "hf") -> "CLIPConfig":
        """From a transformers `CLIPConfig` (object or its dict)."""
        if not isinstance(hf, dict):
            hf = hf.to_dict()
        v, t = hf["vision_config"], hf["text_config"]
        acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
        if len(acts) != 1:
            raise FiseclipError(f"vision and text towers use different activations {acts}")
        act = acts.pop()
        if act not in ACTIVATIONS:
            raise FiseclipError(f"unsupported hidden_act {act!r}; supported: {ACTIVATIONS}")
        return cls(
            name=name,
            embed_dim=hf.get("projection_dim", 512),
            vision=VisionConfig(
                width=v["hidden_size"], layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
                patch_size=v["patch_size"], image_size=v["image_size"], mlp_dim=v["intermediate_size"],
            ),
            text=TextConfig(
                width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                mlp_dim=t["intermediate_size"],
            ),
            act=act,
            layer_norm_eps=v.get("layer_norm_eps", 1e-5),
        )

    def to_hf_config(self):
        """A transformers `CLIPConfig` with the same architecture (for parity tests)."""
        from transformers import CLIPConfig as HFCLIPConfig

        v, t = self.vision, self.text
        return HFCLIPConfig(
            text_config=dict(
                hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.layers,
                num_attention_heads=t.heads, vocab_size=t.vocab_size,
                max_position_embeddings=t.context_length, hidden_act=self.act,
                layer_norm_eps=self.layer_norm_eps, projection_dim=self.embed_dim,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
            ),
            vision_config=dict(
                hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers,
                num_attention_heads=v.heads, patch_size=v.patch_size, image_size=v.image_size,
                hidden_act=self.act, layer_norm_eps=self.layer_norm_eps, projection_dim=self.embed_dim,
            ),
            projection_dim=self.embed_dim,
        )


def _openai(name, embed, vw, vl, vh, patch, size, tw, tl, th):
    return CLIPConfig(
        name=name, embed_dim=embed,
        vision=VisionConfig(width=vw, layers=vl, heads=vh, patch_size=patch, image_size=size),
        text=TextConfig(width=tw, layers=tl, heads=th),
        act="quick_gelu",
    )


PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": _openai("ViT-B/32", 512, 768, 12, 12, 32, 224, 512, 12, 8),
    "ViT-B/16": _openai("ViT-B/16", 512, 768, 12, 12, 16, 224, 512, 12, 8),
    "ViT-L/14": _openai("ViT-L/14", 768, 1024, 24, 16, 14, 224, 768, 12, 12),
    "ViT-L/14@336": _openai("ViT-L/14@336", 768, 1024, 24, 16, 14, 336, 768, 12, 12),
    "ViT-B-16-plus-240": CLIPConfig(
        name="ViT-B-16-plus-240", embed_dim=640,
        vision=VisionConfig(width=896, layers=12, heads=14, patch_size=16, image_size=240),
        text=TextConfig(width=640, layers=12, heads=10),
        act="gelu",
    ),
    # Tiny presets for tests and smoke runs: same structure, random weights only.
    "tiny": CLIPConfig(
        name="tiny", embed_dim=24,
        vision=VisionConfig(width=32, layers=4, heads=4, patch_size=8, image_size=32),
        text=TextConfig(width=32, layers=2, heads=4),
        act="quick_gelu",
    ),
    "tiny-gelu": CLIPConfig(
        name="tiny-gelu", embed_dim=24,
        vision=VisionConfig(width=32, layers=4, heads=4, patch_size=8, image_size=32),
        text=TextConfig(width=32, layers=2, heads=4),
        act="gelu",
    ),
}


def get_config(name: str) -> CLIPConfig:
    """A preset by name: ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336, ViT-B-16-plus-240, tiny, tiny-gelu."""
    try:
        return PRESETS[name]
    except KeyError:
        raise FiseclipError(f"unknown CLIP preset {name!r}; known: {sorted(PRESETS)}") from None
