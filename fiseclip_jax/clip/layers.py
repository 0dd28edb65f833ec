"""Transformer layers of both CLIP towers as flax.linen modules (SPEC §1, §2).

A block computes one stream in one of several modes (SPEC §2 table). A mode is data,
`BlockMode`: which (a, b) similarity pairs are softmaxed and summed, whether the input
comes from the standard stream (vv dual path), and whether the residual and the MLP
are kept. `ResidualBlock.__call__` is the standard CLIP block; `ResidualBlock.local`
runs a local-semantics mode with the same parameters as a second path beside it.

Parameters of one block (dtype param_dtype, float32 by default):

    ln_1.{scale,bias} [W]    attn.{q,k,v,out}.kernel [W, W] (in, out), .bias [W]
    ln_2.{scale,bias} [W]    mlp.fc1.kernel [W, M], .bias [M]; mlp.fc2.kernel [M, W], .bias [W]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import attend

# Random-init distributions (smoke-test weights only): CLIP-like N(0, 0.02²), zero biases.
weight_init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class BlockMode:
    """How a block computes its stream (SPEC §2 table)."""

    name: str
    pairs: tuple[tuple[str, str], ...]  # similarity pairs (a, b), softmax(a bᵀ s) summed; () = identity
    from_standard: bool  # LN1 reads the standard stream, not this path's own (vv dual path)
    residual: bool  # x + attn(...); False keeps attn(...) only
    mlp: bool  # + MLP(LN2 x) after the attention


STANDARD = BlockMode("standard", (("q", "k"),), from_standard=False, residual=True, mlp=True)
LOCAL_MODES: dict[str, BlockMode] = {m.name: m for m in (
    BlockMode("vv", (("v", "v"),), from_standard=True, residual=True, mlp=False),  # CLIP Surgery / AnoCLIP
    BlockMode("qq", (("q", "q"),), from_standard=False, residual=False, mlp=False),  # ClearCLIP
    BlockMode("qq+kk", (("q", "q"), ("k", "k")), from_standard=False, residual=True, mlp=True),  # SCLIP
    BlockMode("identity", (), from_standard=False, residual=False, mlp=False),  # MaskCLIP
)}


def layer_norm(eps: float, dtype, param_dtype, name: str | None = None) -> nn.LayerNorm:
    """CLIP's LayerNorm: the config's epsilon (flax's default differs) and the two-pass variance
    E[(x - E x)²] as PyTorch computes it; statistics in float32 whatever `dtype`."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


def activation(x, act: str):
    """QuickGELU (OpenAI) or exact-erf GELU (OpenCLIP); never flax's tanh default (SPEC §1)."""
    if act == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class Attention(nn.Module):
    """Multi-head self-attention whose similarity pairs come from a `BlockMode`: [B, T, W] -> [B, T, W]."""

    width: int
    heads: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=weight_init)
        self.q, self.k, self.v, self.out = (nn.Dense(self.width, **dense) for _ in range(4))

    def __call__(self, u, mode: BlockMode = STANDARD, causal: bool = False):
        b, t, _ = u.shape
        dh = self.width // self.heads
        names = {n for pair in mode.pairs for n in pair} | {"v"}  # only the projections the mode reads
        proj = {n: getattr(self, n)(u).reshape(b, t, self.heads, dh) for n in sorted(names)}
        o = proj["v"]  # identity: each token attends to itself only
        if mode.pairs:
            o = sum(attend(proj[x], proj[y], proj["v"], scale=dh ** -0.5, causal=causal) for x, y in mode.pairs)
        return self.out(o.reshape(b, t, self.width))


class MLP(nn.Module):
    """fc1 -> activation -> fc2: [B, T, W] -> [B, T, W]."""

    width: int
    mlp_dim: int
    act: str
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=weight_init)
        self.fc1 = nn.Dense(self.mlp_dim, **dense)
        self.fc2 = nn.Dense(self.width, **dense)

    def __call__(self, x):
        return self.fc2(activation(self.fc1(x), self.act))


class ResidualBlock(nn.Module):
    """Pre-LN block x + attn(LN1 x), then + MLP(LN2 x); `local` is the SPEC §2 second path."""

    width: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_1 = layer_norm(self.eps, **kw)
        self.attn = Attention(self.width, self.heads, **kw)
        self.ln_2 = layer_norm(self.eps, **kw)
        self.mlp = MLP(self.width, self.mlp_dim, self.act, **kw)

    def __call__(self, x, causal: bool = False):
        """The standard block: [B, T, W] -> [B, T, W]."""
        return self.run(x, x, STANDARD, causal)

    def local(self, x_loc, x_std, mode: str):
        """One block of the local path (SPEC §2): x_loc its own stream, x_std the standard stream
        entering this block (read by the vv dual path). [B, T, W] -> [B, T, W]."""
        return self.run(x_loc, x_std, LOCAL_MODES[mode])

    def run(self, x, x_std, mode: BlockMode, causal: bool = False):
        u = self.ln_1(x_std if mode.from_standard else x)
        o = self.attn(u, mode, causal)
        x = x + o if mode.residual else o
        if mode.mlp:
            x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """`layers` residual blocks, named blocks_0 .. blocks_{L-1} (a Python loop, not nn.scan: the
    local path and the per-block outputs need each block by itself)."""

    width: int
    layers: int
    heads: int
    mlp_dim: int
    act: str
    eps: float
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self):
        self.blocks = [ResidualBlock(self.width, self.heads, self.mlp_dim, self.act, self.eps, self.dtype,
                                     self.param_dtype) for _ in range(self.layers)]

    def __call__(self, x, *, causal: bool = False, keep: tuple[int, ...] = (), local: str | None = None,
                 local_blocks: int = 1):
        """x [B, T, W] -> (x after the last block, {l: x after block l for l in keep (1-indexed)},
        the local path after the last block or None). The local path runs `local` in the last
        `local_blocks` blocks, starting from the standard stream entering the first of them."""
        first_local = self.layers - local_blocks + 1 if local is not None else self.layers + 1
        kept, x_loc = {}, None
        for layer, block in enumerate(self.blocks, start=1):
            if layer >= first_local:
                x_loc = block.local(x if x_loc is None else x_loc, x, local)
            x = block(x, causal)
            if layer in keep:
                kept[layer] = x
        return x, kept, x_loc
