"""FiSeCLIP reconstruction: batch feature matching with text filtering and restored local semantics
(SPEC §4.3). Every (open) item of SPEC §4.3 is a field; defaults are provisional (not yet measured with
pretrained weights; they follow the closest published method)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax.numpy as jnp

from ..errors import FiseclipError
from ..postprocess import gaussian_blur, minmax_normalise, upsample_bilinear
from ..prompts import PROMPT_SETS
from .base import BankRefs, Detection, Method, as_text, option, register
from .common import (encode_matching, grid_maps, map_stats, masked_range, match_layers, matching_scores, scale_to,
                     text_alignment)


LOCAL_MODES = ("qq", "qq+kk", "vv", "identity")
TEXT_FILTERS = ("threshold", "share")
FUSION_NORMS = ("minmax", "fixed")
IMAGE_SCORES = ("sum", "max")


def check_choice(value, allowed, field):
    if value not in allowed:
        raise FiseclipError(f"{field} must be one of {allowed}, got {value!r}")


@register("fiseclip")
@dataclasses.dataclass(frozen=True)
class FiSeCLIPConfig(Method):
    """FiSeCLIP reconstruction (SPEC §4.3). Provisional defaults are marked (open)."""

    layers: Optional[tuple[int, ...]] = option(None, "blocks (1-indexed) whose patch tokens are matched; "
                                               "none: default_match_layers (quarters of the depth)")
    r_list: tuple[int, ...] = option((1, 3, 5), "LNAMD neighbourhood sizes r; the matching map is the mean over r")
    alpha: float = option(0.3, "share of the nearest reference images averaged per patch (SPEC §4.2)")
    local: str = option("qq", "(open) restored local semantics of the last blocks (SPEC §2)", LOCAL_MODES)
    local_blocks: int = option(1, "(open) how many final blocks use `local`")
    prompts: str = option("winclip", "prompt set of the text branch (SPEC §3)", tuple(PROMPT_SETS))
    tau: float = option(100.0, "logit scale of the text branch's softmax (CLIP's 100)")
    text_filter: str = option("threshold", "(open) how text filters the references: A_txt < theta, or the "
                              "lowest (1 - rho) share of each image's patches", TEXT_FILTERS)
    theta: float = option(0.5, "(open) text_filter=threshold: reference patches need A_txt below this")
    rho: float = option(0.2, "(open) text_filter=share: the share of each image's patches left out")
    batch_size: int = option(16, "images per matching batch; 0 = the whole category")
    fusion_weight: float = option(0.5, "(open) w in A = w norm(A_match) + (1 - w) A_txt")
    fusion_norm: str = option("minmax", "(open) norm(A_match): min-max over the batch, or A_match / match_scale",
                              FUSION_NORMS)
    match_scale: float = option(1.0, "fusion_norm=fixed: the scale A_match is divided by")
    sigma: float = option(4.0, "Gaussian blur of the full-size map, in pixels (0: none)")
    align_corners: bool = option(True, "bilinear upsampling of the patch grid with align_corners")
    image_score: str = option("sum", "(open) sum: mean of batch-min-max map max and CLS text score; max: map max",
                              IMAGE_SCORES)
    chunk_size: int = option(4, "reference images per matching step (memory only, same result)")

    name = "fiseclip"
    run_options = {"batch_size": "batch_size"}
    uses_bank = True
    bank_gate_keys = ("score", "text_score")  # gated updates: the text branch must agree
    min_images = 2
    no_reference = "its map is the text branch alone"
    encoding_fields = ("layers", "local", "local_blocks")

    def __post_init__(self):
        check_choice(self.text_filter, TEXT_FILTERS, "text_filter")
        check_choice(self.fusion_norm, FUSION_NORMS, "fusion_norm")
        check_choice(self.image_score, IMAGE_SCORES, "image_score")
        check_choice(self.local, LOCAL_MODES, "local")

    def group(self, n, encode_batch):
        return None if self.batch_size == 0 or self.batch_size >= n else self.batch_size

    def encode(self, params, cfg, pixels):
        return encode_matching(params, cfg, pixels, match_layers(cfg, self.layers), self.local, self.local_blocks)

    def reference_filter(self, a_txt, valid):
        """[B, P] allowed reference patches (SPEC §4.3 step 3): text filters the references."""
        if self.text_filter == "threshold":
            allowed = a_txt < self.theta
        else:  # keep the (1 - rho) share of each image's patches with the lowest text score
            p = a_txt.shape[1]
            keep = max(1, int(round((1.0 - self.rho) * p)))
            rank = jnp.argsort(jnp.argsort(a_txt, axis=1), axis=1)
            allowed = rank < keep
        return allowed & valid[:, None]

    # Scoring in two stages (base.py): text map, reference filter and matching (steps 2-4, the costly part)
    # depend only on these fields; fusion, maps and image scores (steps 5-7) are cheap.
    stage_fields = ("prompts", "tau", "text_filter", "theta", "rho", "r_list", "alpha", "chunk_size")

    def score(self, feats, text, valid, *, size, mesh=None):
        """SPEC §4.3 steps 2–7."""
        return self.score_from_stage(feats, self.score_stage(feats, text, valid, mesh=mesh), text, valid, size=size)

    def score_stage(self, feats, text, valid, *, mesh=None):
        """Steps 2–4: {"a_txt" [B, P], "a_match" [B, P], "num_refs" [B]}."""
        chex.assert_rank([feats["local"], feats["cls"]], [3, 2])
        text = as_text(text).features
        a_txt = text_alignment(feats["local"], text, self.tau)  # step 2
        allowed = self.reference_filter(a_txt, valid)  # step 3
        a_match, num_refs = matching_scores(feats["tokens"], valid, allowed, self.r_list, self.alpha,
                                            self.chunk_size, mesh)  # step 4
        return {"a_txt": a_txt, "a_match": a_match, "num_refs": num_refs}

    def score_from_stage(self, feats, stage, text, valid, *, size):
        """Steps 5–7."""
        text = as_text(text).features
        a_txt, a_match, num_refs = stage["a_txt"], stage["a_match"], stage["num_refs"]
        if self.fusion_norm == "minmax":  # step 5: matching filters the text
            # images without any reference (score 0) must not set the batch minimum
            a_match = minmax_normalise(a_match, valid=valid & (num_refs > 0))
        else:
            a_match = a_match / self.match_scale
        fused = self.fusion_weight * a_match + (1.0 - self.fusion_weight) * a_txt
        fused = jnp.where(num_refs[:, None] > 0, fused, a_txt)  # no reference: text only
        maps = gaussian_blur(upsample_bilinear(grid_maps(fused), size, self.align_corners), self.sigma)
        maps = maps * valid[:, None, None]
        map_max = jnp.max(maps, axis=(1, 2))  # step 7
        if self.image_score == "max":
            scores = map_max
        else:
            cls_score = text_alignment(feats["cls"], text, self.tau)
            scores = 0.5 * (minmax_normalise(map_max, valid=valid) + minmax_normalise(cls_score, valid=valid))
            scores = jnp.clip(scores, 0.0, 1.0)  # a probability-like score: keep float noise (1.000001) out
        return Detection(scores * valid, maps, num_refs)

    # -- reference bank (online inspection, fiseclip_jax.bank) --------------------------------
    # Batch min-max (fusion_norm="minmax", image_score="sum") has no batch here: the bank's normal
    # (leave-one-out) range stands in for it. With "fixed" and "max" bank scoring equals batch scoring.
    def bank_match_options(self):
        return {"r_list": self.r_list, "alpha": self.alpha, "chunk_size": self.chunk_size}

    def bank_entries(self, feats, text, valid):
        """SPEC §4.3 steps 2–3 per image: text map [B, P], text-keep mask "allowed" [B, P], CLS text score [B]."""
        text = as_text(text).features
        a_txt = text_alignment(feats["local"], text, self.tau)
        return {"tokens": feats["tokens"], "allowed": self.reference_filter(a_txt, valid), "cls": feats["cls"],
                "text_map": a_txt, "text_score": text_alignment(feats["cls"], text, self.tau)}

    def _bank_maps(self, entries, a_match, num_refs, match_range, valid, size):
        """Steps 5–6, A_match normalised by a fixed range (minmax) or scale (fixed)."""
        a_match = scale_to(a_match, *match_range) if self.fusion_norm == "minmax" else a_match / self.match_scale
        fused = self.fusion_weight * a_match + (1.0 - self.fusion_weight) * entries["text_map"]
        fused = jnp.where(num_refs[:, None] > 0, fused, entries["text_map"])  # no reference: text only
        maps = gaussian_blur(upsample_bilinear(grid_maps(fused), size, self.align_corners), self.sigma)
        return maps * valid[:, None, None]

    def _bank_stats(self, entries, a_match, num_refs, match_range, map_range, text_range, valid, size):
        has = valid & (num_refs > 0)
        maps = self._bank_maps(entries, a_match, num_refs, match_range, valid, size)
        stats = {"match_lo": jnp.where(has, a_match.min(1), jnp.inf),
                 "match_hi": jnp.where(has, a_match.max(1), -jnp.inf),
                 "text_score": entries["text_score"], **map_stats(maps)}
        if map_range is None:  # leave-one-out: the bank's own range, as the batch rule
            map_range, text_range = masked_range(stats["map_max"], valid), masked_range(stats["text_score"], valid)
        if self.image_score == "max":
            stats["score"] = stats["map_max"]
        else:
            stats["score"] = 0.5 * (scale_to(stats["map_max"], *map_range) + scale_to(stats["text_score"], *text_range))
        stats["score"] = stats["score"] * valid
        return maps, stats

    def bank_calibrate(self, entries, patch_scores, num_refs, valid, *, size):
        has = valid & (num_refs > 0)
        match_range = masked_range(patch_scores.min(1), has)[0], masked_range(patch_scores.max(1), has)[1]
        return self._bank_stats(entries, patch_scores, num_refs, match_range, None, None, valid, size)[1]

    def bank_score(self, entries, patch_scores, num_refs, refs: BankRefs, valid, *, size):
        c, ok = refs.calib, refs.valid
        match_range = masked_range(c["match_lo"], ok)[0], masked_range(c["match_hi"], ok)[1]
        maps, stats = self._bank_stats(entries, patch_scores, num_refs, match_range, masked_range(c["map_max"], ok),
                                       masked_range(c["text_score"], ok), valid, size)
        return Detection(stats["score"], maps, num_refs), stats
