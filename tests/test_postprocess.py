"""Map post-processing against torch F.interpolate, scipy.ndimage and numpy loops (SPEC §5)."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from fiseclip_jax.postprocess import gaussian_blur, mean_filter, minmax_normalise, upsample_bilinear

jax.config.update("jax_default_matmul_precision", "float32")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("src,dst", [((7, 7), 37), ((5, 9), (23, 13)), ((4, 4), (4, 4)), ((6, 6), (3, 5)), ((1, 3), (4, 1))])
def test_bilinear_matches_torch(align_corners, src, dst):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3,) + src).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=dst, mode="bilinear",
                                          align_corners=align_corners)[:, 0].numpy()
    fn = jax.jit(upsample_bilinear, static_argnums=(1, 2))
    out = np.asarray(fn(maps, dst, align_corners))
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_bilinear_default_is_align_corners_true():
    maps = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    out = np.asarray(upsample_bilinear(maps, 3))
    np.testing.assert_allclose(out[0], [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-7)


@pytest.mark.parametrize("shape,sigma,truncate", [((2, 40, 33), 4.0, 4.0), ((1, 5, 7), 4.0, 4.0), ((3, 16, 16), 1.5, 3.0)])
def test_gaussian_matches_scipy(shape, sigma, truncate):
    rng = np.random.default_rng(1)
    maps = rng.random(shape).astype(np.float32)
    fn = jax.jit(gaussian_blur, static_argnames=("sigma", "truncate"))
    out = np.asarray(fn(maps, sigma=sigma, truncate=truncate))
    for b in range(shape[0]):
        ref = ndimage.gaussian_filter(maps[b].astype(np.float64), sigma, truncate=truncate)
        np.testing.assert_allclose(out[b], ref, atol=1e-5, rtol=0)


def numpy_mean_filter(m, size, padding):
    pad = size // 2
    mode = "edge" if padding == "replicate" else "constant"
    p = np.pad(np.asarray(m, np.float64), ((0, 0), (pad, pad), (pad, pad)), mode=mode)
    out = np.zeros(m.shape)
    for b in range(m.shape[0]):
        for y in range(m.shape[1]):
            for x in range(m.shape[2]):
                out[b, y, x] = p[b, y:y + size, x:x + size].sum() / size**2
    return out


@pytest.mark.parametrize("padding", ["replicate", "zero"])
@pytest.mark.parametrize("size", [1, 3, 5])
def test_mean_filter_matches_loop(padding, size):
    rng = np.random.default_rng(size)
    maps = rng.random((2, 6, 7)).astype(np.float32)
    out = np.asarray(jax.jit(mean_filter, static_argnums=(1, 2))(maps, size, padding))
    np.testing.assert_allclose(out, numpy_mean_filter(maps, size, padding), atol=1e-6)


def test_mean_filter_of_integer_maps_is_a_float_mean():
    """Integer maps (counts, uint8 masks) are averaged in float32, not in their own dtype."""
    maps = np.random.default_rng(4).integers(0, 255, size=(2, 5, 6)).astype(np.uint8)
    out = np.asarray(mean_filter(maps))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, numpy_mean_filter(maps, 3, "replicate"), atol=1e-4)
    assert np.abs(out - np.round(out)).max() > 0.1  # fractional means survive


def test_mean_filter_replicate_matches_anovl_torch():
    torch = pytest.importorskip("torch")
    maps = np.random.default_rng(2).random((2, 8, 8)).astype(np.float32)
    t = torch.nn.functional.pad(torch.from_numpy(maps)[:, None], (1, 1, 1, 1), "replicate")
    ref = torch.nn.functional.avg_pool2d(t, 3, stride=1, padding=0)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(mean_filter(maps)), ref, atol=1e-6)
    with pytest.raises(ValueError):
        mean_filter(maps, 2)


def test_minmax_global_axis_guard_and_valid():
    minmax = jax.jit(minmax_normalise, static_argnames=("axis",))
    x = np.array([[1.0, 3.0], [2.0, 5.0], [100.0, -50.0]], np.float32)
    np.testing.assert_allclose(np.asarray(minmax(x)), (x + 50) / 150, atol=1e-6)
    # per-row
    rows = np.asarray(minmax(x, axis=1))
    np.testing.assert_allclose(rows, [[0, 1], [0, 1], [1, 0]], atol=1e-6)
    # padding row excluded from min/max, output 0 there
    valid = np.array([True, True, False])
    out = np.asarray(minmax(x, valid=valid))
    np.testing.assert_allclose(out[:2], (x[:2] - 1) / 4, atol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_allclose(np.asarray(minmax(x, axis=0, valid=valid))[:2],
                               [[0, 0], [1, 1]], atol=1e-6)
    # equal values: zeros, never NaN
    eq = np.asarray(minmax(np.full((3, 4), 2.5, np.float32)))
    np.testing.assert_array_equal(eq, 0.0)
    eq_rows = np.asarray(minmax(np.array([[1, 1], [0, 2]], np.float32), axis=1))
    np.testing.assert_allclose(eq_rows, [[0, 0], [0, 1]])
    np.testing.assert_allclose(np.asarray(minmax(x, axis=1, valid=valid)), np.where(valid[:, None], rows, 0), atol=1e-6)
