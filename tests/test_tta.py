"""AnoCLIP+ test-time adapter (SPEC §4.5): loss, gradient and AdamW against PyTorch; vmap-parallel
adaptation against a one-image-at-a-time Python loop; carried moments; padding; orbax; detect/CLI."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax import AnoCLIPConfig, detect, get_config, init_clip, text_features_full
from fiseclip_jax.prompts import TextFeatures
from fiseclip_jax.methods.tta import (TTAConfig, adapt, adapt_batch, adapt_tokens, fresh_state, init_adapter,
                              load_adapter_state, make_optimizer, save_adapter_state, tta_loss, tta_step)
from fiseclip_jax.tiles import TileLayout

P, D, M = 9, 16, 6  # patches, embedding dim, sentences per side
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "bottle"


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def text_feats(seed=1):
    rng = np.random.default_rng(seed)
    f = lambda n: jnp.asarray(unit(rng.normal(size=(n, D))), jnp.float32)  # noqa: E731
    return TextFeatures(f(2), f(M), f(M))


def tokens(b, seed=0, scale=3.0):
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=(b, P, D)), jnp.float32)


def sentences(text):
    return jnp.concatenate([text.normal_sentences, text.abnormal_sentences])


# ------------------------------------------------------------------ torch oracle
def torch_loss(w, b, z, noisy, text_features, T, kind, hard_weight):
    """The formulas of AnoVL's TextAdapter/Adapter forward and `loss_func`, re-written in torch."""
    import torch

    def probs(x):
        xn = x / x.norm(dim=-1, keepdim=True)
        h = torch.nn.functional.linear(xn, w, b)
        if kind == "text":
            h = torch.nn.functional.linear(torch.tanh(h), T.t())
        x = 0.5 * x + 0.5 * h
        x = x / x.norm(dim=-1, keepdim=True)
        return (x @ text_features.t()).softmax(dim=-1)

    pred = torch.stack([probs(z), probs(noisy)])  # [clean, noisy] x [P, 2]
    soft = (-pred[0] * pred[0].log()).sum(-1).mean()
    mask = torch.zeros(pred[1:].shape, dtype=pred.dtype)
    mask[..., 1] = 1  # noisy copies labelled abnormal, clean normal, on every patch
    hard = (-mask * pred[1:].log() - (1 - mask) * pred[0].log()).sum(-1).mean()
    return soft + hard_weight * hard


def _t(x, dtype):
    import torch

    return torch.tensor(np.asarray(x), dtype=dtype)


@pytest.mark.parametrize("kind", ["text", "linear"])
def test_loss_and_gradient_match_torch(kind):
    torch = pytest.importorskip("torch")
    text = text_feats()
    T = sentences(text)
    config = TTAConfig(adapter=kind, hard_weight=0.7)
    params = init_adapter(jax.random.key(3), kind, D, 2 * M)
    z = tokens(1)[0]
    noisy = z + 0.3 * jax.random.normal(jax.random.key(4), z.shape)
    loss, grads = jax.jit(jax.value_and_grad(tta_loss), static_argnames="config")(
        params, z, noisy, text.features, T if kind == "text" else None, config)

    w = _t(params["w"], torch.float64).requires_grad_()
    b = _t(params["b"], torch.float64).requires_grad_()
    ref = torch_loss(w, b, _t(z, torch.float64), _t(noisy, torch.float64), _t(text.features, torch.float64),
                     _t(T, torch.float64), kind, 0.7)
    ref.backward()
    np.testing.assert_allclose(float(loss), ref.item(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(grads["w"], w.grad.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(grads["b"], b.grad.numpy(), rtol=0, atol=1e-5)
    assert np.abs(w.grad.numpy()).max() > 1e-3  # a gradient worth comparing


@pytest.mark.parametrize("config", [TTAConfig(), TTAConfig(adapter="linear", lr=1e-2, betas=(0.8, 0.99),
                                                           weight_decay=0.1, eps=1e-3, noise_sigma=0.3)])
def test_tta_step_equals_torch_adamw(config):
    """Three `tta_step`s (the library's optax AdamW) against torch.optim.AdamW on the same noisy copies:
    lr, betas, eps and decoupled weight decay map one to one."""
    torch = pytest.importorskip("torch")
    text = text_feats()
    T = sentences(text) if config.adapter == "text" else None
    params = p0 = init_adapter(jax.random.key(5), config.adapter, D, 2 * M)
    z = tokens(1, seed=6)[0]
    keys = jax.random.split(jax.random.key(7), 3)
    state = make_optimizer(config).init(params)
    step = jax.jit(tta_step, static_argnames="config")
    for k in keys:
        params, state, _ = step(params, state, z, k, text.features, T, config)

    w = _t(p0["w"], torch.float32).requires_grad_()
    b = _t(p0["b"], torch.float32).requires_grad_()
    opt = torch.optim.AdamW([w, b], lr=config.lr, betas=config.betas, eps=config.eps,
                            weight_decay=config.weight_decay)
    Tt = None if T is None else _t(T, torch.float32)
    for k in keys:  # the noise tta_step draws from k
        noisy = z + config.noise_sigma * jax.random.normal(k, z.shape)
        opt.zero_grad()
        torch_loss(w, b, _t(z, torch.float32), _t(noisy, torch.float32), _t(text.features, torch.float32), Tt,
                   config.adapter, config.hard_weight).backward()
        opt.step()
    np.testing.assert_allclose(params["w"], w.detach().numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(params["b"], b.detach().numpy(), rtol=0, atol=2e-6)
    assert np.abs(np.asarray(params["w"]) - np.asarray(p0["w"])).max() > 0.5 * config.lr  # it moved


# ------------------------------------------------------------------ sequential oracle
def torch_adapter(w, b, z, T, kind):
    """SPEC §4.5 adapter in torch: z' = ½z + ½ adapter(z)."""
    import torch

    h = torch.nn.functional.linear(z / z.norm(dim=-1, keepdim=True), w, b)
    if kind == "text":
        h = torch.tanh(h) @ T
    return 0.5 * z + 0.5 * h


def loop_adapt(local, text, config, key, valid=None, carry=False, state=None):
    """One image at a time in torch, from SPEC §4.5 alone: the documented key schedule (per image i,
    (k_init, k_noise) = split(fold_in(key, i)); the initial adapter is `init_adapter(k_init)`, step j
    adds σ·N(0, 1) drawn from the j-th of split(k_noise, steps)), the loss `torch_loss` with torch
    autograd, and AdamW written out from its formula; moments fresh per image or, with carry, carried
    from image to image (step count included), starting from `state`. Nothing of ours runs but the
    initial draw. Returns the adapted tokens and, per real image, the AdamW state {"t", "m", "v"}."""
    torch = pytest.importorskip("torch")

    T = sentences(text) if config.adapter == "text" else None
    Tt = None if T is None else _t(T, torch.float32)
    ft = _t(text.features, torch.float32)
    b1, b2 = config.betas
    valid = np.ones(len(local), bool) if valid is None else valid
    out, states = [], []
    for i, z in enumerate(local):
        if not valid[i]:
            out.append(np.asarray(z))
            continue
        k_init, k_noise = jax.random.split(jax.random.fold_in(key, i))
        p0 = init_adapter(k_init, config.adapter, D, 2 * M)
        params = {n: _t(p0[n], torch.float32) for n in ("w", "b")}
        if state is None or not carry:
            state = {"t": 0, "m": {n: torch.zeros_like(p) for n, p in params.items()},
                     "v": {n: torch.zeros_like(p) for n, p in params.items()}}
        zt = _t(z, torch.float32)
        for k in jax.random.split(k_noise, config.steps):
            noisy = zt + config.noise_sigma * _t(jax.random.normal(k, z.shape), torch.float32)
            w, b = (params[n].clone().requires_grad_() for n in ("w", "b"))
            torch_loss(w, b, zt, noisy, ft, Tt, config.adapter, config.hard_weight).backward()
            t = state["t"] + 1
            m, v = {}, {}
            with torch.no_grad():
                for n, g in (("w", w.grad), ("b", b.grad)):
                    m[n] = b1 * state["m"][n] + (1 - b1) * g
                    v[n] = b2 * state["v"][n] + (1 - b2) * g * g
                    m_hat, v_hat = m[n] / (1 - b1 ** t), v[n] / (1 - b2 ** t)
                    params[n] = params[n] * (1 - config.lr * config.weight_decay) \
                        - config.lr * m_hat / (v_hat.sqrt() + config.eps)
            state = {"t": t, "m": m, "v": v}
        with torch.no_grad():
            out.append(torch_adapter(params["w"], params["b"], zt, Tt, config.adapter).numpy())
        states.append(state)
    return np.stack(out), states


@pytest.mark.parametrize("kind", ["text", "linear"])
def test_vmap_parallel_equals_one_image_at_a_time(kind):
    text, local, key = text_feats(), tokens(4, seed=8), jax.random.key(11)
    config = TTAConfig(adapter=kind)
    adapted, params, states = adapt(local, text, config, key)
    ref, ref_states = loop_adapt(local, text, config, key)
    np.testing.assert_allclose(adapted, ref, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(local)).max() > 0.1  # the adapter did something
    np.testing.assert_array_equal(states[0].count, [config.steps] * 4)  # one fresh optimizer each
    np.testing.assert_allclose(states[0].mu["w"][2], ref_states[2]["m"]["w"], rtol=0, atol=1e-6)


def test_carry_moments_equals_sequential_loop_and_skips_padding():
    text, key = text_feats(), jax.random.key(12)
    local = tokens(4, seed=9).at[1].set(0.0)  # image 1 is zero padding
    valid = np.array([True, False, True, True])
    config = TTAConfig(carry_moments=True)
    adapted, _, states = adapt(local, text, config, key, valid=valid)
    ref, ref_states = loop_adapt(local, text, config, key, valid=valid, carry=True)
    np.testing.assert_allclose(adapted, ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(adapted[1], local[1])  # padding comes back unchanged
    np.testing.assert_array_equal(states[0].count, [5, 5, 10, 15])  # the step count carries, padding skipped
    np.testing.assert_allclose(states[0].nu["w"][-1], ref_states[-1]["v"]["w"], rtol=0, atol=1e-7)
    assert ref_states[-1]["t"] == 15
    fresh, _, _ = adapt(local, text, TTAConfig(), key, valid=valid)
    np.testing.assert_allclose(adapted[0], fresh[0], rtol=0, atol=1e-6)  # first image: nothing carried yet
    assert np.abs(np.asarray(adapted[3]) - np.asarray(fresh[3])).max() > 1e-5  # later ones: moments carried


def test_carry_moments_across_batches():
    """The last state of one batch passed into the next continues the sequence (AnoVL: one AdamW per class)."""
    text, key, config = text_feats(), jax.random.key(17), TTAConfig(carry_moments=True)
    local = tokens(4, seed=18)
    _, _, first = adapt(local[:2], text, config, key)
    carried = jax.tree.map(lambda x: x[-1], first)
    second, _, states = adapt(local[2:], text, config, key, opt_state=carried)
    _, ref_first = loop_adapt(local[:2], text, config, key, carry=True)
    ref, _ = loop_adapt(local[2:], text, config, key, carry=True, state=ref_first[-1])
    np.testing.assert_allclose(second, ref, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(states[0].count, [15, 20])


@pytest.mark.parametrize("carry", [False, True])
def test_padding_does_not_change_real_images(carry):
    text, key, config = text_feats(), jax.random.key(13), TTAConfig(carry_moments=carry)
    real = tokens(2, seed=10)
    padded = jnp.concatenate([real, jnp.zeros((1, P, D)), 1e3 * tokens(1, seed=11)])
    a, _, sa = adapt(real, text, config, key)
    b, _, sb = adapt(padded, text, config, key, valid=np.array([True, True, False, False]))
    np.testing.assert_allclose(b[:2], a, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(b[2:], padded[2:])
    assert np.isfinite(np.asarray(b)).all()
    if carry:  # the state to carry on is unchanged by trailing padding
        for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
            np.testing.assert_allclose(x[-1], y[-1], rtol=0, atol=1e-7)


def test_five_steps_lower_the_loss():
    text, key = text_feats(), jax.random.key(14)
    config = TTAConfig()
    local = tokens(4, seed=12)
    _, params, _ = adapt(local, text, config, key)
    T = sentences(text)
    for i, z in enumerate(local):
        k_init, _ = jax.random.split(jax.random.fold_in(key, i))
        before = init_adapter(k_init, "text", D, 2 * M)
        after = jax.tree.map(lambda x: x[i], params)
        for k in jax.random.split(jax.random.key(99), 3):  # the same noisy copies for both
            noisy = z + config.noise_sigma * jax.random.normal(k, z.shape)
            l0 = float(tta_loss(before, z, noisy, text.features, T, config))
            l1 = float(tta_loss(after, z, noisy, text.features, T, config))
            assert l1 < l0 - 1e-6, (i, l0, l1)  # τ = 1 keeps P near ½: small but real steps


def test_deterministic_for_a_key_and_seed():
    text, local, config = text_feats(), tokens(2, seed=15), TTAConfig()
    a = adapt(local, text, config, jax.random.key(1))[0]
    np.testing.assert_array_equal(a, adapt(local, text, config, jax.random.key(1))[0])
    assert np.abs(np.asarray(a) - np.asarray(adapt(local, text, config, jax.random.key(2))[0])).max() > 1e-4
    np.testing.assert_array_equal(adapt_tokens(local, text, config), adapt(local, text, config, jax.random.key(0))[0])


def test_orbax_round_trip_is_exact(tmp_path):
    text, config = text_feats(), TTAConfig(carry_moments=True)
    _, params, states = adapt(tokens(4, seed=16), text, config, jax.random.key(3))
    save_adapter_state(tmp_path / "tta", params, states)
    like_p = jax.tree.map(jnp.zeros_like, params)
    like_s = jax.tree.map(jnp.zeros_like, states)
    p2, s2 = load_adapter_state(tmp_path / "tta", like_p, like_s)
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    assert jax.tree.structure(s2) == jax.tree.structure(states)
    for x, y in zip(jax.tree.leaves((params, states)), jax.tree.leaves((p2, s2))):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(x, y)


def test_config_is_hashable_and_validated():
    a, b = AnoCLIPConfig(tta=TTAConfig(betas=[0.9, 0.99])), AnoCLIPConfig(tta=TTAConfig(betas=(0.9, 0.99)))
    assert a == b and hash(a) == hash(b)  # a list of betas becomes a tuple: still a static jit argument
    with pytest.raises(ValueError, match="adapter"):
        TTAConfig(adapter="mlp")


def test_init_adapter_shapes_and_bounds_down_to_one_row():
    """torch.nn.Linear's default init, U(-1/sqrt(dim), 1/sqrt(dim)): text adapter [n_sentences, dim] (one
    sentence is enough), linear adapter [dim, dim] (dim 1 too); no sentence is an error."""
    for kind, dim, n, rows in (("text", 4, 1, 1), ("text", D, 2 * M, 2 * M), ("linear", 1, 0, 1), ("linear", D, 0, D)):
        a = init_adapter(jax.random.key(rows), kind, dim, n)
        assert a["w"].shape == (rows, dim) and a["b"].shape == (rows,), (kind, dim, n)
        for x in (a["w"], a["b"]):
            assert np.abs(np.asarray(x)).max() <= 1 / np.sqrt(dim)
    big = np.asarray(init_adapter(jax.random.key(0), "linear", 64)["w"])  # 4096 draws fill the range
    assert 0.95 / 8 < np.abs(big).max() <= 1 / 8 and abs(big.mean()) < 0.01
    with pytest.raises(ValueError, match="n_sentences > 0"):
        init_adapter(jax.random.key(0), "text", 4, 0)


def test_text_adapter_needs_sentences_on_both_sides():
    text = text_feats()
    for normal, abnormal in ((text.normal_sentences[:0], text.abnormal_sentences),
                             (text.normal_sentences, text.abnormal_sentences[:0])):
        with pytest.raises(ValueError, match="text_features_full"):
            adapt(tokens(2), TextFeatures(text.features, normal, abnormal), TTAConfig(), jax.random.key(0))


@pytest.mark.parametrize("carry", [False, True])
def test_fresh_state_starts_at_image_0_with_empty_moments(carry):
    """fresh_state: the next image's index is the integer 0; with carry_moments, AdamW's state for the text
    adapter's shapes ([2M, D] and [2M]: optax.adamw's own init), zero moments, count 0; adapt_batch counts the
    real images only."""
    import optax

    text = text_feats()
    config = TTAConfig(carry_moments=carry)
    state = fresh_state(text, config, D)
    assert state["index"].dtype == jnp.int32 and int(state["index"]) == 0
    if carry:
        want = optax.adamw(1e-3).init({"w": jnp.zeros((2 * M, D)), "b": jnp.zeros(2 * M)})
        assert jax.tree.structure(state["opt"]) == jax.tree.structure(want)
        for got, ref in zip(jax.tree.leaves(state["opt"]), jax.tree.leaves(want)):
            assert got.shape == ref.shape
            np.testing.assert_array_equal(got, 0)
    else:
        assert state["opt"] is None
    _, after = adapt_batch(tokens(3, seed=19), text, config, jnp.asarray([True, True, False]), state)
    assert after["index"].dtype == jnp.int32 and int(after["index"]) == 2


def test_adapt_tokens_leaves_padding_unchanged():
    """adapt_tokens with valid: the padding image comes back as it was, the real ones as without padding."""
    text, config = text_feats(), TTAConfig()
    local = tokens(3, seed=20)
    got = adapt_tokens(local, text, config, valid=np.array([True, True, False]))
    np.testing.assert_array_equal(got[2], local[2])
    np.testing.assert_allclose(got[:2], adapt_tokens(local[:2], text, config), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(got[:2]) - np.asarray(local[:2])).max() > 0.1


def test_tiled_images_draw_one_linear_adapter_of_the_token_dim():
    """VisA tiles (local [B, 2 tiles, P, D], a layout): without given draws, each image gets one linear adapter
    W [D, D], b [D] shared by its two tiles."""
    g = 3
    local = jnp.asarray(3.0 * np.random.default_rng(21).normal(size=(2, 2, g * g, D)), jnp.float32)
    adapted, params, _ = adapt(local, text_feats(), TTAConfig(adapter="linear"), jax.random.key(5),
                               layout=TileLayout(12, 18))
    assert params["w"].shape == (2, D, D) and params["b"].shape == (2, D)
    assert adapted.shape == local.shape and np.isfinite(np.asarray(adapted)).all()
    assert np.abs(np.asarray(adapted) - np.asarray(local)).max() > 0.1


# ------------------------------------------------------------------ detect and CLI
@pytest.fixture(scope="module")
def tiny_anoclip():
    cfg = get_config("tiny")
    params = init_clip(cfg, jax.random.key(0))
    from fiseclip_jax.clip.preprocess import preprocess

    rng = np.random.default_rng(0)
    # 8 images: the CLI's batch, so its run reuses this compilation of `detect`
    px = jnp.asarray(preprocess([(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(8)], 32))
    return params, cfg, px, text_features_full(params, cfg, "bottle", "anoclip")


def test_detect_anoclip_plus(tiny_anoclip):
    """detect(AnoCLIPConfig(tta=...)) = AnoCLIP's map (numpy oracle) of the adapted tokens; the image
    score stays AnoCLIP's (SPEC §4.5 "Image score unchanged")."""
    from method_oracles import np_anoclip

    params, cfg, px, text = tiny_anoclip
    assert text.normal_sentences.shape[0] == text.abnormal_sentences.shape[0] == 462
    config = AnoCLIPConfig(tta=TTAConfig())
    plus = detect(params, cfg, px, text, config)
    feats = jax.jit(config.encode, static_argnames=("cfg",))(params, cfg, px)
    adapted = adapt_tokens(feats["local"], text, config.tta)
    t, cls = np.asarray(text.features), np.asarray(feats["cls"])
    plain_scores, plain_maps = np_anoclip(np.asarray(feats["local"]), cls, t, 32, config)
    _, plus_maps = np_anoclip(np.asarray(adapted), cls, t, 32, config)
    np.testing.assert_allclose(plus.image_scores, plain_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plus.anomaly_maps, plus_maps, rtol=0, atol=1e-6)
    assert np.abs(plus_maps - plain_maps).max() > 1e-5  # adaptation changed the map


def test_text_adapter_needs_sentence_features(tiny_anoclip):
    params, cfg, px, text = tiny_anoclip
    with pytest.raises(ValueError, match="text_features_full"):
        detect(params, cfg, px, text.features, AnoCLIPConfig(tta=TTAConfig()))
    with pytest.raises(ValueError, match="text_features_full"):
        adapt(tokens(4), TextFeatures(text.features, text.normal_sentences[:0], text.abnormal_sentences[:0]),
              TTAConfig(), jax.random.key(0))
    # the linear adapter needs no sentences: a bare [2, D] array gives what TextFeatures give
    small = text_feats()
    linear = TTAConfig(adapter="linear")
    np.testing.assert_array_equal(adapt(tokens(4), small.features, linear, jax.random.key(0))[0],
                                  adapt(tokens(4), small, linear, jax.random.key(0))[0])


def test_cli_anoclip_plus(tmp_path, monkeypatch, tiny_anoclip):
    from fiseclip_jax.cli import main

    # random:tiny with seed 0 is init_clip(tiny, key(0)): reuse the fixture's (slow to draw on CPU)
    monkeypatch.setattr("fiseclip_jax.clip.checkpoint.init_clip", lambda cfg, key: tiny_anoclip[0])
    out = tmp_path / "out"
    assert main(["detect", str(EXAMPLES), "--method", "anoclip+", "--weights", "random:tiny", "--size", "32",
                 "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "anoclip+" and run["config"]["tta"]["steps"] == 5
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    assert len(rows) == 10 and all(np.isfinite(float(r.split(",")[1])) for r in rows)
