"""AnoCLIP (SPEC §4.4) and, with a test-time adapter, AnoCLIP+ (SPEC §4.5)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from ..clip.modeling import encode_image
from ..postprocess import mean_filter, upsample_bilinear
from ..tiles import TileLayout, prepare_tiled
from ..views import anoclip_views
from ..prompts import PROMPT_SETS
from .base import Detection, Method, as_text, option, register
from .common import grid_maps, text_alignment
from .tta import TTAConfig, adapt_batch, fresh_state
from ..errors import FiseclipError


@register("anoclip")
@dataclasses.dataclass(frozen=True)
class AnoCLIPConfig(Method):
    """AnoCLIP (SPEC §4.4); with `tta` set, AnoCLIP+ (SPEC §4.5)."""

    local_blocks: Optional[int] = option(None, "final blocks that run the vv dual path; none: all blocks")
    prompts: str = option("anoclip", "prompt set of the text branch (SPEC §3)", tuple(PROMPT_SETS))
    tau: float = option(1.0, "logit scale of the softmax of cosines (1: plain softmax)")
    mean_filter: int = option(3, "side of the replicate-padded mean filter on the patch grid (1: none)")
    align_corners: bool = option(True, "bilinear upsampling of the patch grid with align_corners")
    views: bool = option(False, "image score averaged over the 22 views of SPEC §4.4")
    tta: Optional[TTAConfig] = option(None, "test-time adapter (AnoCLIP+, SPEC §4.5); none: plain AnoCLIP")
    tiles: int = option(1, "1: square input; 2: AnoVL's VisA protocol, short side S and two S×S tiles", (1, 2))

    name = "anoclip"
    run_options = {"seed": "tta.seed"}
    encoding_fields = ("local_blocks", "views", "tiles")

    def __post_init__(self):
        if self.tiles not in (1, 2):
            raise FiseclipError(f"tiles must be 1 (square input) or 2 (AnoVL's VisA tiles), got {self.tiles}")

    @property
    def label(self):
        return "anoclip+" if self.tta is not None else "anoclip"

    def prepare(self, image, size, resample="bicubic"):
        """Tiles: the image with its short side resized to `size` (aspect kept); else the S×S square."""
        if self.tiles == 1:
            return super().prepare(image, size, resample)
        return prepare_tiled(image, size, resample)

    def _layout(self, size) -> Optional[TileLayout]:
        return None if self.tiles == 1 else TileLayout.of(size, self.align_corners)

    def encode(self, params, cfg, pixels):
        """{"local" [B, P, D] final vv tokens, "cls" [B, D] or, with views, [B, 22, D]}; with tiles a
        tile axis after the batch axis ([B, 2, P, D], [B, 2, D] or [B, 2, 22, D])."""
        layout = self._layout(pixels.shape[1:3])
        b = pixels.shape[0]
        if layout is not None:
            tiles = layout.split(pixels)  # [B, 2, S, S, 3]
            pixels = tiles.reshape((-1,) + tiles.shape[2:])
        n = self.local_blocks or cfg.vision.layers
        out = encode_image(params, cfg, pixels, local="vv", local_blocks=n)
        cls = out["image_embeds"]
        if self.views:
            views = anoclip_views(pixels)  # [V, B, S, S, 3]
            cls = jax.lax.map(lambda v: encode_image(params, cfg, v)["image_embeds"], views)
            cls = jnp.swapaxes(cls, 0, 1)  # batch first
        feats = {"local": out["local_embeds"], "cls": cls}
        if layout is not None:
            feats = jax.tree.map(lambda x: x.reshape((b, -1) + x.shape[1:]), feats)
        return feats

    def initial_state(self, cfg, text):
        """AnoCLIP+: the next image's index (its adapter's keys) and, with carry_moments, the AdamW state."""
        return None if self.tta is None else fresh_state(as_text(text), self.tta, cfg.embed_dim)

    def score(self, feats, text, valid, *, size, mesh=None):
        """τ = 1 softmax of cosines, 3×3 replicate mean filter, bilinear up (per tile, then merged); image
        score from CLS (mean over views and tiles). With `tta`, the local tokens are first adapted per image
        (SPEC §4.5), as the first batch of a category."""
        state = None
        if self.tta is not None:
            state = fresh_state(as_text(text), self.tta, feats["local"].shape[-1])
        return self.score_state(feats, text, valid, state, size=size, mesh=mesh)[0]

    def score_state(self, feats, text, valid, state, *, size, mesh=None):
        local, cls = feats["local"], feats["cls"]
        layout = self._layout(size)
        chex.assert_rank(local, 3 if layout is None else 4)
        chex.assert_equal_shape_prefix([local, cls, valid], 1)
        text = as_text(text)
        if self.tta is not None:
            local, state = adapt_batch(local, text, self.tta, valid, state, layout)
        grid = grid_maps(text_alignment(local, text.features, self.tau).reshape(-1, local.shape[-2]))
        if self.mean_filter > 1:
            grid = mean_filter(grid, self.mean_filter, padding="replicate")
        if layout is None:
            maps = upsample_bilinear(grid, size, self.align_corners)
        else:
            maps = layout.upsample_merge(grid.reshape(local.shape[:2] + grid.shape[1:]))
        maps = maps * valid[:, None, None]
        probs = text_alignment(cls, text.features, self.tau)  # [B], or [B, tiles and/or views]
        scores = probs.reshape(probs.shape[0], -1).mean(1)
        return Detection(scores * valid, maps, jnp.full(valid.shape, -1, jnp.int32)), state


register("anoclip+", lambda tta=None, **kw: AnoCLIPConfig(tta=tta or TTAConfig(), **kw))
