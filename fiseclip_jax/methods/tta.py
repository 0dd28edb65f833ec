"""AnoCLIP+ test-time adapter (SPEC §4.5): a small adapter fitted per test image with optax AdamW.

    z' = ½ z + ½ adapter(z),  ẑ = z / ‖z‖
    text   (objects): adapter(z) = tanh(W ẑ + b)ᵀ T,  W [2M, D], T [2M, D] normalised sentences
    linear (VisA):    adapter(z) = W ẑ + b,           W [D, D]
    P = softmax(cos(z', t_normal), cos(z', t_abnormal))   (τ = 1; z' is L2-normalised first)
    loss = mean_p H(P₀) + hard_weight · mean_p(−log P₁[abnormal] − log P₀[normal])

What the authors' code (hq-deng/AnoVL: model.py `TextAdapter`/`Adapter`, vl_test.py
`loss_func`) does, and this module follows:

- Init: both adapters are a `torch.nn.Linear` (D -> 2M, D -> D) reset per image with
  `reset_parameters()`, i.e. PyTorch's default: W and b ~ U(−1/√D, 1/√D).
- Normalisation: the adapter's input is ẑ (normalised), the residual half uses the raw z,
  and z' is L2-normalised before the cosine with the (normalised) class text features.
  T is the per-sentence embeddings, each normalised, normal side then abnormal side.
- Pseudo-labels: no patch selection. Every patch contributes both hard terms: the noisy
  copy is labelled *abnormal* (−log P₁[abnormal]) and the clean copy *normal*
  (−log P₀[normal]); the entropy term uses the clean copy only. One noisy copy,
  ε ~ N(0, 0.055²) (their 0.05·1.1) added to the raw projected tokens, redrawn every step.
- Optimiser: `torch.optim.AdamW(params, 1e-3)`: betas (0.9, 0.999), eps 1e-8, weight decay
  0.01 (also on the bias), 5 steps; the map is then computed from z' of the clean tokens.
- One AdamW per class whose moments (and step count) carry from image to image while
  the adapter is reset: `carry_moments=True` (default off, SPEC §4.5). The carried state
  (`fresh_state`, `adapt_batch`) holds the moments and the index of the next image, so a
  category run batch by batch (`detect_category`) carries it in file order across batches,
  and the result does not depend on the batch size.
- VisA (AnoVL vis_test.py): one adapter per image, shared by its two 240×240 tiles; the loss
  is taken on the pixel map — each tile's two cosines upsampled (bilinear, align_corners=True)
  to 240×240, put back in place and averaged where the tiles overlap, then the softmax.
  Pass the image's `TileLayout` as `layout` and tokens [B, 2, P, D].
- Sentence rows of T follow the prompt set's sentence order, template-major (AnoVL's
  `for template: for state:`), so adapter row k pairs with the authors' sentence k.

Keys: image n of a category (its index, counted from `offset`) uses k_n = fold_in(key, n);
split(k_n) = (init key, noise key); step s draws its noise from split(noise key, steps)[s].
Keys depend on the index only, so padding a batch, or cutting a category into other
batches, leaves every image's draws unchanged. Both draws can be given instead: `init`
(arrays, or `TTAConfig.init_fn(key, kind, dim, n_rows)`) and `noise` (arrays of the added ε,
or `TTAConfig.noise_fn(key, shape)`), so an independent implementation can be fed the same
draws (e.g. torch's).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from ..errors import FiseclipError
from ..prompts import TextFeatures
from ..tiles import TileLayout
from .base import option

ADAPTERS = ("text", "linear")


@dataclasses.dataclass(frozen=True)
class TTAConfig:
    """AnoCLIP+ test-time adaptation (SPEC §4.5). Hashable: a static jit argument via AnoCLIPConfig."""

    steps: int = option(5, "AdamW steps per image")
    lr: float = option(1e-3, "AdamW learning rate")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    weight_decay: float = option(0.01, "AdamW decoupled weight decay (also on the bias)")
    noise_sigma: float = option(0.055, "std of the noise of the abnormal copy (AnoVL: 0.05 * 1.1)")
    hard_weight: float = option(0.5, "weight of the two pseudo-label terms of the loss")
    adapter: str = option("text", "text (MVTec objects and textures) or linear (VisA)", ADAPTERS)
    carry_moments: bool = option(False, "AnoVL's one AdamW per class: moments carried from image to image")
    seed: int = option(0, "key of the adapter's initialisation and noise draws")
    eps: float = option(1e-8, "AdamW epsilon (torch's default)")
    # Explicit draws, functions of the image's init / step key (module docstring); None: drawn here.
    init_fn: Optional[Callable] = option(None, "Python only: (key, kind, dim, n_rows) -> {w, b}")
    noise_fn: Optional[Callable] = option(None, "Python only: (key, shape) -> the noise added at one step")

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise FiseclipError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.steps < 0:
            raise FiseclipError(f"steps must be >= 0, got {self.steps}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


def make_optimizer(config: TTAConfig) -> optax.GradientTransformation:
    """optax AdamW with torch.optim.AdamW's semantics (decoupled decay on every parameter)."""
    return optax.adamw(config.lr, b1=config.betas[0], b2=config.betas[1], eps=config.eps,
                       weight_decay=config.weight_decay)


# ------------------------------------------------------------------ adapter
def init_adapter(key, kind: str, dim: int, n_sentences: int = 0) -> dict:
    """Fresh adapter {"w", "b"}: torch.nn.Linear's default init, U(−1/√dim, 1/√dim).

    kind "text": w [n_sentences, dim] with n_sentences the rows of T (normal + abnormal);
    kind "linear": w [dim, dim] (n_sentences ignored).
    """
    if kind not in ADAPTERS:
        raise FiseclipError(f"adapter kind must be one of {ADAPTERS}, got {kind!r}")
    out = n_sentences if kind == "text" else dim
    if out <= 0:
        raise FiseclipError("the text adapter needs n_sentences > 0 (rows of the stacked sentence features)")
    bound = 1.0 / dim ** 0.5
    kw, kb = jax.random.split(key)
    return {"w": jax.random.uniform(kw, (out, dim), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (out,), jnp.float32, -bound, bound)}


def apply_adapter(params, z, sentences, kind: str):
    """[..., D] tokens -> [..., D] adapted tokens z' = ½z + ½ adapter(z) (SPEC §4.5)."""
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    h = zn @ params["w"].T + params["b"]
    if kind == "text":
        h = jnp.tanh(h) @ sentences
    return 0.5 * z + 0.5 * h


def _log_probs(z, text_features, layout: Optional[TileLayout] = None):
    """[..., P, D] -> [..., P, 2] log softmax of the raw cosines with (normal, abnormal), τ = 1.

    With a `layout`, z is one image's tiles [2, P, D] and the result is per pixel [H·W, 2]: the
    cosines upsampled per tile and merged before the softmax (AnoVL's VisA loss)."""
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    t = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
    cos = zn @ t.T
    if layout is not None:
        chex.assert_rank(cos, 3)  # [tiles, P, 2]
        g = int(round(cos.shape[1] ** 0.5))
        grids = jnp.moveaxis(cos, -1, 0).reshape(2, cos.shape[0], g, g)  # [2 sides, tiles, g, g]
        cos = layout.upsample_merge(grids).reshape(2, -1).T  # [H·W, 2]
    return jax.nn.log_softmax(cos, axis=-1)


def tta_loss(params, z, noisy, text_features, sentences, config: TTAConfig, layout=None):
    """Scalar loss of one image: z [P, D] clean tokens (or its tiles [2, P, D] with a `layout`), noisy:
    the noisy copy, text_features [2, D], sentences [2M, D] (None for the linear adapter)."""
    lp0 = _log_probs(apply_adapter(params, z, sentences, config.adapter), text_features, layout)
    lp1 = _log_probs(apply_adapter(params, noisy, sentences, config.adapter), text_features, layout)
    entropy = -jnp.sum(jnp.exp(lp0) * lp0, axis=-1)
    hard = -jnp.mean(lp1[..., 1]) - jnp.mean(lp0[..., 0])  # noisy -> abnormal, clean -> normal
    return jnp.mean(entropy) + config.hard_weight * hard


def _update(params, opt_state, z, noisy, text_features, sentences, config, layout=None):
    loss, grads = jax.value_and_grad(tta_loss)(params, z, noisy, text_features, sentences, config, layout)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def tta_step(params, opt_state, z, key, text_features, sentences, config: TTAConfig):
    """One AdamW step on one image, fresh noise from `key`: -> (params, opt_state, loss)."""
    return _update(params, opt_state, z, z + _draw_noise(key, z.shape, config), text_features, sentences, config)


def _draw_noise(key, shape, config):
    if config.noise_fn is not None:
        return jnp.asarray(config.noise_fn(key, shape), jnp.float32)
    return config.noise_sigma * jax.random.normal(key, shape, jnp.float32)


def _fit(z, key, text_features, sentences, config, opt_state=None, init=None, noise=None, layout=None):
    """Fresh adapter for one image (z [P, D], or [2, P, D] tiles), `steps` AdamW steps -> (params, opt_state).

    init: this image's initial {"w", "b"} or None (drawn from the key); noise: its [steps, *z.shape] ε or None."""
    k_init, k_noise = jax.random.split(key)
    if init is None:
        n = 0 if sentences is None else sentences.shape[0]
        init = (config.init_fn or init_adapter)(k_init, config.adapter, z.shape[-1], n)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), init)
    if noise is None:  # step s: split(noise key, steps)[s]
        keys = jax.random.split(k_noise, config.steps)
        noise = jax.vmap(lambda k: _draw_noise(k, z.shape, config))(keys)
    if opt_state is None:
        opt_state = make_optimizer(config).init(params)

    def step(carry, eps):
        p, s, _ = _update(*carry, z, z + eps, text_features, sentences, config, layout)
        return (p, s), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), noise)
    return params, opt_state


# ------------------------------------------------------------------ batches
def stacked_sentences(text, kind: str):
    """(class features [2, D], T [2M, D] normal then abnormal sentences, or None for "linear")."""
    if isinstance(text, TextFeatures):
        feats, normal, abnormal = text
    else:
        feats, normal, abnormal = jnp.asarray(text), None, None
    if kind == "linear":
        return feats, None
    if normal is None or normal.shape[0] == 0 or abnormal.shape[0] == 0:
        raise FiseclipError("the AnoCLIP+ text adapter needs per-sentence text features: pass the TextFeatures "
                         "from text_features_full(params, cfg, class_name, 'anoclip') rather than a bare "
                         "[2, D] array (or use TTAConfig(adapter='linear'))")
    return feats, jnp.concatenate([normal, abnormal], axis=0)


def image_keys(key, n: int, offset=0):
    """[n] per-image keys fold_in(key, offset + i): independent of batching and padding."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n))


def _fresh_opt_state(config: TTAConfig, dim: int, sentences):
    """A fresh AdamW state for the adapter's shapes (its values do not depend on the parameters)."""
    n = 0 if sentences is None else sentences.shape[0]
    return make_optimizer(config).init(init_adapter(jax.random.key(0), config.adapter, dim, n))


def fresh_state(text, config: TTAConfig, dim: int) -> dict:
    """The state a category starts from: {"index": 0 (next image), "opt": a fresh AdamW state, or None
    without carry_moments}."""
    opt = _fresh_opt_state(config, dim, stacked_sentences(text, config.adapter)[1]) if config.carry_moments else None
    return {"index": jnp.zeros((), jnp.int32), "opt": opt}


def adapt(local, text, config: TTAConfig, key, valid=None, opt_state=None, *, init=None, noise=None,
          layout: Optional[TileLayout] = None, offset=0):
    """Adapt every image of a batch: local [B, P, D] (or [B, 2, P, D] tiles with a `layout`) ->
    (adapted like local, params, opt_states).

    Each image gets a freshly initialised adapter. carry_moments=False: each also gets a fresh
    AdamW state and all adapt in parallel under `vmap`; carry_moments=True: one AdamW state is
    carried from image to image in batch order (a `lax.scan`, AnoVL's habit), starting from
    `opt_state` (a state returned for an earlier batch, e.g. `tree.map(lambda x: x[-1], states)`)
    or a fresh one. Returned params and opt_states are per image (leading axis B); with
    carry_moments, opt_states[i] is the state after image i. Images with valid False (padding)
    are not updated, never update the carried state, and come back unchanged.
    init: {"w" [B, rows, D], "b" [B, rows]} initial adapters; noise: [B, steps, *local.shape[1:]] the ε
    of every step (module docstring); offset: index of the batch's first image in its category (keys).
    Compiled once per (shapes, config, layout).
    """
    local = jnp.asarray(local, jnp.float32)
    valid = jnp.ones(local.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    adapted, params, states, _ = _adapt(local, text, config, key, valid, opt_state, init, noise, layout,
                                        jnp.asarray(offset, jnp.int32))
    return adapted, params, states


def _rows(valid, x):
    return valid.reshape(valid.shape + (1,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("config", "layout"))
def _adapt(local, text, config, key, valid, opt_state, init, noise, layout, offset):
    chex.assert_rank(local, 3 if layout is None else 4)
    chex.assert_shape(valid, local.shape[:1])
    b = local.shape[0]
    feats, sentences = stacked_sentences(text, config.adapter)
    keys = image_keys(key, b, offset)
    z = jnp.where(_rows(valid, local), local, 1.0)  # padding may hold zeros: keep it finite
    fit = functools.partial(_fit, text_features=feats, sentences=sentences, config=config, layout=layout)

    if not config.carry_moments:
        params, states = jax.vmap(lambda zi, ki, ii, ni: fit(zi, ki, init=ii, noise=ni))(z, keys, init, noise)
        last = opt_state
    else:
        if opt_state is None:
            opt_state = _fresh_opt_state(config, local.shape[-1], sentences)

        def image(state, inp):
            zi, ki, ok, ii, ni = inp
            p, new = fit(zi, ki, opt_state=state, init=ii, noise=ni)
            state = jax.tree.map(lambda n_, o: jnp.where(ok, n_, o), new, state)  # padding: skipped
            return state, (p, state)

        last, (params, states) = jax.lax.scan(image, opt_state, (z, keys, valid, init, noise))
    adapted = jax.vmap(lambda p, zi: apply_adapter(p, zi, sentences, config.adapter))(params, local)
    return jnp.where(_rows(valid, local), adapted, local), params, states, last


def adapt_batch(local, text, config: TTAConfig, valid, state, layout: Optional[TileLayout] = None):
    """AnoCLIP+ over one batch of a category, key(config.seed): (adapted tokens, next state).

    state: `fresh_state(...)` for the first batch, then what the previous batch returned; it carries
    the image index (keys) and, with carry_moments, the AdamW moments (AnoVL's file-order habit)."""
    adapted, _, _, last = _adapt(local, text, config, jax.random.key(config.seed), valid, state["opt"], None,
                                 None, layout, state["index"])
    return adapted, {"index": state["index"] + jnp.sum(valid.astype(jnp.int32)), "opt": last}


def adapt_tokens(local, text, config: TTAConfig, valid=None):
    """Adapted local tokens [B, P, D] with key(config.seed): what AnoCLIP+'s `score` uses."""
    return adapt(local, text, config, jax.random.key(config.seed), valid)[0]


# ------------------------------------------------------------------ orbax
def save_adapter_state(path, params, opt_state, *, overwrite: bool = False) -> Path:
    """Write adapter params and optax state with orbax (opt_state stored as its flat leaves)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    leaves = jax.tree.leaves(opt_state)
    tree = {"params": params, "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree, force=overwrite)
        ckpt.wait_until_finished()
    return path


def load_adapter_state(path, like_params, like_opt_state):
    """(params, opt_state) restored from `save_adapter_state`, structured like the given trees."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    leaves, treedef = jax.tree.flatten(like_opt_state)
    abstract = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))  # noqa: E731
    target = {"params": jax.tree.map(abstract, like_params),
              "opt_state": {f"{i:05d}": abstract(leaf) for i, leaf in enumerate(leaves)}}
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path, target)
    opt_state = jax.tree.unflatten(treedef, [tree["opt_state"][f"{i:05d}"] for i in range(len(leaves))])
    return tree["params"], opt_state


__all__ = ["TTAConfig", "adapt", "adapt_batch", "adapt_tokens", "apply_adapter", "fresh_state", "image_keys",
           "init_adapter",
           "load_adapter_state", "make_optimizer", "save_adapter_state", "stacked_sentences", "tta_loss",
           "tta_step"]
