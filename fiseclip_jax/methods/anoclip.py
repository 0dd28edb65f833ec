"""AnoCLIP (SPEC §4.4) and, with a test-time adapter, AnoCLIP+ (SPEC §4.5)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import chex
import jax
import jax.numpy as jnp

from ..clip.modeling import encode_image
from ..postprocess import mean_filter, upsample_bilinear
from ..views import anoclip_views
from .base import Detection, Method, as_text, register
from .common import grid_maps, text_alignment
from .tta import TTAConfig, adapt_tokens


@register("anoclip")
@dataclasses.dataclass(frozen=True)
class AnoCLIPConfig(Method):
    """AnoCLIP (SPEC §4.4); with `tta` set, AnoCLIP+ (SPEC §4.5)."""

    local_blocks: Optional[int] = None  # None -> all blocks run the vv dual path
    prompts: str = "anoclip"
    tau: float = 1.0  # plain softmax of cosines
    mean_filter: int = 3  # replicate-padded mean filter on the patch grid
    align_corners: bool = True
    views: bool = False  # image score averaged over the 22 views of SPEC §4.4
    tta: Optional[TTAConfig] = None  # AnoCLIP+ (SPEC §4.5): TTAConfig(); None = plain AnoCLIP

    name = "anoclip"
    run_options = {"seed": "tta.seed"}
    encoding_fields = ("local_blocks", "views")

    @property
    def label(self):
        return "anoclip+" if self.tta is not None else "anoclip"

    def encode(self, params, cfg, pixels):
        """{"local" [B, P, D] final vv tokens, "cls" [B, D] or, with views, [B, 22, D]}."""
        n = self.local_blocks or cfg.vision.layers
        out = encode_image(params, cfg, pixels, local="vv", local_blocks=n)
        cls = out["image_embeds"]
        if self.views:
            views = anoclip_views(pixels)  # [V, B, S, S, 3]
            cls = jax.lax.map(lambda v: encode_image(params, cfg, v)["image_embeds"], views)
            cls = jnp.swapaxes(cls, 0, 1)  # batch first
        return {"local": out["local_embeds"], "cls": cls}

    def score(self, feats, text, valid, *, size, mesh=None):
        """τ = 1 softmax of cosines, 3×3 replicate mean filter, bilinear up; image score from CLS
        (mean over views). With `tta`, the local tokens are first adapted per image (SPEC §4.5)."""
        local, cls = feats["local"], feats["cls"]
        chex.assert_rank(local, 3)
        chex.assert_equal_shape_prefix([local, cls, valid], 1)
        text = as_text(text)
        if self.tta is not None:
            local = adapt_tokens(local, text, self.tta, valid=valid)
        grid = grid_maps(text_alignment(local, text.features, self.tau))
        if self.mean_filter > 1:
            grid = mean_filter(grid, self.mean_filter, padding="replicate")
        maps = upsample_bilinear(grid, size, self.align_corners) * valid[:, None, None]
        probs = text_alignment(cls, text.features, self.tau)  # [B] or [B, V] with views
        scores = probs.mean(1) if cls.ndim == 3 else probs
        return Detection(scores * valid, maps, jnp.full(valid.shape, -1, jnp.int32))


register("anoclip+", lambda tta=None, **kw: AnoCLIPConfig(tta=tta or TTAConfig(), **kw))
