"""encode_image / encode_text as composable pure functions: jit, no-jit, vmap, preprocess."""

import jax

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax import encode_image, encode_text, get_config, init_clip
from fiseclip_jax.clip.config import CLIP_MEAN, CLIP_STD
from fiseclip_jax.clip.modeling import bicubic_matrix
from fiseclip_jax.clip.preprocess import preprocess


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return init_clip(cfg, jax.random.key(0)), cfg


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
