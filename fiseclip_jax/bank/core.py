"""A reference bank of known-good images and scoring new images against it, one at a time or in any batch.

    bank = build_bank(params, cfg, good_pixels, text, method)                 # leave-one-out normal scores
    det = detect_with_bank(params, cfg, bank, pixels, text, method)           # each image against the bank only
    det, feats = detect_with_bank(..., with_features=True)
    bank = update_bank(bank, feats, gate(bank, feats))                        # gated updates

Two modes (`fiseclip_jax.bank.match`): "exact" keeps up to K images (FIFO), and scoring x against
it is batch scoring of bank ∪ {x} restricted to x; "coreset" keeps M patch features per (r, layer).
Every function is pure and jit-compiled; the bank is a pytree of fixed shapes, so updates never
recompile. What is method-specific (text-keep mask, fusion, RsCIN) lives in the method's `bank_*` hooks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..clip.config import CLIPConfig
from ..errors import FiseclipError
from ..methods import BankRefs, Detection, Method, as_text
from .fingerprint import weights_fingerprint
from .match import coreset_scores, exact_leave_one_out, exact_scores, lnamd_stack, select_memory

MODES = ("exact", "coreset")


@dataclasses.dataclass(frozen=True)
class BankMeta:
    """What a bank was built with (static: part of the pytree's structure, never traced). budget: coreset
    patch features M per (r, layer), 0 in exact mode; coreset_dim: projection used to choose them."""

    mode: str
    method: Method
    clip: CLIPConfig
    size: int
    fingerprint: str
    class_name: str = ""
    weights: str = ""
    budget: int = 0
    coreset_dim: int = 128


@flax.struct.dataclass
class Bank:
    """A reference bank (SPEC §4.2/§4.3 terms), fixed shapes; K slots, image number i sits in slot i % K.

    features: exact [nR, nL, K, P, W] LNAMD(r) matching features per image; coreset [nR, nL, M, W] memory
    allowed:  exact [K, P] patches that may serve as references (FiSeCLIP's text-keep mask);
              coreset [nR, nL, M] memory entries in use
    source:   coreset [nR, nL, M] int32 number of the image each memory entry came from (-1: none); exact [0]
    cls [K, D] CLS embeddings; valid [K] slots holding an image; ids [K] int32 image number per slot (-1)
    calib: {name: [K]} each slot's normal statistics (leave-one-out at build; its score when it joined later)
    count: [] int32 images inserted so far (the FIFO head)
    """

    features: jax.Array
    allowed: jax.Array
    source: jax.Array
    cls: jax.Array
    valid: jax.Array
    ids: jax.Array
    calib: dict
    count: jax.Array
    meta: BankMeta = flax.struct.field(pytree_node=False)

    @property
    def capacity(self) -> int:
        return int(self.valid.shape[0])

    @property
    def refs(self) -> BankRefs:
        return BankRefs(self.cls, self.calib, self.valid)


def check_method(method: Method) -> None:
    if not method.uses_bank:
        raise method.no_bank_error()


# ------------------------------------------------------------------ build
@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _encode(params, cfg, pixels, method):
    return method.encode(params, cfg, pixels)


def encode_in_batches(params, cfg, pixels, method, batch: int = 8) -> dict:
    """`method.encode` over [N, S, S, 3] in padded batches (one compilation) -> numpy features, batch-first."""
    pixels = np.asarray(pixels, np.float32)
    out = []
    for lo in range(0, len(pixels), batch):
        part = pixels[lo:lo + batch]
        pad = batch - len(part)
        if pad:
            part = np.concatenate([part, np.repeat(part[-1:], pad, 0)])
        feats = _encode(params, cfg, jnp.asarray(part), method)
        out.append(jax.tree.map(lambda a: np.asarray(a)[: batch - pad], feats))
    return jax.tree.map(lambda *a: np.concatenate(a), *out)


def default_text(text, cfg: CLIPConfig):
    """TextFeatures, or zeros for a method without text."""
    return as_text(jnp.zeros((2, cfg.embed_dim), jnp.float32) if text is None else text)


def build_bank(params, cfg: CLIPConfig, pixels, text, method: Method, *, capacity: Optional[int] = None,
               mode: str = "exact", budget: Optional[int] = None, coreset_dim: int = 128, class_name: str = "",
               weights: str = "", encode_batch: int = 8) -> Bank:
    """A bank from known-good (or mostly normal) images pixels [N, S, S, 3], CLIP-normalised.

    capacity K: slots (default N; exact mode keeps the last K images); mode "exact" | "coreset";
    budget M: coreset patch features per (r, layer) (default N·P/10, PatchCore's 10 %).
    Each image is scored against the others (leave-one-out) and its normal statistics kept.
    """
    check_method(method)
    feats = encode_in_batches(params, cfg, pixels, method, encode_batch)
    return bank_from_features(feats, text, method, cfg=cfg, size=int(np.shape(pixels)[1]),
                              fingerprint=weights_fingerprint(params), capacity=capacity, mode=mode, budget=budget,
                              coreset_dim=coreset_dim, class_name=class_name, weights=weights)


@functools.partial(jax.jit, static_argnames=("method",))
def _entries(feats, text, valid, method):
    return method.bank_entries(feats, text, valid)


@functools.partial(jax.jit, static_argnames=("r_list",))
def _lnamd(tokens, r_list):
    return lnamd_stack(tokens, r_list)


@functools.partial(jax.jit, static_argnames=("method", "size"))
def _calibrate(entries, patch_scores, num_refs, valid, method, size):
    return method.bank_calibrate(entries, patch_scores, num_refs, valid, size=size)


@functools.partial(jax.jit, static_argnames=("alpha", "chunk_size"))
def _loo_exact(features, allowed, valid, alpha, chunk_size):
    return exact_leave_one_out(features, allowed, valid, alpha=alpha, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _loo_coreset(z, memory, memory_ok, source, ids, chunk_size):
    def one(args):  # one image at a time: memory stays bounded
        zi, idx = args
        s, n = coreset_scores(zi[None], memory, memory_ok, source, idx[None], jnp.full((1,), ids.shape[0] - 1),
                              jnp.ones((1,), bool), chunk_size=chunk_size)
        return s[0], n[0]

    return lax.map(one, (z, ids))


def _slots(values, ids, k, axis=0):
    """`values` [.., n, ..] (images on `axis`) placed in slots ids % k of a zero array with k there."""
    shape = list(values.shape)
    shape[axis] = k
    index = (slice(None),) * axis + (jnp.asarray(ids) % k,)
    return jnp.zeros(shape, values.dtype).at[index].set(values)


def bank_from_features(feats: dict, text, method: Method, *, cfg: CLIPConfig, size: int, fingerprint: str,
                       capacity: Optional[int] = None, mode: str = "exact", budget: Optional[int] = None,
                       coreset_dim: int = 128, class_name: str = "", weights: str = "") -> Bank:
    """`build_bank` from features already encoded (`method.encode`, batch-first; e.g. encoded in batches)."""
    check_method(method)
    if mode not in MODES:
        raise FiseclipError(f"bank mode must be one of {MODES}, got {mode!r}")
    n = int(np.shape(feats["cls"])[0])
    if n < 2:
        raise FiseclipError(f"a reference bank needs at least 2 images (each is scored against the others), got {n}")
    k = int(capacity or n)
    if k < 2:
        raise FiseclipError(f"bank capacity must be at least 2, got {k}")
    opts = method.bank_match_options()
    alpha, chunk, r_list = float(opts["alpha"]), int(opts["chunk_size"]), tuple(opts["r_list"])
    feats = jax.tree.map(jnp.asarray, feats)
    entries = _entries(feats, default_text(text, cfg), jnp.ones(n, bool), method)
    z = _lnamd(entries["tokens"], r_list)  # [n, nR, nL, P, W]
    ids = np.arange(n)
    keep = ids[-k:]  # FIFO: the last K images hold the slots
    valid = _slots(jnp.ones(len(keep), bool), keep, k)
    if mode == "exact":
        entries = {name: _slots(v[keep], keep, k) for name, v in entries.items()}
        features = _slots(jnp.moveaxis(z[keep], 0, 2), keep, k, axis=2)  # [nR, nL, K, P, W]
        allowed, source, m = entries["allowed"], jnp.zeros((0,), jnp.int32), 0
        patch, num_refs = _loo_exact(features, allowed, valid, alpha, chunk)
        calib = _calibrate(entries, patch, num_refs, valid, method, size)
    else:
        p = z.shape[3]
        m = int(budget or max(1, n * p // 10))
        pool = jnp.moveaxis(z, 0, 2).reshape(z.shape[1], z.shape[2], n * p, z.shape[4])  # [nR, nL, n·P, W]
        rl = pool.shape[:2] + (n * p,)
        features, allowed, source = select_memory(pool, jnp.broadcast_to(entries["allowed"].reshape(-1), rl),
                                                  jnp.broadcast_to(jnp.repeat(jnp.asarray(ids, jnp.int32), p), rl),
                                                  m, coreset_dim)
        patch, num_refs = _loo_coreset(z, features, allowed, source, jnp.asarray(ids, jnp.int32), chunk)
        calib = _calibrate(entries, patch, num_refs, jnp.ones(n, bool), method, size)
        calib = {name: _slots(v[keep], keep, k) for name, v in calib.items()}
        entries = {name: _slots(v[keep], keep, k) for name, v in entries.items()}
    meta = BankMeta(mode, method, cfg, int(size), fingerprint, class_name, weights, m, int(coreset_dim))
    return Bank(features=features, allowed=allowed, source=source, cls=entries["cls"], valid=valid,
                ids=_slots(jnp.asarray(keep, jnp.int32) + 1, keep, k) - 1, calib=calib,
                count=jnp.asarray(n, jnp.int32), meta=meta)


# ------------------------------------------------------------------ detect
def check_use(bank: Bank, cfg: CLIPConfig, method: Optional[Method], size: int) -> Method:
    """The method to score with: the bank's own (None), or an equal one; the CLIP config and size must match."""
    meta = bank.meta
    if method is not None and method != meta.method:
        raise FiseclipError(f"the bank was built with {meta.method} and cannot score with {method}: pass the "
                            "bank's own method (method=None) or build another bank")
    if cfg != meta.clip:
        raise FiseclipError(f"the bank was built with CLIP {meta.clip.name} ({meta.clip.act}), not {cfg.name} "
                            f"({cfg.act}): load the bank's weights or build another bank")
    if size != meta.size:
        raise FiseclipError(f"the bank was built at size {meta.size}, the images are {size}x{size}: preprocess "
                            f"them to {meta.size} or build another bank")
    return meta.method


def _match(bank: Bank, z, valid, opts):
    if bank.meta.mode == "exact":
        return exact_scores(z, bank.features, bank.allowed, bank.valid, valid, alpha=float(opts["alpha"]),
                            chunk_size=int(opts["chunk_size"]))
    b = z.shape[0]
    return coreset_scores(z, bank.features, bank.allowed, bank.source, jnp.full((b,), -1, jnp.int32),
                          jnp.full((b,), bank.count), valid, chunk_size=int(opts["chunk_size"]))


@functools.partial(jax.jit, static_argnames=("cfg", "method", "with_features"))
def _detect_with_bank(params, cfg, bank, pixels, text, valid, method, with_features):
    chex.assert_rank(pixels, 4)
    chex.assert_shape(valid, pixels.shape[:1])
    opts = method.bank_match_options()
    r_list, size = tuple(opts["r_list"]), pixels.shape[1]

    def one(args):  # one image at a time: its result cannot depend on its batch-mates or their order
        px, ok = args
        ok = ok[None]
        entries = method.bank_entries(method.encode(params, cfg, px[None]), text, ok)
        z = lnamd_stack(entries["tokens"], r_list)
        patch, num_refs = _match(bank, z, ok, opts)
        det, stats = method.bank_score(entries, patch, num_refs, bank.refs, ok, size=size)
        new = {"features": z, "allowed": entries["allowed"], "cls": entries["cls"], "calib": stats} \
            if with_features else {}
        return jax.tree.map(lambda a: a[0], (det, new))

    det, new = lax.map(one, (pixels, valid))
    return Detection(*det), new


def detect_with_bank(params, cfg: CLIPConfig, bank: Bank, pixels, text, method: Optional[Method] = None,
                     valid=None, *, with_features: bool = False):
    """New images pixels [B, S, S, 3] each scored against the bank only -> Detection (and, with_features,
    their bank entries {"features", "allowed", "cls", "calib"} for `gate` / `update_bank`).

    Images are processed one after another inside one compiled call, so an image's result never
    depends on its batch-mates or their order. method: the bank's (None) or an equal one; text: the
    class's TextFeatures ([2, D]; None for a method without text). Compiled once per batch shape.
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    method = check_use(bank, cfg, method, int(pixels.shape[1]))
    valid = jnp.ones(pixels.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
    det, new = _detect_with_bank(params, cfg, bank, pixels, default_text(text, cfg), valid, method, with_features)
    return (det, new) if with_features else det


# ------------------------------------------------------------------ decisions and updates
def masked_quantile(x, ok, q):
    """Quantile q of the ok entries of x [K], linear interpolation (numpy's default); NaN when none is ok."""
    n = jnp.sum(ok)
    s = jnp.sort(jnp.where(ok, x, jnp.inf))
    pos = q * (n - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo
    value = s[jnp.clip(lo, 0)] * (1.0 - frac) + s[hi] * frac
    return jnp.where(n > 0, value, jnp.nan)


def bank_threshold(bank: Bank, fpr: float = 0.01) -> float:
    """Decision threshold: the (1 − fpr) quantile of the bank's normal scores, the score above which a share
    `fpr` of known-good images would be called anomalous. An image is anomalous when its score exceeds it."""
    if not 0.0 <= fpr <= 1.0:
        raise FiseclipError(f"--fpr must be between 0 and 1, got {fpr}")
    return float(masked_quantile(bank.calib["score"], bank.valid, 1.0 - fpr))


@jax.jit
def gate(bank: Bank, feats: dict, quantile=0.5, valid=None):
    """[B] bool: which scored images may join the bank (gated updates, after TSMR's confidence gate).

    An image joins only if each of the method's gate statistics (`bank_gate_keys`: its score, and for
    a method with text its CLS text score, i.e. the text branch agrees) is at most the `quantile`
    of the bank's normal values: it must look more normal than most known-good images.
    """
    keys = bank.meta.method.bank_gate_keys
    b = feats["calib"][keys[0]].shape[0]
    accept = jnp.ones(b, bool) if valid is None else jnp.asarray(valid, bool)
    for key in keys:
        accept = accept & (feats["calib"][key] <= masked_quantile(bank.calib[key], bank.valid, quantile))
    return accept


@jax.jit
def update_bank(bank: Bank, feats: dict, accept) -> Bank:
    """Images with accept [B] True join the bank, in batch order: exact mode writes them into the oldest
    slots (FIFO), coreset mode merges their patches into the memory (greedy k-center over memory ∪ new
    patches) and keeps their CLS and statistics FIFO. feats: `detect_with_bank(..., with_features=True)`'s."""
    accept = jnp.asarray(accept, bool)
    chex.assert_shape(accept, feats["cls"].shape[:1])
    k = bank.valid.shape[0]
    ring = {"cls": bank.cls, "calib": bank.calib}
    new = {"cls": feats["cls"], "calib": {name: feats["calib"][name] for name in bank.calib}}
    exact = bank.meta.mode == "exact"
    if exact:
        ring["allowed"], new["allowed"] = bank.allowed, feats["allowed"]
    fresh = feats["features"] if exact else jnp.zeros(accept.shape)  # exact: [B, nR, nL, P, W]

    def insert(carry, x):
        ring, features, ids, valid, count = carry
        item, f, ok = x
        slot = count % k
        ring = jax.tree.map(lambda a, v: a.at[slot].set(jnp.where(ok, v, a[slot])), ring, item)
        if exact:  # features keep their slots on axis 2
            old = lax.dynamic_index_in_dim(features, slot, axis=2, keepdims=False)
            features = lax.dynamic_update_index_in_dim(features, jnp.where(ok, f, old), slot, axis=2)
        ids = ids.at[slot].set(jnp.where(ok, count, ids[slot]))
        valid = valid.at[slot].set(valid[slot] | ok)
        return (ring, features, ids, valid, count + ok.astype(jnp.int32)), count

    carry = (ring, bank.features, bank.ids, bank.valid, bank.count)
    (ring, features, ids, valid, count), new_ids = lax.scan(insert, carry, (new, fresh, accept))
    out = dict(cls=ring["cls"], calib=ring["calib"], ids=ids, valid=valid, count=count)
    if exact:
        return bank.replace(features=features, allowed=ring["allowed"], **out)
    b, n_r, n_l, p, w = feats["features"].shape
    fresh = jnp.moveaxis(feats["features"], 0, 2).reshape(n_r, n_l, b * p, w)
    pool = jnp.concatenate([bank.features, fresh], axis=2)
    fresh_ok = jnp.broadcast_to((feats["allowed"] & accept[:, None]).reshape(-1), (n_r, n_l, b * p))
    pool_ok = jnp.concatenate([bank.allowed, fresh_ok], axis=2)
    pool_src = jnp.concatenate([bank.source, jnp.broadcast_to(jnp.repeat(new_ids, p), (n_r, n_l, b * p))], axis=2)
    m = bank.features.shape[2]
    memory = lax.cond(jnp.any(accept), lambda: select_memory(pool, pool_ok, pool_src, m, bank.meta.coreset_dim),
                      lambda: (bank.features, bank.allowed, bank.source))
    return bank.replace(features=memory[0], allowed=memory[1], source=memory[2], **out)
