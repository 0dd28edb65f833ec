"""AnoCLIP+ as the authors run it (SPEC §4.5, §8; hq-deng/AnoVL vl_test.py and vis_test.py).

The adapter's initial weights and noise are drawn here with torch and given to `adapt` explicitly; a torch
re-implementation of the authors' adaptation loop, written in this file (five AdamW steps per image, one
AdamW per class, sentences in the authors' template-major order, VisA's two tiles with the loss on the
recovered pixel map), is fed the same draws, and both must agree to 1e-5. The class also carries AdamW's
moments through a whole category in file order, whatever the batch size.
"""

import jax
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.clip.modeling import encode_text
from fiseclip_jax.clip.tokenizer import tokenize
from fiseclip_jax.methods.tta import adapt
from fiseclip_jax.prompts import ANOCLIP_OBJECT
from fiseclip_jax.tiles import TileLayout, prepare_tiled

torch = pytest.importorskip("torch")
F = torch.nn.functional

S, STEPS = 32, 5


@pytest.fixture(scope="module")
def tiny():
    cfg = fj.get_config("tiny")
    return fj.init_clip(cfg, jax.random.key(0)), cfg


def t32(x):
    return torch.tensor(np.asarray(x), dtype=torch.float32)


# ------------------------------------------------------------------ the authors' loop, re-written in torch
def loss_func(pred):
    """pred [1 + noisy copies, ..., 2] probabilities: entropy of the clean copy + ½ (noisy -> abnormal,
    clean -> normal), as AnoVL's loss_func."""
    soft = (-pred[0] * pred[0].log()).sum(-1).mean()
    label = torch.zeros_like(pred[1:])
    label[..., 1] = 1
    hard = (-label * pred[1:].log() - (1 - label) * pred[0].log()).sum(-1).mean()
    return soft + 0.5 * hard


def adapter_out(x, w, b, sentences):
    """½ x + ½ adapter(x): TextAdapter (tanh, then the sentence matrix) or Adapter (linear)."""
    h = F.linear(x / x.norm(dim=-1, keepdim=True), w, b)
    if sentences is not None:
        h = F.linear(torch.tanh(h), sentences.t())
    return 0.5 * x + 0.5 * h


def recover(x, offset):
    """[2, C, H, S] tile maps -> [C, H, S + offset], averaged where they overlap (AnoVL image_recover)."""
    s = x.shape[-1]
    out = torch.zeros(x.shape[1:-1] + (s + offset,))
    out[..., :offset] = x[0, ..., :offset]
    out[..., offset:s] = (x[0, ..., offset:] + x[1, ..., :s - offset]) / 2
    out[..., s:] = x[1, ..., s - offset:]
    return out


def authors_adapt(images, text, inits, noises, sentences=None, offset=None):
    """One AdamW for the class, the adapter reset per image to its given init, five steps each.

    images: per image its tokens [g, g, D] (MVTec) or its two tiles [2, g, g, D] (VisA, with `offset`).
    Returns per image the adapted tokens (is_test) and the anomaly map the authors compute from them."""
    text = t32(text).t()  # [D, 2]
    w = torch.nn.Parameter(torch.zeros_like(t32(inits[0]["w"])))
    b = torch.nn.Parameter(torch.zeros_like(t32(inits[0]["b"])))
    opt = torch.optim.AdamW([w, b], 1e-3)  # betas (0.9, 0.999), eps 1e-8, weight decay 0.01
    T = None if sentences is None else t32(sentences)
    outs = []
    for tokens, init, noise in zip(images, inits, noises):
        tokens = t32(tokens)
        with torch.no_grad():  # weight_reset, then the given draws
            w.copy_(t32(init["w"]))
            b.copy_(t32(init["b"]))
        for eps in noise:
            x = torch.stack([tokens, tokens + t32(eps)])  # clean, noisy
            x = adapter_out(x, w, b, T)
            cos = (x / x.norm(dim=-1, keepdim=True)) @ text
            if offset is None:  # MVTec: the patch grid
                pred = cos.softmax(-1)
            else:  # VisA: upsample per tile, recover the wide map, then softmax
                cos = cos.reshape((-1,) + cos.shape[2:]).permute(0, 3, 1, 2)  # [4, 2, g, g]
                cos = F.interpolate(cos, size=S, mode="bilinear", align_corners=True)
                pred = torch.stack([recover(cos[:2], offset), recover(cos[2:], offset)])
                pred = pred.permute(0, 2, 3, 1).softmax(-1)
            opt.zero_grad()
            loss_func(pred).backward()
            opt.step()
        with torch.no_grad():
            z = adapter_out(tokens, w, b, T)
            amap = ((z / z.norm(dim=-1, keepdim=True)) @ text).softmax(-1)[..., 1]
            amap = amap.reshape((-1, 1) + amap.shape[-2:])
            amap = F.avg_pool2d(F.pad(amap, (1, 1, 1, 1), "replicate"), 3, stride=1)
            amap = F.interpolate(amap, size=S, mode="bilinear", align_corners=True)
            amap = amap[0, 0] if offset is None else recover(amap, offset)[0]
        outs.append((z.numpy(), amap.numpy()))
    return outs


def torch_draws(n, rows, dim, shape, seed):
    """Per image: nn.Linear(dim, rows)'s default init and five N(0, 0.055²) noise draws, from torch."""
    torch.manual_seed(seed)
    inits, noises = [], []
    for _ in range(n):
        layer = torch.nn.Linear(dim, rows)
        inits.append({"w": layer.weight.detach().numpy().copy(), "b": layer.bias.detach().numpy().copy()})
        noises.append(torch.normal(0.0, 0.055, (STEPS,) + shape).numpy())
    return inits, noises


def assert_tokens_close(ours, theirs):
    """Adapted tokens within 1e-4 of the tokens' scale. Five float32 AdamW steps amplify rounding (each
    step divides by sqrt(v) + eps): torch in float32 itself differs from torch in float64 by up to 1.4e-5
    on tokens of size ~2, and XLA's and torch's float32 reductions differ by a few times that (2.4e-5 of
    the scale seen here after the attention kernel changed the tokens' last bits)."""
    ours = np.asarray(ours)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max(), np.abs(ours - theirs).max()


def stacked(inits, noises):
    return ({k: np.stack([i[k] for i in inits]) for k in ("w", "b")}, np.stack(noises))


# ------------------------------------------------------------------ tests
def test_sentence_rows_follow_the_authors_order(tiny):
    """T's row k is the embedding of the authors' k-th sentence: `for template: for state:`, normal then
    abnormal (AnoVL prompt_ensemble)."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "bottle", "anoclip")
    for states, rows in ((ANOCLIP_OBJECT.normal_states, text.normal_sentences),
                         (ANOCLIP_OBJECT.abnormal_states, text.abnormal_sentences)):
        sentences = []
        for template in ANOCLIP_OBJECT.templates:
            for state in states:
                sentences.append(template.format(state.format("bottle")))
        e = np.asarray(encode_text(params, cfg, tokenize(sentences[:40])))
        np.testing.assert_allclose(rows[:40], e / np.linalg.norm(e, axis=-1, keepdims=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("carry", [False, True])
def test_text_adapter_equals_the_authors_loop(tiny, carry):
    """MVTec (vl_test.py): TextAdapter, loss on the patch grid, 3 images; with carry, one AdamW whose moments
    and step count run on from image to image (the authors' habit)."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "bottle", "anoclip")
    rng = np.random.default_rng(0)
    ims = [(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(3)]
    method = fj.AnoCLIPConfig()
    local = np.asarray(jax.jit(method.encode, static_argnames="cfg")(params, cfg, fj.preprocess(ims, S))["local"])
    g, d = 4, local.shape[-1]
    rows = 2 * text.normal_sentences.shape[0]
    inits, noises = torch_draws(3, rows, d, (g, g, d), seed=1)
    config = fj.TTAConfig(carry_moments=carry)
    init, noise = stacked(inits, noises)
    adapted, _, _ = adapt(local, text, config, jax.random.key(0), init=init,
                          noise=noise.reshape(3, STEPS, g * g, d))
    maps = method.score({"local": adapted, "cls": np.zeros((3, d), np.float32)}, text, np.ones(3, bool),
                        size=S).anomaly_maps
    T = np.concatenate([text.normal_sentences, text.abnormal_sentences])
    if carry:
        ref = authors_adapt(local.reshape(3, g, g, d), text.features, inits, noises, T)
    else:  # a fresh AdamW per image
        ref = [authors_adapt(local[i:i + 1].reshape(1, g, g, d), text.features, inits[i:i + 1], noises[i:i + 1], T)[0]
               for i in range(3)]
    for i, (z, amap) in enumerate(ref):
        assert_tokens_close(adapted[i], z.reshape(g * g, d))
        np.testing.assert_allclose(maps[i], amap, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(adapted) - local).max() > 1e-3  # the adapter moved the tokens


def test_visa_tiles_adapt_one_adapter_on_the_recovered_map(tiny):
    """VisA (vis_test.py): the linear Adapter shared by both tiles of an image, the loss on the upsampled,
    recovered, wide map; the final map recovered from the two adapted tiles."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "candle", "anoclip")
    rng = np.random.default_rng(3)
    ims = [(rng.random((60, 90, 3)) * 255).astype(np.uint8) for _ in range(2)]
    px = np.stack([prepare_tiled(im, S) for im in ims])  # [2, 32, 48, 3]
    method = fj.AnoCLIPConfig(tiles=2)
    feats = jax.jit(method.encode, static_argnames="cfg")(params, cfg, px)
    local = np.asarray(feats["local"])  # [2 images, 2 tiles, P, D]
    g, d = 4, local.shape[-1]
    inits, noises = torch_draws(2, d, d, (2, g, g, d), seed=4)
    config = fj.TTAConfig(adapter="linear", carry_moments=True)
    init, noise = stacked(inits, noises)
    layout = TileLayout(S, 48)
    adapted, _, _ = adapt(local, text, config, jax.random.key(0), init=init,
                          noise=noise.reshape(2, STEPS, 2, g * g, d), layout=layout)
    maps = method.score({"local": adapted, "cls": feats["cls"]}, text, np.ones(2, bool), size=(S, 48)).anomaly_maps
    ref = authors_adapt(local.reshape(2, 2, g, g, d), text.features, inits, noises, offset=16)
    for i, (z, amap) in enumerate(ref):
        assert_tokens_close(adapted[i], z.reshape(2, g * g, d))
        np.testing.assert_allclose(maps[i], amap, rtol=0, atol=1e-5)
    # the pixel-map loss is not the patch-grid loss: adapting each tile on its own grid gives other tokens
    per_grid, _, _ = adapt(local.reshape(4, g * g, d), text, fj.TTAConfig(adapter="linear"), jax.random.key(0),
                           init={k: np.repeat(v, 2, 0) for k, v in init.items()},
                           noise=noise.transpose(0, 2, 1, 3, 4, 5).reshape(4, STEPS, g * g, d))
    assert np.abs(np.asarray(per_grid).reshape(adapted.shape) - np.asarray(adapted)).max() > 1e-6


def test_init_and_noise_functions_of_the_key(tiny):
    """TTAConfig(init_fn=..., noise_fn=...) replace the draws inside `detect`: with zero noise and a given
    init for every image, detect's AnoCLIP+ map is AnoCLIP's map of `adapt` with those arrays."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "bottle", "anoclip")
    rng = np.random.default_rng(5)
    px = fj.preprocess([(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(2)], S)
    d, rows = cfg.embed_dim, 2 * text.normal_sentences.shape[0]
    w0 = rng.uniform(-0.2, 0.2, (rows, d)).astype(np.float32)
    b0 = rng.uniform(-0.2, 0.2, rows).astype(np.float32)
    config = fj.TTAConfig(init_fn=lambda key, kind, dim, n: {"w": w0, "b": b0},
                          noise_fn=lambda key, shape: jax.numpy.zeros(shape))
    det = fj.detect(params, cfg, px, text, fj.AnoCLIPConfig(tta=config))
    plain = fj.AnoCLIPConfig()
    feats = jax.jit(plain.encode, static_argnames="cfg")(params, cfg, px)
    adapted, _, _ = adapt(feats["local"], text, fj.TTAConfig(), jax.random.key(9),
                          init={"w": np.stack([w0, w0]), "b": np.stack([b0, b0])},
                          noise=np.zeros((2, STEPS) + feats["local"].shape[1:], np.float32))
    want = plain.score({"local": adapted, "cls": feats["cls"]}, text, np.ones(2, bool), size=S)
    np.testing.assert_allclose(det.anomaly_maps, want.anomaly_maps, rtol=0, atol=1e-6)


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_category_maps_do_not_depend_on_the_batch_size(tiny):
    """detect_category threads the method's state from batch to batch in file order: the image index (the
    adapter's keys) and, with carry_moments, AdamW's moments. Batches of 1, 3 and 8 give the same maps."""
    params, cfg = tiny
    rng = np.random.default_rng(6)
    ims = [(rng.random((40, 40, 3)) * 255).astype(np.uint8) for _ in range(8)]

    def run(carry, b):
        method = fj.AnoCLIPConfig(tta=fj.TTAConfig(carry_moments=carry))
        return fj.detect_category(params, cfg, ims, "bottle", method, size=S, encode_batch=b, progress=False)

    for carry, sizes in ((True, (1, 3, 8)), (False, (3, 8))):
        runs = [run(carry, b) for b in sizes]
        for other in runs[:-1]:
            np.testing.assert_allclose(other.anomaly_maps, runs[-1].anomaly_maps, rtol=0, atol=1e-6)
            np.testing.assert_allclose(other.image_scores, runs[-1].image_scores, rtol=0, atol=1e-6)
        if carry:
            carried = runs[0]
    # the moments did carry: the first image has nothing to carry yet, the others differ from fresh AdamW
    np.testing.assert_allclose(runs[-1].anomaly_maps[0], carried.anomaly_maps[0], rtol=0, atol=1e-6)
    assert np.abs(runs[-1].anomaly_maps[1:] - carried.anomaly_maps[1:]).max() > 1e-7
