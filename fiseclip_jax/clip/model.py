"""CLIP's image and text towers as flax.linen modules (SPEC §1, §2), used through init / apply.

Parameter tree of `CLIP(cfg)` (format version 2; every leaf float32):

    vision: patch_embed.kernel [p, p, 3, W] (HWIO, no bias), class_embed [W], pos_embed [1 + g*g, W],
            ln_pre.{scale,bias} [W], transformer.blocks_{i} (i = 0 .. L-1), ln_post.{scale,bias} [W],
            proj [W, D]
    text:   token_embed [V, Wt], pos_embed [ctx, Wt], transformer.blocks_{i}, ln_final.{scale,bias} [Wt],
            proj [Wt, D]
    logit_scale: []  (log of CLIP's temperature; 100 after exp for OpenAI weights)

    blocks_{i}: ln_1, ln_2 .{scale,bias} [W]; attn.{q,k,v,out}.kernel [W, W] (in, out), .bias [W];
                mlp.fc1.kernel [W, M], .bias [M]; mlp.fc2.kernel [M, W], .bias [W]

e.g. vision.transformer.blocks_0.attn.q.kernel. Format version 1 (before flax) stacked the blocks
of a tower on a leading axis under `blocks`; `checkpoint.load_clip` upgrades it.

dtype: computation runs in `dtype` (default cfg.dtype); parameters stay `param_dtype` (float32);
LayerNorm statistics and softmax are float32, and every output of encode_image / encode_text
is float32 so that downstream matching runs in float32.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import CLIPConfig, TextConfig, VisionConfig
from .layers import LOCAL_MODES, Transformer, layer_norm, weight_init
from .posemb import resize_pos_embed
from ..errors import FiseclipError


CPU_PASS_ROWS = 3200  # on CPU, images go through the vision transformer in passes of at most ~this many tokens


def images_per_pass(batch: int, tokens: int, backend: str | None = None) -> int:
    """Images per pass of the vision transformer: the whole batch, except on CPU, where it is the
    largest divisor of `batch` whose passes hold at most `CPU_PASS_ROWS` token rows (at least one
    image). XLA:CPU's matmuls ran ~1.2x faster on 2050 rows than on 8200 (`benchmarks/gemm.py
    --batch 2` vs `--batch 8`; `benchmarks/encoder.py --pass-rows` times whole encoders); other
    backends prefer one big batch, and so does a symbolic batch (jax.export's shape polymorphism)."""
    if (backend or jax.default_backend()) != "cpu" or not isinstance(batch, int):
        return batch
    fit = max(1, CPU_PASS_ROWS // tokens)
    return max(d for d in range(1, min(batch, fit) + 1) if batch % d == 0)


def _compute(dtype):
    """The computation dtype of a module whose `dtype` is None: float32, as its parameters."""
    return jnp.float32 if dtype is None else dtype


def _transformer(c: VisionConfig | TextConfig, act: str, eps: float, dtype, param_dtype) -> Transformer:
    return Transformer(c.width, c.layers, c.heads, c.mlp_dim, act, eps, dtype, param_dtype, name="transformer")


class VisionTransformer(nn.Module):
    """ViT image tower: pixels [B, S, S, 3] -> embeddings, patch embeddings, block tokens."""

    cfg: VisionConfig
    embed_dim: int
    act: str
    eps: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                                   padding="VALID", use_bias=False, kernel_init=weight_init, **kw)
        self.class_embed = self.param("class_embed", weight_init, (c.width,), self.param_dtype)
        self.pos_embed = self.param("pos_embed", weight_init, (c.grid * c.grid + 1, c.width), self.param_dtype)
        self.ln_pre = layer_norm(self.eps, **kw)
        self.transformer = _transformer(c, self.act, self.eps, **kw)
        self.ln_post = layer_norm(self.eps, **kw)
        self.proj = self.param("proj", weight_init, (c.width, self.embed_dim), self.param_dtype)

    def embed(self, pixels):
        """[B, S, S, 3] -> [B, 1 + P, W]: patch conv, class token, (resized) positions, ln_pre."""
        chex.assert_rank(pixels, 4)
        chex.assert_axis_dimension(pixels, 3, 3)
        b, s = pixels.shape[:2]
        grid = s // self.cfg.patch_size
        x = self.patch_embed(pixels.astype(_compute(self.dtype))).reshape(b, grid * grid, self.cfg.width)
        cls = jnp.broadcast_to(self.class_embed.astype(x.dtype), (b, 1, self.cfg.width))
        pos = resize_pos_embed(self.pos_embed, self.cfg.grid, grid).astype(x.dtype)
        return self.ln_pre(jnp.concatenate([cls, x], axis=1) + pos)

    def project(self, tokens):
        """ln_post then proj: [..., W] -> [..., D] float32."""
        return (self.ln_post(tokens) @ self.proj.astype(_compute(self.dtype))).astype(jnp.float32)

    def __call__(self, pixels, *, layers: tuple[int, ...] = (), local: str | None = None, local_blocks: int = 1):
        x = self.embed(pixels)
        x, kept, x_loc = self.transformer(x, keep=layers, local=local, local_blocks=local_blocks)
        out = {
            "image_embeds": self.project(x[:, 0]),
            "patch_embeds": self.project(x[:, 1:]),
            "block_tokens": {layer: t.astype(jnp.float32) for layer, t in kept.items()},
        }
        if local is not None:
            out["local_embeds"] = self.project(x_loc[:, 1:])
        return out


class TextTransformer(nn.Module):
    """Causal text tower: token ids [N, T] -> projected features [N, D] at the end token (SPEC §1)."""

    cfg: TextConfig
    embed_dim: int
    act: str
    eps: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embed = self.param("token_embed", weight_init, (c.vocab_size, c.width), self.param_dtype)
        self.pos_embed = self.param("pos_embed", weight_init, (c.context_length, c.width), self.param_dtype)
        self.transformer = _transformer(c, self.act, self.eps, **kw)
        self.ln_final = layer_norm(self.eps, **kw)
        self.proj = self.param("proj", weight_init, (c.width, self.embed_dim), self.param_dtype)

    def __call__(self, token_ids):
        chex.assert_rank(token_ids, 2)
        chex.assert_type(token_ids, int)
        n, t = token_ids.shape
        dtype = _compute(self.dtype)
        x = (self.token_embed[token_ids] + self.pos_embed[:t]).astype(dtype)
        x, _, _ = self.transformer(x, causal=True)
        x = self.ln_final(x)
        eot = x[jnp.arange(n), jnp.argmax(token_ids, axis=-1)]  # the end token has the largest id
        return (eot @ self.proj.astype(dtype)).astype(jnp.float32)


class CLIP(nn.Module):
    """Both towers and the logit scale. Methods: encode_image, encode_text, embed_image_tokens, __call__.

    `dtype` None computes in cfg.dtype; parameters are `param_dtype` (float32).
    """

    cfg: CLIPConfig
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        cfg = self.cfg
        kw = dict(embed_dim=cfg.embed_dim, act=cfg.act, eps=cfg.layer_norm_eps,
                  dtype=jnp.dtype(cfg.dtype if self.dtype is None else self.dtype), param_dtype=self.param_dtype)
        self.vision = VisionTransformer(cfg.vision, **kw)
        self.text = TextTransformer(cfg.text, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), (),
                                      self.param_dtype)

    def encode_image(self, pixels, *, layers: tuple[int, ...] = (), local: str | None = None,
                     local_blocks: int = 1):
        """Encode CLIP-normalised images.

        pixels: [B, S, S, 3] (NHWC), S divisible by the patch size; position embeddings are
        resized bicubically (PyTorch semantics) when S differs from native.
        layers: 1-indexed blocks whose residual stream to return.
        local: None or a SPEC §2 mode applied to the last `local_blocks` blocks:
          "vv"       dual path x_vv += W_o(softmax(v vᵀ s) v)(LN1 x_std), FFN skipped;
          "qq"       ClearCLIP, W_o(softmax(q qᵀ s) v), residual and FFN removed;
          "qq+kk"    SCLIP, softmax(q qᵀ s) + softmax(k kᵀ s), residual and FFN kept;
          "identity" MaskCLIP, W_o v, residual and FFN removed.
          The non-vv modes chain on the local path when local_blocks > 1. The standard
          path is never altered.
        Returns (all float32) image_embeds [B, D], patch_embeds [B, P, D], block_tokens
        {l: [B, 1+P, W]} and, with `local`, local_embeds [B, P, D] (ln_post + proj of the local path).
        On CPU the batch goes through in passes of a few images (`images_per_pass`); each image's
        computation is the same either way.
        """
        _check_image_args(self.cfg, pixels.shape, layers, local, local_blocks)
        kw = dict(layers=tuple(layers), local=local, local_blocks=local_blocks)
        batch, side = pixels.shape[:2]
        per = images_per_pass(batch, 1 + (side // self.cfg.vision.patch_size) ** 2)
        if per == batch:
            return self.vision(pixels, **kw)

        def one_pass(module, carry, chunk):  # the same parameters for every pass
            return carry, module.vision(chunk, **kw)

        passes = nn.scan(one_pass, variable_broadcast="params", split_rngs={"params": False})
        _, out = passes(self, None, pixels.reshape(batch // per, per, *pixels.shape[1:]))
        return jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), out)

    def encode_text(self, token_ids):
        """Token ids [N, T <= context] -> projected text embeddings [N, D] float32 (not normalised)."""
        token_ids = jnp.asarray(token_ids)
        ctx = self.cfg.text.context_length
        if token_ids.ndim != 2 or token_ids.shape[1] > ctx:
            raise FiseclipError(f"token_ids must be [N, <= {ctx}], got {token_ids.shape}")
        return self.text(token_ids)

    def embed_image_tokens(self, pixels):
        """[B, S, S, 3] -> [B, 1 + P, W] float32: the vision tower's input to block 1 (after ln_pre)."""
        return self.vision.embed(pixels).astype(jnp.float32)

    def __call__(self, pixels, token_ids):
        """(encode_image(pixels), encode_text(token_ids))."""
        return self.encode_image(pixels), self.encode_text(token_ids)


def _check_image_args(cfg: CLIPConfig, shape, layers, local, local_blocks) -> None:
    """Readable errors for the public entry points (chex asserts guard the tower itself)."""
    v = cfg.vision
    if len(shape) != 4 or shape[-1] != 3:
        raise FiseclipError(f"pixels must be [B, S, S, 3] (NHWC), got shape {tuple(shape)}")
    h, w = shape[1:3]
    if h != w or h % v.patch_size:
        raise FiseclipError(f"image must be square with side divisible by patch {v.patch_size}, got {h}x{w}")
    for layer in layers:
        if not 1 <= layer <= v.layers:
            raise FiseclipError(f"block index {layer} outside 1..{v.layers} (1-indexed)")
    if local is not None:
        if local not in LOCAL_MODES:
            raise FiseclipError(f"unknown local mode {local!r}; choose from {tuple(LOCAL_MODES)}")
        if not 1 <= local_blocks <= v.layers:
            raise FiseclipError(f"local_blocks must be in 1..{v.layers}, got {local_blocks}")
