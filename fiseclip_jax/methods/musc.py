"""MuSc: whole-category mutual scoring of patch features, RsCIN re-scoring (SPEC §4.2). No text."""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from ..postprocess import gaussian_blur, upsample_bilinear
from ..rscin import rscin
from .base import BankRefs, Detection, Method, option, register
from .common import encode_matching, grid_maps, map_stats, match_layers, matching_scores


@register("musc")
@dataclasses.dataclass(frozen=True)
class MuScConfig(Method):
    """MuSc mutual scoring over a whole category (SPEC §4.2)."""

    layers: Optional[tuple[int, ...]] = option(None, "blocks (1-indexed) whose patch tokens are matched; "
                                               "none: default_match_layers (quarters of the depth)")
    r_list: tuple[int, ...] = option((1, 3, 5), "LNAMD neighbourhood sizes r; the map is the mean over r")
    alpha: float = option(0.3, "share of the nearest other images averaged per patch (SPEC §4.2)")
    k_list: tuple[int, ...] = option((1, 2, 3), "RsCIN neighbour counts k; (1, 8, 9) for VisA")
    sigma: float = option(0.0, "Gaussian blur of the map in pixels; 0 as the authors (SPEC §4.2)")
    align_corners: bool = option(True, "bilinear upsampling of the patch grid with align_corners (MuSc's)")
    act: Optional[str] = option(None, "activation override; gelu reproduces MuSc's published runs (SPEC §8)",
                                (None, "quick_gelu", "gelu"))
    chunk_size: int = option(4, "reference images per matching step (memory only, same result)")

    name = "musc"
    prompts = None
    run_options = {"act": "act"}
    uses_bank = True
    bank_gate_keys = ("score",)  # no text branch to agree
    min_images = 2
    no_reference = "its map and score are 0"
    encoding_fields = ("layers", "act")

    def group(self, n, encode_batch):
        return None  # the whole category is the reference set

    def clip_config(self, cfg):
        return cfg.replace(act=self.act) if self.act else cfg

    def encode(self, params, cfg, pixels):
        cfg = self.clip_config(cfg)
        return encode_matching(params, cfg, pixels, match_layers(cfg, self.layers))

    stage_fields = ("r_list", "alpha", "chunk_size")  # the matching (base.py: scoring in two stages)

    def score(self, feats, text, valid, *, size, mesh=None):
        """Mutual scores, bilinear map (align_corners=True, no blur by default: SPEC §4.2), max then RsCIN."""
        return self.score_from_stage(feats, self.score_stage(feats, text, valid, mesh=mesh), text, valid, size=size)

    def score_stage(self, feats, text, valid, *, mesh=None):
        """The mutual scores: {"patch" [B, P], "num_refs" [B]}."""
        chex.assert_rank(feats["cls"], 2)
        patch, num_refs = matching_scores(feats["tokens"], valid, None, self.r_list, self.alpha,
                                          self.chunk_size, mesh)
        return {"patch": patch, "num_refs": num_refs}

    def score_from_stage(self, feats, stage, text, valid, *, size):
        up = upsample_bilinear(grid_maps(stage["patch"]), size, self.align_corners)
        raw = jnp.max(up, axis=(1, 2))
        scores = rscin(raw, feats["cls"], self.k_list, valid=valid)  # not a probability: may leave [0, 1]
        maps = gaussian_blur(up, self.sigma)
        return Detection(scores, maps * valid[:, None, None], stage["num_refs"])

    # -- reference bank (online inspection, fiseclip_jax.bank): maps equal batch scoring of bank ∪ {x};
    # RsCIN re-scores x among the bank's leave-one-out scores and CLS embeddings.
    def bank_match_options(self):
        return {"r_list": self.r_list, "alpha": self.alpha, "chunk_size": self.chunk_size}

    def bank_entries(self, feats, text, valid):
        b, _, p, _ = feats["tokens"].shape
        return {"tokens": feats["tokens"], "allowed": jnp.broadcast_to(valid[:, None], (b, p)), "cls": feats["cls"]}

    def _bank_maps(self, patch_scores, valid, size):
        up = upsample_bilinear(grid_maps(patch_scores), size, self.align_corners)
        return jnp.max(up, axis=(1, 2)), gaussian_blur(up, self.sigma) * valid[:, None, None]

    def bank_calibrate(self, entries, patch_scores, num_refs, valid, *, size):
        raw, maps = self._bank_maps(patch_scores, valid, size)
        return {"raw": raw, "score": rscin(raw, entries["cls"], self.k_list, valid=valid), **map_stats(maps)}

    def bank_score(self, entries, patch_scores, num_refs, refs: BankRefs, valid, *, size):
        raw, maps = self._bank_maps(patch_scores, valid, size)

        def among_bank(raw_i, cls_i, ok_i):  # RsCIN over the bank's images and this one, this one's row
            scores = jnp.append(refs.calib["raw"], raw_i)
            cls = jnp.concatenate([refs.cls, cls_i[None]])
            return rscin(scores, cls, self.k_list, valid=jnp.append(refs.valid, ok_i))[-1]

        scores = jax.vmap(among_bank)(raw, entries["cls"], valid)
        return Detection(scores, maps, num_refs), {"raw": raw, "score": scores, **map_stats(maps)}
