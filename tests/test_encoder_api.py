"""encode_image / encode_text as composable pure functions (jit, no-jit, vmap), the flax modules
behind them (apply, init, use inside a user's module, bf16), preprocess."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from fiseclip_jax import encode_image, encode_text, get_config, init_clip
from fiseclip_jax.clip.config import CLIP_MEAN, CLIP_STD
from fiseclip_jax.clip import model
from fiseclip_jax.clip.model import CLIP
from fiseclip_jax.clip.modeling import embed_image_tokens, param_shapes
from fiseclip_jax.clip.posemb import bicubic_matrix
from fiseclip_jax.clip.preprocess import preprocess


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return init_clip(cfg, jax.random.key(0)), cfg


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_jit_and_nojit_agree(tiny):
    params, cfg = tiny
    x = np.random.RandomState(0).randn(2, 48, 48, 3).astype(np.float32)
    jitted = encode_image(params, cfg, x, layers=(2,), local="vv", local_blocks=2)
    with jax.disable_jit():
        eager = encode_image(params, cfg, x, layers=(2,), local="vv", local_blocks=2)
    for k in ("image_embeds", "patch_embeds", "local_embeds"):
        np.testing.assert_allclose(jitted[k], eager[k], atol=1e-6)
    np.testing.assert_allclose(jitted["block_tokens"][2], eager["block_tokens"][2], atol=1e-6)
    ids = np.zeros((2, 77), np.int32)
    ids[:, :3] = [49406, 320, 49407]
    with jax.disable_jit():
        t_eager = encode_text(params, cfg, ids)
    np.testing.assert_allclose(encode_text(params, cfg, ids), t_eager, atol=1e-6)


def test_under_callers_vmap_and_jit(tiny):
    params, cfg = tiny
    x = np.random.RandomState(1).randn(3, 2, 32, 32, 3).astype(np.float32)  # [groups, B, S, S, 3]

    @jax.jit
    def f(p, batch):
        return jax.vmap(lambda b: encode_image(p, cfg, b)["image_embeds"])(batch)

    out = f(params, x)
    direct = encode_image(params, cfg, x.reshape(6, 32, 32, 3))["image_embeds"]
    np.testing.assert_allclose(out.reshape(6, -1), direct, atol=1e-5)


def test_images_per_pass():
    """CPU: the largest divisor of the batch within CPU_PASS_ROWS token rows; elsewhere the batch."""
    assert [model.images_per_pass(8, t, "cpu") for t in (197, 577, 1025, 1370)] == [8, 4, 2, 2]
    assert model.images_per_pass(32, 197, "cpu") == 16
    assert model.images_per_pass(7, 1025, "cpu") == 1
    assert model.images_per_pass(1, 5000, "cpu") == 1
    assert model.images_per_pass(8, 1370, "gpu") == model.images_per_pass(8, 1370, "tpu") == 8
    b, = jax.export.symbolic_shape("b")  # exported programs keep one pass over a symbolic batch
    assert model.images_per_pass(b, 1025, "cpu") is b


def test_passes_give_each_image_the_same_numbers(tiny, monkeypatch):
    """The vision transformer in passes of 2 images (nn.scan over the batch, shared parameters)
    returns what one pass over the batch returns, every output and the local path included;
    init through the passes builds the same parameter tree."""
    params, cfg = tiny
    x = np.random.RandomState(3).randn(6, 32, 32, 3).astype(np.float32)  # 17 tokens an image
    kw = dict(layers=(1, 4), local="vv", local_blocks=2)
    clip = CLIP(cfg)
    whole = clip.apply({"params": params}, x, method="encode_image", **kw)
    monkeypatch.setattr(model, "CPU_PASS_ROWS", 2 * 17)
    assert "scan" in str(jax.make_jaxpr(lambda p, x: clip.apply({"params": p}, x, method="encode_image"))(params, x))
    chex.assert_trees_all_close(clip.apply({"params": params}, x, method="encode_image", **kw), whole,
                                atol=1e-5, rtol=1e-6)
    initialised = clip.init(jax.random.key(0), x, np.zeros((1, 1), np.int32))["params"]
    chex.assert_trees_all_equal_shapes_and_dtypes(initialised, params)


def test_bicubic_matrix_rows_and_identity():
    m = bicubic_matrix(7, 7)
    np.testing.assert_allclose(m, np.eye(7), atol=1e-7)
    np.testing.assert_allclose(bicubic_matrix(24, 37).sum(1), 1.0, atol=1e-6)


def test_bicubic_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(0)
    grid = rng.randn(1, 5, 14, 14).astype(np.float32)
    for new in (16, 24, 37, 10):
        ref = torch.nn.functional.interpolate(torch.from_numpy(grid), size=(new, new), mode="bicubic",
                                              align_corners=False).numpy()[0]
        m = bicubic_matrix(14, new)
        ours = np.einsum("oi,cij,pj->cop", m, grid[0], m)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_preprocess_known_values():
    red = Image.new("RGB", (50, 30), (255, 0, 0))
    gray = np.full((20, 20), 128, np.uint8)
    out = preprocess([red, gray], 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.float32
    expect_red = (np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(out[0], np.broadcast_to(expect_red, (16, 16, 3)), atol=1e-6)
    np.testing.assert_allclose(out[1], np.broadcast_to((128 / 255 - np.array(CLIP_MEAN)) / CLIP_STD, (16, 16, 3)),
                               atol=1e-6)
    # PIL bicubic, as the reference pipelines
    img = (np.random.RandomState(0).rand(40, 40, 3) * 255).astype(np.uint8)
    want = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(preprocess([img], 24)[0], (want - CLIP_MEAN) / CLIP_STD, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess([img.astype(np.float32)], 24)


# ---------------------------------------------------------------- the flax modules behind the functions
def _random_tree(tree, seed):
    """Every leaf perturbed (init's LayerNorms are ones / zeros, which would hide a swapped leaf)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(np.shape(x)).astype(np.float32), tree)


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_functions_are_the_module_applied(tiny):
    params, cfg = tiny
    params = _random_tree(params, 0)
    x = np.random.RandomState(2).randn(2, 40, 40, 3).astype(np.float32)
    variables, clip = {"params": params}, CLIP(cfg)
    for kw in (dict(layers=(1, 3)), dict(layers=(4,), local="qq+kk", local_blocks=2)):
        chex.assert_trees_all_close(encode_image(params, cfg, x, **kw),
                                    clip.apply(variables, x, method="encode_image", **kw), atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(embed_image_tokens(params, cfg, x),
                                clip.apply(variables, x, method="embed_image_tokens"), atol=1e-6, rtol=1e-6)
    ids = np.zeros((3, 77), np.int32)
    ids[:, :4] = [49406, 320, 1125, 49407]
    chex.assert_trees_all_close(encode_text(params, cfg, ids), clip.apply(variables, ids, method="encode_text"),
                                atol=1e-6, rtol=1e-6)
    image, text = clip.apply(variables, x, ids)  # __call__: both towers
    chex.assert_trees_all_close((image, text), (encode_image(params, cfg, x), encode_text(params, cfg, ids)),
                                atol=1e-6, rtol=1e-6)


def test_init_tree_is_the_module_tree():
    cfg = get_config("tiny-gelu")
    px, ids = np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 77), np.int32)
    ref = jax.eval_shape(CLIP(cfg).init, jax.random.key(1), px, ids)["params"]  # CLIP.init's tree, not drawn

    def sig(tree):
        return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)

    assert sig(init_clip(cfg, jax.random.key(1))) == sig(ref) == sig(param_shapes(cfg))
    w = cfg.vision.width  # the documented names (model.py)
    assert ref["vision"]["transformer"]["blocks_0"]["attn"]["q"]["kernel"].shape == (w, w)
    assert sorted(ref["vision"]["transformer"]) == [f"blocks_{i}" for i in range(cfg.vision.layers)]
    assert ref["text"]["transformer"]["blocks_1"]["mlp"]["fc1"]["kernel"].shape == (32, 128)
    # a real-sized model: param_shapes traces one block per tower and repeats it; CLIP.init traces all
    b16 = get_config("ViT-B/16")
    full = jax.eval_shape(CLIP(b16).init, jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32), ids)["params"]
    assert sig(param_shapes(b16)) == sig(full)
    assert full["vision"]["transformer"]["blocks_11"]["mlp"]["fc2"]["kernel"].shape == (3072, 768)


class ProbeHead(nn.Module):
    """A user's model: CLIP as a submodule, a Dense head on its image embedding."""

    cfg: object

    @nn.compact
    def __call__(self, pixels):
        emb = CLIP(self.cfg, name="clip").encode_image(pixels)["image_embeds"]
        return nn.Dense(1, name="head")(emb)[:, 0]


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_clip_inside_a_users_flax_module(tiny):
    clip_params, cfg = tiny
    clip_params = _random_tree(clip_params, 1)
    x = np.random.RandomState(3).randn(4, 32, 32, 3).astype(np.float32)
    target = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    model = ProbeHead(cfg)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]  # jit: one compile, not one per op
    assert set(params) == {"clip", "head"} and "vision" in params["clip"]
    params = dict(params, clip=clip_params)  # "pretrained" weights dropped in; the text tower goes unused

    # the wrapper computes head(encode_image(...)) with the functional face as the oracle
    want = np.asarray(encode_image(clip_params, cfg, x)["image_embeds"]) @ params["head"]["kernel"][:, 0] \
        + params["head"]["bias"][0]
    np.testing.assert_allclose(model.apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)

    @jax.jit
    def loss(p):
        return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

    opt = optax.sgd(1e-2)
    state = opt.init(params)
    before, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates, state = opt.update(grads, state, params)
    stepped = optax.apply_updates(params, updates)
    assert float(loss(stepped)) < float(before)
    # the gradient reaches the first vision block, and the unused text tower gets none
    g0 = grads["clip"]["vision"]["transformer"]["blocks_0"]["attn"]["q"]["kernel"]
    assert np.abs(np.asarray(g0)).max() > 0
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads["clip"]["text"]))
    assert not np.array_equal(stepped["clip"]["vision"]["proj"], params["clip"]["vision"]["proj"])


def test_bfloat16_compute_float32_params_and_outputs(tiny):
    """cfg.dtype="bfloat16": matmuls in bf16, parameters and every output float32, and close to
    float32 (measured on this model: max |bf16 - fp32| <= 1.0e-2 x max |fp32| per output)."""
    params, cfg = tiny
    params = _random_tree(params, 2)
    bf = cfg.replace(dtype="bfloat16")
    x = np.random.RandomState(4).randn(2, 48, 48, 3).astype(np.float32)
    kw = dict(layers=(2, 4), local="vv", local_blocks=2)
    ref, got = encode_image(params, cfg, x, **kw), encode_image(params, bf, x, **kw)
    ids = np.zeros((3, 77), np.int32)
    ids[:, :5] = [49406, 320, 1125, 539, 49407]
    ref["text"], got["text"] = encode_text(params, cfg, ids), encode_text(params, bf, ids)
    for (path, r), g in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
        assert g.dtype == jnp.float32, path
        err = float(np.abs(np.asarray(g) - np.asarray(r)).max())
        assert 0 < err <= 2e-2 * float(np.abs(np.asarray(r)).max()), (jax.tree_util.keystr(path), err)
    # the matmuls really run in bf16, the parameters stay float32
    jaxpr = jax.make_jaxpr(lambda p: encode_image(p, bf, x))(params)
    dots = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "dot_general"]
    assert dots and any(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
    init = jax.eval_shape(CLIP(bf).init, jax.random.key(0), x[:1, :32, :32], ids[:1])["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}


def test_dtype_is_validated_and_serialised():
    from fiseclip_jax.clip.config import CLIPConfig

    cfg = get_config("tiny").replace(dtype="bfloat16")
    assert CLIPConfig.from_json(cfg.to_json()) == cfg
    old = {k: v for k, v in get_config("tiny").to_dict().items() if k != "dtype"}
    assert CLIPConfig.from_dict(old).dtype == "float32"
    with pytest.raises(ValueError, match="dtype must be one of"):
        get_config("tiny").replace(dtype="float16")


def test_tower_input_contract(tiny):
    """chex guards the vision tower itself; the public entry points raise readable ValueErrors."""
    params, cfg = tiny
    with pytest.raises(AssertionError, match="rank"):
        CLIP(cfg).apply({"params": params}, np.zeros((32, 32, 3), np.float32), method=lambda m, p: m.vision(p))
    with pytest.raises(ValueError, match=r"pixels must be \[B, S, S, 3\]"):
        encode_image(params, cfg, np.zeros((1, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match=r"token_ids must be \[N, <= 77\]"):
        encode_text(params, cfg, np.zeros((1, 78), np.int32))
