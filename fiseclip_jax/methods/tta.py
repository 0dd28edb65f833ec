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
  the adapter is reset: `carry_moments=True` (default off, SPEC §4.5). Inside `detect` the
  state carries within one batch (in batch order) and starts fresh for the next batch; to
  carry it over a whole category, call `adapt` per batch and pass the last state back in.
- Not reproduced: AnoVL's VisA script adapts one shared adapter on both 240×240 tiles of an
  image and takes the loss on the upsampled, re-assembled map; here every batch element
  adapts on its own patch grid.

Keys: image i of a batch uses k_i = fold_in(key, i); split(k_i) = (init key, noise key);
step s draws its noise from split(noise key, steps)[s]. Keys depend on the index only, so
padding a batch leaves the real images' results unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import chex

from ..errors import FiseclipError
from ..prompts import TextFeatures

ADAPTERS = ("text", "linear")


@dataclasses.dataclass(frozen=True)
class TTAConfig:
    """AnoCLIP+ test-time adaptation (SPEC §4.5). Hashable: a static jit argument via AnoCLIPConfig."""

    steps: int = 5
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    noise_sigma: float = 0.055  # AnoVL: 0.05 * 1.1
    hard_weight: float = 0.5
    adapter: str = "text"  # "text" (MVTec objects and textures) | "linear" (VisA)
    carry_moments: bool = False  # True: AnoVL's one AdamW per class, moments carried across images
    seed: int = 0
    eps: float = 1e-8  # AdamW epsilon (torch's default)

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
        raise ValueError(f"adapter kind must be one of {ADAPTERS}, got {kind!r}")
    out = n_sentences if kind == "text" else dim
    if out <= 0:
        raise ValueError("the text adapter needs n_sentences > 0 (rows of the stacked sentence features)")
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


def _log_probs(z, text_features):
    """[..., D] -> [..., 2] log softmax of the raw cosines with (normal, abnormal), τ = 1."""
    zn = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    t = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
    return jax.nn.log_softmax(zn @ t.T, axis=-1)


def tta_loss(params, z, noisy, text_features, sentences, config: TTAConfig):
    """Scalar loss of one image: z [P, D] clean tokens, noisy [..., P, D] noisy copies,
    text_features [2, D], sentences [2M, D] (None for the linear adapter)."""
    lp0 = _log_probs(apply_adapter(params, z, sentences, config.adapter), text_features)
    lp1 = _log_probs(apply_adapter(params, noisy, sentences, config.adapter), text_features)
    entropy = -jnp.sum(jnp.exp(lp0) * lp0, axis=-1)
    hard = -jnp.mean(lp1[..., 1]) - jnp.mean(lp0[..., 0])  # noisy -> abnormal, clean -> normal
    return jnp.mean(entropy) + config.hard_weight * hard


def tta_step(params, opt_state, z, key, text_features, sentences, config: TTAConfig):
    """One AdamW step on one image, fresh noise from `key`: -> (params, opt_state, loss)."""
    noisy = z + config.noise_sigma * jax.random.normal(key, z.shape, z.dtype)
    loss, grads = jax.value_and_grad(tta_loss)(params, z, noisy, text_features, sentences, config)
    updates, opt_state = make_optimizer(config).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _fit(z, key, text_features, sentences, config, opt_state=None):
    """Fresh adapter for one image [P, D], `steps` AdamW steps -> (params, opt_state)."""
    k_init, k_noise = jax.random.split(key)
    n = 0 if sentences is None else sentences.shape[0]
    params = init_adapter(k_init, config.adapter, z.shape[-1], n)
    if opt_state is None:
        opt_state = make_optimizer(config).init(params)

    def step(carry, k):
        p, s, _ = tta_step(*carry, z, k, text_features, sentences, config)
        return (p, s), None

    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(k_noise, config.steps))
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
        raise ValueError("the AnoCLIP+ text adapter needs per-sentence text features: pass the TextFeatures "
                         "from text_features_full(params, cfg, class_name, 'anoclip') rather than a bare "
                         "[2, D] array (or use TTAConfig(adapter='linear'))")
    return feats, jnp.concatenate([normal, abnormal], axis=0)


def image_keys(key, n: int):
    """[n] per-image keys fold_in(key, i): independent of the batch size (padding-safe)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def adapt(local, text, config: TTAConfig, key, valid=None, opt_state=None):
    """Adapt every image of a batch: local [B, P, D] -> (adapted [B, P, D], params, opt_states).

    Each image gets a freshly initialised adapter. carry_moments=False: each also gets a fresh
    AdamW state and all adapt in parallel under `vmap`; carry_moments=True: one AdamW state is
    carried from image to image in batch order (a `lax.scan`, AnoVL's habit), starting from
    `opt_state` (a state returned for an earlier batch, e.g. `tree.map(lambda x: x[-1], states)`)
    or a fresh one. Returned params and opt_states are per image (leading axis B); with
    carry_moments, opt_states[i] is the state after image i. Images with valid False (padding)
    are not updated, never update the carried state, and come back unchanged. Compiled once
    per (shapes, config).
    """
    local = jnp.asarray(local, jnp.float32)
    valid = jnp.ones(local.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    return _adapt(local, text, config, key, valid, opt_state)


@functools.partial(jax.jit, static_argnames=("config",))
def _adapt(local, text, config, key, valid, opt_state):
    chex.assert_rank(local, 3)
    chex.assert_shape(valid, local.shape[:1])
    b = local.shape[0]
    feats, sentences = stacked_sentences(text, config.adapter)
    keys = image_keys(key, b)
    z = jnp.where(valid[:, None, None], local, 1.0)  # padding may hold zeros: keep it finite

    if not config.carry_moments:
        params, states = jax.vmap(lambda zi, ki: _fit(zi, ki, feats, sentences, config))(z, keys)
    else:
        if opt_state is None:
            n = 0 if sentences is None else sentences.shape[0]
            template = init_adapter(jax.random.key(0), config.adapter, local.shape[-1], n)
            opt_state = make_optimizer(config).init(template)

        def image(state, inp):
            zi, ki, ok = inp
            p, new = _fit(zi, ki, feats, sentences, config, opt_state=state)
            state = jax.tree.map(lambda n_, o: jnp.where(ok, n_, o), new, state)  # padding: skipped
            return state, (p, state)

        _, (params, states) = jax.lax.scan(image, opt_state, (z, keys, valid))
    adapted = jax.vmap(lambda p, zi: apply_adapter(p, zi, sentences, config.adapter))(params, local)
    return jnp.where(valid[:, None, None], adapted, local), params, states


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


__all__ = ["TTAConfig", "adapt", "adapt_tokens", "apply_adapter", "image_keys", "init_adapter",
           "load_adapter_state", "make_optimizer", "save_adapter_state", "stacked_sentences", "tta_loss",
           "tta_step"]
