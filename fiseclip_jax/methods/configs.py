"""Frozen method configurations (SPEC §4). Hashable: passed to jit as static arguments.

Every SPEC **(open)** item is a field. Defaults marked *provisional* could not be
chosen by measurement yet (no pretrained CLIP weights on our machines); they follow
the closest published method and are to be re-measured with real weights.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..tta import TTAConfig


def default_match_layers(n_layers: int) -> tuple[int, ...]:
    """MuSc's blocks: {6,12,18,24} for 24-block ViT-L, {3,6,9,12} for ViT-B (1-indexed)."""
    q = n_layers // 4
    return tuple(q * i for i in range(1, 5)) if q else (n_layers,)


@dataclasses.dataclass(frozen=True)
class MuScConfig:
    """MuSc mutual scoring over a whole category (SPEC §4.2)."""

    layers: Optional[tuple[int, ...]] = None  # 1-indexed; None -> default_match_layers
    r_list: tuple[int, ...] = (1, 3, 5)
    alpha: float = 0.3
    k_list: tuple[int, ...] = (1, 2, 3)  # RsCIN; (1, 8, 9) for VisA
    sigma: float = 4.0
    align_corners: bool = True  # MuSc's bilinear upsampling
    act: Optional[str] = None  # activation override: "gelu" reproduces MuSc's published runs (SPEC §8)
    chunk_size: int = 4  # reference images per matching step (memory knob)

    name = "musc"


@dataclasses.dataclass(frozen=True)
class FiSeCLIPConfig:
    """FiSeCLIP reconstruction (SPEC §4.3). Provisional defaults are marked (open)."""

    layers: Optional[tuple[int, ...]] = None  # matching tokens; None -> default_match_layers
    r_list: tuple[int, ...] = (1, 3, 5)
    alpha: float = 0.3
    local: str = "qq"  # (open) restored local semantics: "qq" | "qq+kk" | "vv" | "identity"
    local_blocks: int = 1  # (open) how many final blocks use `local`
    prompts: str = "winclip"
    tau: float = 100.0  # CLIP's logit scale for the text branch
    text_filter: str = "threshold"  # (open) "threshold" (A_txt < theta) | "share" (lowest 1 - rho)
    theta: float = 0.5  # (open)
    rho: float = 0.2  # (open)
    batch_size: int = 16  # images per batch; 0 = the whole category
    fusion_weight: float = 0.5  # (open) w in A = w norm(A_match) + (1 - w) A_txt
    fusion_norm: str = "minmax"  # (open) "minmax" over the batch | "fixed": A_match / match_scale
    match_scale: float = 1.0  # used by fusion_norm="fixed"
    sigma: float = 4.0
    align_corners: bool = True
    image_score: str = "sum"  # (open) "sum": mean of batch-min-max(max map) and (CLS text score); "max"
    chunk_size: int = 4

    name = "fiseclip"

    def __post_init__(self):
        _check(self.text_filter, ("threshold", "share"), "text_filter")
        _check(self.fusion_norm, ("minmax", "fixed"), "fusion_norm")
        _check(self.image_score, ("sum", "max"), "image_score")
        _check(self.local, ("qq", "qq+kk", "vv", "identity"), "local")


@dataclasses.dataclass(frozen=True)
class AnoCLIPConfig:
    """AnoCLIP (SPEC §4.4); with `tta` set, AnoCLIP+ (SPEC §4.5)."""

    local_blocks: Optional[int] = None  # None -> all blocks run the vv dual path
    prompts: str = "anoclip"
    tau: float = 1.0  # plain softmax of cosines
    mean_filter: int = 3  # replicate-padded mean filter on the patch grid
    align_corners: bool = True
    views: bool = False  # image score averaged over the 22 views of SPEC §4.4
    tta: Optional[TTAConfig] = None  # AnoCLIP+ (SPEC §4.5): fiseclip_jax.tta.TTAConfig(); None = plain AnoCLIP

    name = "anoclip"


def _check(value, allowed, field):
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}")


METHODS = {"musc": MuScConfig, "fiseclip": FiSeCLIPConfig, "anoclip": AnoCLIPConfig}
