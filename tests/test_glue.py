"""The glue between the kernels (issue 18), each path against an independent expected value:

- which features each method encodes (blocks, CLS dropped, local mode) against transformers'
  `hidden_states` and a torch walk of SPEC §2 over the HF model's own submodules;
- the default matching blocks of 12- and 24-block towers;
- `detect_category` (batching, padding, masks) against `detect` on each unpadded slice;
- FiSeCLIP end to end (Python and CLI) with references that survive the text filter, against the
  numpy oracle and against the text-only maps;
- AnoCLIP+ end to end (Python and CLI): adaptation moves the maps far beyond the parity tolerance.

Only public entry points are used (a refactor of the method code keeps them).
"""

import csv
import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from clip_reference import hf_model_and_params, random_pixels  # noqa: E402
from method_oracles import np_fiseclip, np_text_alignment  # noqa: E402

from fiseclip_jax import (AnoCLIPConfig, CLIPConfig, FiSeCLIPConfig, MuScConfig, TextConfig, TTAConfig,  # noqa: E402
                          VisionConfig, detect, detect_category, encode_features, load_clip, preprocess,
                          save_clip)
from fiseclip_jax.cli import main  # noqa: E402
from fiseclip_jax.detect import iter_detect  # noqa: E402
from fiseclip_jax.distributed import make_mesh  # noqa: E402
from fiseclip_jax.features import FeatureCache  # noqa: E402
from fiseclip_jax.methods import default_match_layers  # noqa: E402
from fiseclip_jax.prompts import text_features_full  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "bottle"
TOL = 1e-5  # encoder parity tolerance of test_clip_parity / test_local_attention
SIZE = 32  # tiny's native size: 4x4 patches


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """transformers' random tiny CLIP (4 vision blocks, LayerNorms and biases randomised) saved with
    `save_clip`: the directory the CLI tests pass as --weights."""
    _, params, cfg = hf_model_and_params("tiny")
    return save_clip(params, cfg, tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    """(transformers model, params, cfg), the params read back from that checkpoint as the CLI reads
    them: jit keys its cache on whether arrays are committed to a device (loaded ones are), so only
    this way do the Python and CLI runs share their compilations."""
    model, _, _ = hf_model_and_params("tiny")
    params, cfg = load_clip(tiny_checkpoint)
    return model, params, cfg


@pytest.fixture(scope="module")
def examples():
    """The 10 example bottle images (relative path, uint8 [H, W, 3]), in the CLI's order (sorted per folder)."""
    paths = sorted(EXAMPLES.rglob("*.png"))
    return [(str(p.relative_to(EXAMPLES)), np.asarray(Image.open(p).convert("RGB"))) for p in paths]


@pytest.fixture(scope="module")
def example_pixels(examples):
    """The 10 examples CLIP-normalised at SIZE: [10, SIZE, SIZE, 3]. One batch shape for every
    encoder oracle, so their compilations are shared."""
    return preprocess([im for _, im in examples], SIZE)


# ------------------------------------------------------------------ torch oracle of the features
def hf_vision(model, pixels):
    """transformers' tower on NHWC pixels: (hidden_states, CLS embeds [B, D]).

    hidden_states[0] is the ln_pre output, hidden_states[l] the residual stream after block l."""
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.from_numpy(np.asarray(pixels)).permute(0, 3, 1, 2),
                                 output_hidden_states=True, interpolate_pos_encoding=True)
        return out.hidden_states, model.visual_projection(out.pooler_output).numpy()


def hf_attention(layer, u, pair, heads):
    """W_o(softmax(a bᵀ s) v) of one HF CLIP layer for the SPEC §2 pair "qq" or "vv", u = LN1 input."""
    attn = layer.self_attn
    proj = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj}

    def split(x):  # [B, T, W] -> [B, H, T, dh]
        b, t, w = x.shape
        return x.reshape(b, t, heads, w // heads).transpose(1, 2)

    a, b, v = split(proj[pair[0]](u)), split(proj[pair[1]](u)), split(attn.v_proj(u))
    weights = torch.softmax(a @ b.transpose(-1, -2) * a.shape[-1] ** -0.5, dim=-1)
    return attn.out_proj((weights @ v).transpose(1, 2).reshape(u.shape))


def hf_local(model, hidden, mode, n_blocks):
    """SPEC §2 local tokens of the last `n_blocks` blocks, post_layernorm + visual_projection, CLS dropped."""
    layers = model.vision_model.encoder.layers
    heads = model.config.vision_config.num_attention_heads
    first = len(layers) - n_blocks
    x = hidden[first]  # the stream entering the first modified block
    with torch.no_grad():
        for i in range(first, len(layers)):
            if mode == "qq":  # ClearCLIP: residual and FFN removed
                x = hf_attention(layers[i], layers[i].layer_norm1(x), "qq", heads)
            elif mode == "vv":  # dual path: own residual, input is LN1 of the standard stream, no FFN
                x = x + hf_attention(layers[i], layers[i].layer_norm1(hidden[i]), "vv", heads)
            else:
                raise ValueError(mode)
        return model.visual_projection(model.vision_model.post_layernorm(x[:, 1:])).numpy()


def assert_close(got, want, tol=TOL, what=""):
    err = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    assert err <= tol, f"{what}: max |diff| {err:.3g} > {tol:g}"


# (config, matching blocks it must return, local mode, local blocks)
FEATURE_CASES = [
    pytest.param(MuScConfig(), (1, 2, 3, 4), None, 0, id="musc-default"),
    pytest.param(FiSeCLIPConfig(), (1, 2, 3, 4), "qq", 1, id="fiseclip-default"),
    pytest.param(FiSeCLIPConfig(layers=(1, 3), local="vv", local_blocks=2), (1, 3), "vv", 2, id="fiseclip-vv2"),
    pytest.param(AnoCLIPConfig(), None, "vv", 4, id="anoclip-default"),
]


@pytest.mark.parametrize("config,blocks,mode,n_local", FEATURE_CASES)
def test_encoded_features_are_the_methods_blocks_and_local_mode(tiny, example_pixels, config, blocks, mode,
                                                                 n_local):
    """encode_features against transformers: tokens = hidden_states[l][:, 1:] for the method's blocks
    (CLS dropped, default blocks of a 4-block tower = every block), local = SPEC §2 mode of the method
    (FiSeCLIP: qq on the last block; AnoCLIP: vv dual path in all blocks), cls = projected CLS."""
    model, params, cfg = tiny
    hidden, cls = hf_vision(model, example_pixels)
    feats = encode_features(params, cfg, example_pixels, config)
    if blocks is not None:  # AnoCLIP matches nothing
        want = np.stack([hidden[b][:, 1:].numpy() for b in blocks], axis=1)
        assert feats["tokens"].shape == want.shape  # [B, nL, P, W]
        assert_close(feats["tokens"], want, what="matching tokens")
    if mode is not None:
        assert_close(feats["local"], hf_local(model, hidden, mode, n_local), what="local tokens")
    assert_close(feats["cls"], cls, what="CLS embedding")


def test_neighbouring_blocks_and_cls_are_distinguishable(tiny, example_pixels):
    """Guard for the test above: an off-by-one block or a kept CLS row would be far outside TOL."""
    model, _, _ = tiny
    hidden, _ = hf_vision(model, example_pixels)
    for a, b in zip(hidden[:-1], hidden[1:]):
        assert float((a - b).abs().max()) > 1e3 * TOL
    for h in hidden[1:]:
        assert float((h[:, :-1] - h[:, 1:]).abs().max()) > 1e3 * TOL


# ------------------------------------------------------------------ default matching blocks
def test_default_match_layers_of_vit_b_and_vit_l():
    """SPEC §4.2: blocks {3,6,9,12} of a 12-block ViT-B, {6,12,18,24} of a 24-block ViT-L (1-indexed)."""
    assert tuple(default_match_layers(12)) == (3, 6, 9, 12)
    assert tuple(default_match_layers(24)) == (6, 12, 18, 24)


def deep_tower(n_layers):
    """A random transformers CLIPModel with `n_layers` vision blocks of tiny width, and our params."""
    from transformers import CLIPModel

    from fiseclip_jax.clip.params import from_hf_state_dict

    cfg = CLIPConfig(name=f"deep{n_layers}", embed_dim=8,
                     vision=VisionConfig(width=16, layers=n_layers, heads=2, patch_size=8, image_size=16),
                     text=TextConfig(width=16, layers=1, heads=2))
    torch.manual_seed(n_layers)
    model = CLIPModel(cfg.to_hf_config()).eval()
    return model, from_hf_state_dict(model.state_dict(), cfg), cfg


@pytest.mark.parametrize("n_layers,blocks", [(12, (3, 6, 9, 12)), (24, (6, 12, 18, 24))])
def test_default_match_blocks_encode_those_hidden_states(n_layers, blocks):
    """MuScConfig() on a 12- and a 24-block tower matches hidden_states[l][:, 1:] for l in SPEC §4.2's
    blocks (FiSeCLIP takes the same default: its tokens are checked on the tiny tower above)."""
    model, params, cfg = deep_tower(n_layers)
    pixels = random_pixels(2, 16, seed=n_layers)
    hidden, _ = hf_vision(model, pixels)
    for a, b in zip(hidden[:-1], hidden[1:]):  # neighbouring blocks are told apart
        assert float((a - b).abs().max()) > 1e2 * TOL
    want = np.stack([hidden[b][:, 1:].numpy() for b in blocks], axis=1)
    assert_close(encode_features(params, cfg, pixels, MuScConfig())["tokens"], want, what=f"{n_layers} blocks")


# ------------------------------------------------------------------ detect_category = detect per slice
# The FiSeCLIP and AnoCLIP(+) configs are those the CLI builds for `--batch-size 4`, so the CLI tests
# below reuse these compilations.
CLI_FISECLIP = FiSeCLIPConfig(batch_size=4)
CLI_ANOCLIP_PLUS = AnoCLIPConfig(tta=TTAConfig(seed=0))


def scored_slices(config, n, encode_batch):
    """The documented batching: FiSeCLIP scores slices of batch_size, AnoCLIP slices of encode_batch."""
    step = config.batch_size if isinstance(config, FiSeCLIPConfig) else encode_batch
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


@pytest.mark.parametrize("config", [CLI_FISECLIP, AnoCLIPConfig(),
                                    pytest.param(CLI_ANOCLIP_PLUS, marks=pytest.mark.slow)],  # 11 s
                         ids=["fiseclip", "anoclip", "anoclip+"])
def test_detect_category_equals_detect_on_each_unpadded_slice(tiny, examples, config):
    """10 images in batches of 4 (the last one padded from 2 to 4 and masked): every batch's maps,
    scores and reference counts equal `detect` on that slice alone, without padding.

    The whole-category paths (MuSc, FiSeCLIP batch_size 0: encode in batches, score all at once)
    are compared with one `detect` over all images in test_methods::test_detect_category."""
    _, params, cfg = tiny
    images = [im for _, im in examples]
    res = detect_category(params, cfg, images, "bottle", config, size=SIZE, encode_batch=4, progress=False)
    text = text_features_full(params, cfg, "bottle", config.prompts)
    state = config.initial_state(cfg, text)  # AnoCLIP+ keys its draws by the image's index in the category
    for lo, hi in scored_slices(config, len(images), 4):
        det, state = detect(params, cfg, preprocess(images[lo:hi], SIZE), text, config, state=state)
        np.testing.assert_array_equal(res.num_refs[lo:hi], det.num_refs, err_msg=f"num_refs of [{lo}:{hi}]")
        assert_close(res.anomaly_maps[lo:hi], det.anomaly_maps, what=f"maps of [{lo}:{hi}]")
        # FiSeCLIP's image scores are min-max normalised over the batch, which amplifies float32 noise
        # between the padded and the unpadded compilation (test_methods allows 1e-4 for the same reason)
        assert_close(res.image_scores[lo:hi], det.image_scores, tol=1e-4, what=f"scores of [{lo}:{hi}]")
    if isinstance(config, FiSeCLIPConfig):  # matching really ran, so the padding mask matters
        assert (res.num_refs > 0).all()


class RecordingBar:
    """A progress bar as `iter_detect(progress=...)` documents it (tqdm's interface): records what it is told."""

    def __init__(self, total, desc):
        self.total, self.desc, self.done, self.closed = total, desc, 0, False

    def update(self, k):
        self.done += k

    def set_postfix_str(self, s):
        pass

    def close(self):
        self.closed = True


def recording_bars():
    bars = []
    return bars, lambda total, desc: bars.append(RecordingBar(total, desc)) or bars[-1]


def assert_bars_counted(bars, n):
    """Every run opened one bar of total n, advanced it by n images in all (skipped groups included), closed it."""
    assert [(b.total, b.desc, b.done, b.closed) for b in bars] == [(n, "bottle", n, True)] * len(bars)


def test_iter_detect_resumed_groups_restore_the_carried_state(tiny, examples):
    """AnoCLIP+ in groups of 4 with a feature store (a resumed run's MutableMapping): every group's carried
    state is stored under its number; skipping group 0 reads its state back, so group 1 gives what the
    uninterrupted run gave; the progress bar counts the skipped group's images too."""
    _, params, cfg = tiny
    images = [im for _, im in examples][:8]
    store, (bars, progress) = {}, recording_bars()
    run = dict(size=SIZE, encode_batch=4, progress=progress, feature_store=store)
    full = list(iter_detect(params, cfg, images, "bottle", CLI_ANOCLIP_PLUS, **run))
    assert [r.group for r in full] == [0, 1] and sorted(store) == ["state-000000", "state-000001"]
    resumed = list(iter_detect(params, cfg, images, "bottle", CLI_ANOCLIP_PLUS, skip_groups={0}, **run))
    assert [r.group for r in resumed] == [1]
    for a, b in zip(full[1:], resumed):
        np.testing.assert_array_equal(a.indices, b.indices)
        assert_close(b.anomaly_maps, a.anomaly_maps, tol=ANOCLIP_MAP_TOL, what=f"maps of group {a.group}")
    # a method that carries nothing (AnoCLIP) skips a group without any store
    plain = list(iter_detect(params, cfg, images, "bottle", AnoCLIPConfig(), size=SIZE, encode_batch=4,
                             progress=progress, skip_groups={0}))
    assert [r.group for r in plain] == [1]
    np.testing.assert_array_equal(plain[0].indices, np.arange(4, 8))
    assert_bars_counted(bars, len(images))


def test_iter_detect_one_group_smaller_than_encode_batch(tiny, examples):
    """4 images, encode_batch 8: one group of 4 (no padding to 8), equal to `detect` on the 4 images."""
    _, params, cfg = tiny
    images = [im for _, im in examples][:4]
    bars, progress = recording_bars()
    (res,) = iter_detect(params, cfg, images, "bottle", AnoCLIPConfig(), size=SIZE, encode_batch=8,
                         progress=progress)
    text = text_features_full(params, cfg, "bottle", AnoCLIPConfig().prompts)
    det = detect(params, cfg, preprocess(images, SIZE), text, AnoCLIPConfig())
    np.testing.assert_array_equal(res.indices, np.arange(4))
    assert_close(res.anomaly_maps, det.anomaly_maps, what="maps")
    assert_close(res.image_scores, det.image_scores, what="scores")
    assert_bars_counted(bars, 4)


def test_iter_detect_whole_category_store_keeps_each_encode_batch(tiny, examples):
    """MuSc (the whole category at once), 10 images in encode batches of 4, 4, 2: the store keeps each batch's
    features under its own number and does not change the result; a resumed run reads every batch back from
    it and decodes no image (here: paths that do not exist)."""
    _, params, cfg = tiny
    images = [im for _, im in examples]
    config = MuScConfig(r_list=(1,))
    run = dict(size=SIZE, encode_batch=4)
    (plain,) = iter_detect(params, cfg, images, "bottle", config, progress=False, **run)
    store, (bars, progress) = {}, recording_bars()
    (stored,) = iter_detect(params, cfg, images, "bottle", config, feature_store=store, progress=progress, **run)
    assert sorted(store) == ["000000", "000001", "000002"]
    assert [list(store[k]["indices"]) for k in sorted(store)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    missing = [str(EXAMPLES / f"missing-{i}.png") for i in range(len(images))]
    (resumed,) = iter_detect(params, cfg, missing, "bottle", config, feature_store=store, progress=progress, **run)
    for got in (stored, resumed):
        np.testing.assert_array_equal(got.indices, np.arange(10))
        assert_close(got.anomaly_maps, plain.anomaly_maps, what="maps")
        assert_close(got.image_scores, plain.image_scores, what="scores")
    assert_bars_counted(bars, len(images))


def test_detect_category_given_text_unreadable_image_feature_cache_and_one_device_mesh(tiny, examples, tmp_path):
    """detect_category's options reach every image: `text` given (another class's prompts) is the text scored
    against; with skip_errors an unreadable file is reported and left out (a group of unreadable files only
    gives empty arrays); a feature cache and a one-device mesh give the same maps. Reference: `detect` on the
    four readable images with that text."""
    _, params, cfg = tiny
    good = [im for _, im in examples][:4]
    missing = str(EXAMPLES / "missing.png")
    images = good[:2] + [missing] + good[2:] + [missing] * 4  # groups of 4: the third one unreadable only
    method = AnoCLIPConfig()
    cable = text_features_full(params, cfg, "cable", method.prompts)
    want = detect(params, cfg, preprocess(good, SIZE), cable, method)
    bottle = detect(params, cfg, preprocess(good, SIZE), text_features_full(params, cfg, "bottle", method.prompts),
                    method)
    for a, b in ((want.image_scores, bottle.image_scores), (want.anomaly_maps, bottle.anomaly_maps)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() > 10 * TOL  # the text matters (3e-4, 8e-4)
    run = dict(size=SIZE, encode_batch=4, text=cable, progress=False)
    res = detect_category(params, cfg, images, "bottle", method, skip_errors=True, **run)
    assert sorted(res.errors) == [2, 5, 6, 7, 8] and "missing.png" in res.errors[2]
    last = list(iter_detect(params, cfg, images, "bottle", method, skip_errors=True, **run))[-1]
    assert (last.group, last.image_scores.shape, last.num_refs.shape, last.indices.shape) == (2, (0,), (0,), (0,))
    cache = FeatureCache(tmp_path / "cache")
    cached = [detect_category(params, cfg, good, "bottle", method, feature_cache=cache, **run) for _ in range(2)]
    assert (cache.misses, cache.hits) == (4, 4)  # the second run reads every image's features back
    meshed = detect_category(params, cfg, good, "bottle", method, mesh=make_mesh(1), **run)
    for got, what in ((res, "skip_errors"), (cached[0], "cache, 1st"), (cached[1], "cache, 2nd"), (meshed, "mesh")):
        assert_close(got.anomaly_maps, want.anomaly_maps, what=f"maps, {what}")
        assert_close(got.image_scores, want.image_scores, what=f"scores, {what}")


def test_whole_category_on_a_one_device_mesh(tiny, examples):
    """MuSc (the whole category at once) on a one-device mesh: encoded per batch on the mesh, matched on its
    ring; the single-device result."""
    _, params, cfg = tiny
    images = [im for _, im in examples][:6]
    config = MuScConfig(r_list=(1,))
    run = dict(size=SIZE, encode_batch=4, progress=False)
    plain = detect_category(params, cfg, images, "bottle", config, **run)
    meshed = detect_category(params, cfg, images, "bottle", config, mesh=make_mesh(1), **run)
    assert_close(meshed.anomaly_maps, plain.anomaly_maps, what="maps")
    assert_close(meshed.image_scores, plain.image_scores, what="scores")


# ------------------------------------------------------------------ FiSeCLIP end to end
def fiseclip_oracle(feats, text, config, lo, hi):
    """np_fiseclip (SPEC §4.3, float64) on the encoded features of images lo:hi."""
    f = {k: np.asarray(feats[k])[lo:hi] for k in ("tokens", "local", "cls")}
    return np_fiseclip(f["tokens"], f["local"], f["cls"], np.asarray(text), SIZE, config)


def test_fiseclip_end_to_end_references_survive_the_filter(tiny, examples, example_pixels):
    """detect_category(FiSeCLIP) with θ at the median text score, so the filter keeps some patches of
    every image and drops others: every image has references, the result equals the numpy oracle of
    SPEC §4.3 on each batch's encoded features, and the maps differ from the text-only ones (every
    reference filtered) by far more than the tolerance."""
    _, params, cfg = tiny
    text = text_features_full(params, cfg, "bottle", "winclip").features
    feats = encode_features(params, cfg, example_pixels, CLI_FISECLIP)  # per image: slices are batches'
    a_txt = np_text_alignment(np.asarray(feats["local"]), np.asarray(text), CLI_FISECLIP.tau)
    config = dataclasses.replace(CLI_FISECLIP, r_list=(1, 3), theta=float(np.round(np.median(a_txt), 4)))
    kept = a_txt < config.theta
    assert kept.any(axis=1).all() and not kept.all(axis=1).any()  # the filter acts, references remain
    res = detect_category(params, cfg, [im for _, im in examples], "bottle", config, size=SIZE,
                          encode_batch=4, progress=False)
    assert (res.num_refs > 0).all()
    for lo, hi in scored_slices(config, len(examples), 4):
        scores, maps, refs = fiseclip_oracle(feats, text, config, lo, hi)
        np.testing.assert_array_equal(res.num_refs[lo:hi], refs)
        assert_close(res.anomaly_maps[lo:hi], maps, tol=2e-5, what=f"maps of [{lo}:{hi}]")
        # image scores are min-max normalised over the batch: float32 noise amplified (see test_methods)
        assert_close(res.image_scores[lo:hi], scores, tol=1e-4, what=f"scores of [{lo}:{hi}]")
        _, text_only, no_refs = fiseclip_oracle(feats, text, dataclasses.replace(config, theta=0.0), lo, hi)
        assert (no_refs == 0).all()  # A_txt < 0 never holds: the text-only fallback
        assert np.abs(res.anomaly_maps[lo:hi] - text_only).max(axis=(1, 2)).min() > 1e3 * 2e-5


def read_scores(out):
    with open(out / "scores.csv") as fh:
        return list(csv.DictReader(fh))


def test_cli_fiseclip_with_surviving_references(tiny, tiny_checkpoint, examples, example_pixels, tmp_path):
    """`detect --method fiseclip --batch-size 4` on a saved checkpoint whose text scores all stay below
    θ = 0.5 (random:tiny's stay above it: every reference filtered): no "no reference" warning, and
    scores.csv equals the numpy oracle of SPEC §4.3 on each batch of 4 (the last one of 2), not the
    text-only scores."""
    _, params, cfg = tiny
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["detect", str(EXAMPLES), "--method", "fiseclip", "--weights", str(tiny_checkpoint),
                     "--size", str(SIZE), "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    assert not [w for w in caught if "no reference" in str(w.message)]
    rows = read_scores(out)
    assert [r["file"] for r in rows] == [name for name, _ in examples]  # the fixture's order
    cli_scores = np.array([float(r["score"]) for r in rows])

    text = text_features_full(params, cfg, "bottle", "winclip").features
    feats = encode_features(params, cfg, example_pixels, CLI_FISECLIP)
    batches = scored_slices(CLI_FISECLIP, len(rows), 4)
    expected = [fiseclip_oracle(feats, text, CLI_FISECLIP, lo, hi) for lo, hi in batches]
    assert all((refs > 0).all() for _, _, refs in expected)
    # min-max normalised over each batch: float32 noise amplified (see test_methods); 6 decimals written
    assert_close(cli_scores, np.concatenate([e[0] for e in expected]), tol=1e-4, what="CLI scores")
    text_only = dataclasses.replace(CLI_FISECLIP, theta=0.0)  # every reference filtered
    text_only_scores = np.concatenate([fiseclip_oracle(feats, text, text_only, lo, hi)[0] for lo, hi in batches])
    assert np.abs(cli_scores - text_only_scores).max() > 0.05


# ------------------------------------------------------------------ AnoCLIP+ end to end
ANOCLIP_MAP_TOL = 1e-6  # AnoCLIP map parity tolerance (test_methods, test_tta)


def test_anoclip_plus_end_to_end_moves_the_maps_far_beyond_tolerance(tiny, examples):
    """detect_category(AnoCLIP+) vs AnoCLIP: every image's map moves by more than 100x the map parity
    tolerance; the image scores stay AnoCLIP's (SPEC §4.5 "Image score unchanged")."""
    _, params, cfg = tiny
    images = [im for _, im in examples]
    plain, plus = (detect_category(params, cfg, images, "bottle", c, size=SIZE, encode_batch=4, progress=False)
                   for c in (AnoCLIPConfig(), CLI_ANOCLIP_PLUS))
    moved = np.abs(plus.anomaly_maps - plain.anomaly_maps).max(axis=(1, 2))
    assert moved.min() > 100 * ANOCLIP_MAP_TOL, moved
    assert_close(plus.image_scores, plain.image_scores, tol=ANOCLIP_MAP_TOL, what="image scores")


def test_cli_anoclip_plus_maps_are_adapted(tiny, tiny_checkpoint, examples, tmp_path, monkeypatch):
    """`detect --method anoclip+ --batch-size 4`: the maps it draws into its overlays equal
    detect_category(AnoCLIP+, seed 0) and differ from plain AnoCLIP's by more than 100x the
    tolerance; its scores are AnoCLIP's."""
    import fiseclip_jax.runner as runner

    _, params, cfg = tiny
    drawn, draw = [], runner.side_by_side

    def spy(image, amap, **kw):  # records the map of each overlay the CLI renders
        drawn.append(np.asarray(amap))
        return draw(image, amap, **kw)

    monkeypatch.setattr(runner, "side_by_side", spy)
    out = tmp_path / "out"
    assert main(["detect", str(EXAMPLES), "--method", "anoclip+", "--weights", str(tiny_checkpoint),
                 "--size", str(SIZE), "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    rows = read_scores(out)
    assert [r["file"] for r in rows] == [name for name, _ in examples] and len(drawn) == len(rows)
    images = [im for _, im in examples]
    plain, plus = (detect_category(params, cfg, images, "bottle", c, size=SIZE, encode_batch=4, progress=False)
                   for c in (AnoCLIPConfig(), CLI_ANOCLIP_PLUS))
    assert_close(np.stack(drawn), plus.anomaly_maps, tol=ANOCLIP_MAP_TOL, what="CLI maps")
    assert np.abs(np.stack(drawn) - plain.anomaly_maps).max(axis=(1, 2)).min() > 100 * ANOCLIP_MAP_TOL
    assert_close([float(r["score"]) for r in rows], plain.image_scores, tol=1e-6, what="CLI scores")
