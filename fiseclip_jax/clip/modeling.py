"""CLIP image and text towers as pure functions over a parameter pytree (SPEC §1, §2).

Parameter layout (every leaf float32; the L blocks of a tower are stacked on a
leading axis so the tree is flat and shards cleanly):

    vision: patch_embed.kernel [p, p, 3, W] (HWIO, no bias), class_embed [W],
            pos_embed [1 + g*g, W], ln_pre.{scale,bias}, ln_post.{scale,bias},
            proj [W, D],
            blocks: ln_1, ln_2 .{scale,bias} [L, W];
                    attn.{q,k,v,out}.kernel [L, W, W] (in, out), .bias [L, W];
                    mlp.fc1.kernel [L, W, M], .bias [L, M];
                    mlp.fc2.kernel [L, M, W], .bias [L, W]
    text:   token_embed [V, Wt], pos_embed [ctx, Wt], ln_final.{scale,bias},
            proj [Wt, D], blocks as above
    logit_scale: []  (log of CLIP's temperature, 100 after exp for OpenAI)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .attention import attend
from .config import CLIPConfig

Params = dict[str, Any]

LOCAL_MODES = ("vv", "qq", "qq+kk", "identity")


# ---------------------------------------------------------------- primitives
def layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
    return x @ p["kernel"] + p["bias"]


def activation(x, act: str):
    if act == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


def _split_heads(x, heads):
    b, t, w = x.shape
    return x.reshape(b, t, heads, w // heads)  # [B, T, H, dh]


def _merge_heads(x):
    b, t, h, d = x.shape
    return x.reshape(b, t, h * d)


def _block(x, bp, heads, act, eps, causal=False):
    """Standard pre-LN transformer block: x + attn(LN1 x), then + MLP(LN2 x)."""
    u = layer_norm(x, bp["ln_1"], eps)
    q, k, v = (_split_heads(dense(u, bp["attn"][n]), heads) for n in ("q", "k", "v"))
    scale = q.shape[-1] ** -0.5
    x = x + dense(_merge_heads(attend(q, k, v, scale=scale, causal=causal)), bp["attn"]["out"])
    h = activation(dense(layer_norm(x, bp["ln_2"], eps), bp["mlp"]["fc1"]), act)
    return x + dense(h, bp["mlp"]["fc2"])


def _local_attention(u, bp, heads, mode):
    """The attention output (after W_o) of one modified block, SPEC §2 table."""
    q, k, v = (_split_heads(dense(u, bp["attn"][n]), heads) for n in ("q", "k", "v"))
    scale = q.shape[-1] ** -0.5
    if mode == "vv":
        o = attend(v, v, v, scale=scale)
    elif mode == "qq":
        o = attend(q, q, v, scale=scale)
    elif mode == "qq+kk":
        o = attend(q, q, v, scale=scale) + attend(k, k, v, scale=scale)
    elif mode == "identity":
        o = v
    else:
        raise ValueError(f"unknown local mode {mode!r}; choose from {LOCAL_MODES}")
    return dense(_merge_heads(o), bp["attn"]["out"])


def _local_block(x_loc, x_std, bp, heads, act, eps, mode):
    """One block of the local path. See `encode_image` for the semantics of each mode."""
    if mode == "vv":  # dual path: own residual, input from the standard stream, no FFN
        return x_loc + _local_attention(layer_norm(x_std, bp["ln_1"], eps), bp, heads, "vv")
    u = layer_norm(x_loc, bp["ln_1"], eps)
    o = _local_attention(u, bp, heads, mode)
    if mode == "qq+kk":  # SCLIP: residual and FFN kept
        x = x_loc + o
        h = activation(dense(layer_norm(x, bp["ln_2"], eps), bp["mlp"]["fc1"]), act)
        return x + dense(h, bp["mlp"]["fc2"])
    return o  # qq (ClearCLIP) and identity (MaskCLIP): residual and FFN removed


def _block_params(blocks, i):
    return jax.tree.map(lambda a: a[i], blocks)


# ------------------------------------------------------ position embeddings
@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of PyTorch's `interpolate(mode="bicubic", align_corners=False)`.

    Cubic convolution with A = -0.75, source coordinate (dst + 0.5) * in/out - 0.5,
    taps clamped to the border. This is the kernel transformers and OpenCLIP use to
    resize CLIP's position grid; `jax.image.resize("cubic")` uses A = -0.5 and
    antialiasing and does not match.
    """
    a = -0.75

    def w_near(t):  # |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def w_far(t):  # 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = int(np.floor(src))
        t = src - i0
        weights = (w_far(t + 1), w_near(t), w_near(1 - t), w_far(2 - t))
        for tap, w in zip(range(i0 - 1, i0 + 3), weights):
            m[o, min(max(tap, 0), in_size - 1)] += w
    return m.astype(np.float32)


def resize_pos_embed(pos_embed, grid: int, new_grid: int):
    """[1 + g*g, W] -> [1 + n*n, W]; the CLS row is kept, the grid resized bicubically."""
    if new_grid == grid:
        return pos_embed
    cls, patch = pos_embed[:1], pos_embed[1:].reshape(grid, grid, -1)
    m = jnp.asarray(bicubic_matrix(grid, new_grid))
    patch = jnp.einsum("oi,ijc->ojc", m, patch, precision="highest")
    patch = jnp.einsum("pj,ojc->opc", m, patch, precision="highest")
    return jnp.concatenate([cls, patch.reshape(new_grid * new_grid, -1)], axis=0)


# ---------------------------------------------------------------- encoders
def embed_image_tokens(params: Params, cfg: CLIPConfig, pixels):
    """[B, S, S, 3] -> [B, 1 + P, W]: patch conv, class token, (resized) positions, ln_pre."""
    vcfg, vp = cfg.vision, params["vision"]
    b, h, _, _ = pixels.shape
    p = vcfg.patch_size
    patches = jax.lax.conv_general_dilated(
        pixels.astype(jnp.float32), vp["patch_embed"]["kernel"], (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    grid = h // p
    x = patches.reshape(b, grid * grid, vcfg.width)
    cls = jnp.broadcast_to(vp["class_embed"], (b, 1, vcfg.width))
    x = jnp.concatenate([cls, x], axis=1) + resize_pos_embed(vp["pos_embed"], vcfg.grid, grid)
    return layer_norm(x, vp["ln_pre"], cfg.layer_norm_eps)


def _encode_image(params: Params, cfg: CLIPConfig, pixels, *, layers=(), local=None, local_blocks=1):
    vcfg, eps = cfg.vision, cfg.layer_norm_eps
    vp = params["vision"]
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be [B, S, S, 3] (NHWC), got shape {pixels.shape}")
    b, h, w, _ = pixels.shape
    p = vcfg.patch_size
    if h != w or h % p:
        raise ValueError(f"image must be square with side divisible by patch {p}, got {h}x{w}")
    for layer in layers:
        if not 1 <= layer <= vcfg.layers:
            raise ValueError(f"block index {layer} outside 1..{vcfg.layers} (1-indexed)")
    if local is not None:
        if local not in LOCAL_MODES:
            raise ValueError(f"unknown local mode {local!r}; choose from {LOCAL_MODES}")
        if not 1 <= local_blocks <= vcfg.layers:
            raise ValueError(f"local_blocks must be in 1..{vcfg.layers}, got {local_blocks}")

    x = embed_image_tokens(params, cfg, pixels)

    first_local = vcfg.layers - local_blocks + 1 if local is not None else None
    block_tokens, x_loc = {}, None
    for i in range(vcfg.layers):
        layer = i + 1
        bp = _block_params(vp["blocks"], i)
        if first_local is not None and layer >= first_local:
            if x_loc is None:
                x_loc = x
            x_loc = _local_block(x_loc, x, bp, vcfg.heads, cfg.act, eps, local)
        x = _block(x, bp, vcfg.heads, cfg.act, eps)
        if layer in layers:
            block_tokens[layer] = x

    def project(t):
        return layer_norm(t, vp["ln_post"], eps) @ vp["proj"]

    out = {
        "image_embeds": project(x[:, 0]),
        "patch_embeds": project(x[:, 1:]),
        "block_tokens": block_tokens,
    }
    if local is not None:
        out["local_embeds"] = project(x_loc[:, 1:])
    return out


def _encode_text(params: Params, cfg: CLIPConfig, token_ids):
    tcfg, eps = cfg.text, cfg.layer_norm_eps
    tp = params["text"]
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2 or token_ids.shape[1] > tcfg.context_length:
        raise ValueError(f"token_ids must be [N, <= {tcfg.context_length}], got {token_ids.shape}")
    n, t = token_ids.shape
    x = tp["token_embed"][token_ids] + tp["pos_embed"][:t]
    for i in range(tcfg.layers):
        x = _block(x, _block_params(tp["blocks"], i), tcfg.heads, cfg.act, eps, causal=True)
    x = layer_norm(x, tp["ln_final"], eps)
    eot = x[jnp.arange(n), jnp.argmax(token_ids, axis=-1)]  # the end token has the largest id
    return eot @ tp["proj"]


encode_image = jax.jit(_encode_image, static_argnames=("cfg", "layers", "local", "local_blocks"))
encode_image.__doc__ = """Encode CLIP-normalised images.

pixels: float32 [B, S, S, 3] (NHWC), S divisible by the patch size; position
embeddings are resized bicubically (PyTorch semantics) when S differs from native.
layers: 1-indexed blocks whose residual stream to return.
local: None or a SPEC §2 mode applied to the last `local_blocks` blocks:
  "vv"       dual path x_vv += W_o(softmax(v vᵀ s) v)(LN1 x_std), FFN skipped;
  "qq"       ClearCLIP, W_o(softmax(q qᵀ s) v), residual and FFN removed;
  "qq+kk"    SCLIP, softmax(q qᵀ s) + softmax(k kᵀ s), residual and FFN kept;
  "identity" MaskCLIP, W_o v, residual and FFN removed.
  The non-vv modes chain on the local path when local_blocks > 1. The standard
  path is never altered.
Returns image_embeds [B, D], patch_embeds [B, P, D], block_tokens {l: [B, 1+P, W]}
and, with `local`, local_embeds [B, P, D] (ln_post + proj of the local path).
"""

encode_text = jax.jit(_encode_text, static_argnames=("cfg",))
encode_text.__doc__ = "Encode token ids [N, T<=77] to projected text embeddings [N, D] (not normalised)."


# ---------------------------------------------------------------- init
def _init_tower_blocks(key, layers, width, mlp_dim):
    ks = jax.random.split(key, 6)
    std = 0.02

    def lin(k, i, o):
        return {"kernel": std * jax.random.normal(k, (layers, i, o), jnp.float32),
                "bias": jnp.zeros((layers, o), jnp.float32)}

    def ln():
        return {"scale": jnp.ones((layers, width), jnp.float32), "bias": jnp.zeros((layers, width), jnp.float32)}

    return {
        "ln_1": ln(), "ln_2": ln(),
        "attn": {n: lin(k, width, width) for n, k in zip(("q", "k", "v", "out"), ks[:4])},
        "mlp": {"fc1": lin(ks[4], width, mlp_dim), "fc2": lin(ks[5], mlp_dim, width)},
    }


def init_clip(cfg: CLIPConfig, key) -> Params:
    """Random parameters with CLIP's layout (normal, std 0.02; LayerNorms identity)."""
    v, t = cfg.vision, cfg.text
    ks = jax.random.split(key, 10)
    std = 0.02

    def ln(w):
        return {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)}

    return {
        "vision": {
            "patch_embed": {"kernel": std * jax.random.normal(ks[0], (v.patch_size, v.patch_size, 3, v.width))},
            "class_embed": std * jax.random.normal(ks[1], (v.width,)),
            "pos_embed": std * jax.random.normal(ks[2], (v.grid * v.grid + 1, v.width)),
            "ln_pre": ln(v.width), "ln_post": ln(v.width),
            "proj": std * jax.random.normal(ks[3], (v.width, cfg.embed_dim)),
            "blocks": _init_tower_blocks(ks[4], v.layers, v.width, v.mlp_dim),
        },
        "text": {
            "token_embed": std * jax.random.normal(ks[5], (t.vocab_size, t.width)),
            "pos_embed": std * jax.random.normal(ks[6], (t.context_length, t.width)),
            "ln_final": ln(t.width),
            "proj": std * jax.random.normal(ks[7], (t.width, cfg.embed_dim)),
            "blocks": _init_tower_blocks(ks[8], t.layers, t.width, t.mlp_dim),
        },
        "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32),
    }


def param_shapes(cfg: CLIPConfig):
    """The abstract parameter tree (ShapeDtypeStruct leaves), without allocating."""
    return jax.eval_shape(functools.partial(init_clip, cfg), jax.random.key(0))
