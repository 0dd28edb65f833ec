"""The functional face of the CLIP modules (SPEC §1, §2): pure functions of (params, cfg, inputs).

Each is one jitted `CLIP(cfg).apply(...)` (see `model.py` for the modules and the parameter
tree), with the config and the encoder options as static arguments, so a caller can compose
them inside their own jit / vmap / sharding, or use `CLIP` inside their own Flax module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .config import CLIPConfig
from .layers import LOCAL_MODES as _MODES
from .model import CLIP
from ..errors import FiseclipError

Params = dict[str, Any]

LOCAL_MODES = tuple(_MODES)  # "vv", "qq", "qq+kk", "identity" (SPEC §2)


@functools.partial(jax.jit, static_argnames=("cfg", "layers", "local", "local_blocks"))
def encode_image(params: Params, cfg: CLIPConfig, pixels, *, layers=(), local=None, local_blocks=1):
    return CLIP(cfg).apply({"params": params}, pixels, layers=layers, local=local, local_blocks=local_blocks,
                           method=CLIP.encode_image)


encode_image.__doc__ = "`CLIP(cfg).encode_image` over `params`, jitted.\n\n" + CLIP.encode_image.__doc__


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_text(params: Params, cfg: CLIPConfig, token_ids):
    """Encode token ids [N, T<=77] to projected text embeddings [N, D] float32 (not normalised)."""
    return CLIP(cfg).apply({"params": params}, token_ids, method=CLIP.encode_text)


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_image_tokens(params: Params, cfg: CLIPConfig, pixels):
    """[B, S, S, 3] -> [B, 1 + P, W]: patch conv, class token, (resized) positions, ln_pre."""
    return CLIP(cfg).apply({"params": params}, pixels, method=CLIP.embed_image_tokens)


def _example_inputs(cfg: CLIPConfig):
    """The smallest inputs that reach every parameter: one native-size image, one token."""
    s = cfg.vision.image_size
    return jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 1), jnp.int32)


def _flax_init(cfg: CLIPConfig, key):
    return CLIP(cfg).init(key, *_example_inputs(cfg))["params"]


def init_clip(cfg: CLIPConfig, key) -> Params:
    """Random weights shaped like `CLIP(cfg).init(key, ...)["params"]`: for smoke tests and benchmarks
    only (every score computed with them is meaningless).

    The modules' initialisers' distributions: N(0, 0.02²) weights and embeddings, zero biases,
    identity LayerNorms, logit_scale log(1/0.07). Drawn with numpy (ziggurat on SFC64, one stream
    per leaf spawned from the key's bits, leaves on parallel threads, written into 64-byte aligned
    buffers that a CPU device adopts without a copy): flax's init compiles an XLA random kernel
    per leaf shape, many seconds on CPU. Call it outside jit; inside, use `CLIP(cfg).init`.
    """
    if isinstance(key, jax.core.Tracer):
        raise FiseclipError("init_clip draws with numpy and cannot be traced; under jit use CLIP(cfg).init")
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    seeds = np.random.SeedSequence([int(w) for w in np.asarray(key, np.uint32).ravel()])
    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        drawn = pool.map(_draw, [p[-1].key for p, _ in leaves], [x.shape for _, x in leaves],
                         seeds.spawn(len(leaves)))
        return jax.device_put(jax.tree.unflatten(tree, list(drawn)))


def _draw(name: str, shape, seed: np.random.SeedSequence) -> np.ndarray:
    """One leaf, by its name, as the module initialisers draw it (checked against CLIP.init in the tests)."""
    out = _aligned(shape)
    if name == "bias":
        out.fill(0)
    elif name == "scale":  # LayerNorm
        out.fill(1)
    elif name == "logit_scale":
        out.fill(np.log(1 / 0.07))
    else:
        np.random.Generator(np.random.SFC64(seed)).standard_normal(out=out, dtype=np.float32)
        out *= np.float32(0.02)
    return out


def _aligned(shape) -> np.ndarray:
    """An uninitialised float32 array on a 64-byte boundary (what XLA:CPU needs to alias it)."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(4 * n + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start:start + 4 * n].view(np.float32).reshape(shape)


def _with_one_block(cfg: CLIPConfig) -> CLIPConfig:
    return cfg.replace(vision=dataclasses.replace(cfg.vision, layers=1),
                       text=dataclasses.replace(cfg.text, layers=1))


@functools.lru_cache(maxsize=16)
def _shapes(cfg: CLIPConfig):
    # The blocks of a tower are identical modules: trace one per tower and repeat its shapes
    # (tracing all of ViT-L's 36 blocks takes seconds; the tests compare with the full trace).
    tree = jax.eval_shape(functools.partial(_flax_init, _with_one_block(cfg)), jax.random.key(0))
    for tower, depth in (("vision", cfg.vision.layers), ("text", cfg.text.layers)):
        block = tree[tower]["transformer"]["blocks_0"]
        tree[tower]["transformer"] = {f"blocks_{i}": block for i in range(depth)}
    return tree


def param_shapes(cfg: CLIPConfig):
    """The abstract parameter tree (ShapeDtypeStruct leaves) of `CLIP(cfg).init`, without allocating."""
    return jax.tree.map(lambda x: x, _shapes(cfg))  # a fresh tree: callers may edit their copy
