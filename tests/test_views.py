"""AnoCLIP's 22 views against torch grid_sample, numpy flips/rotations and numpy formulas (SPEC §4.4)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fiseclip_jax.clip.config import CLIP_MEAN, CLIP_STD
from fiseclip_jax.views import (
    LUMA_WEIGHTS,
    ROTATION_ANGLES,
    TRANSLATIONS,
    VIEW_NAMES,
    affine_sample,
    anoclip_views,
    grayscale,
    rotation_theta,
    translation_theta,
)

jax.config.update("jax_default_matmul_precision", "float32")

# Jitted once; most tests share one [2, 16, 16, 3] shape so they share the compilation.
_views = jax.jit(anoclip_views, static_argnames=("align_corners",))
_warp = jax.jit(affine_sample, static_argnums=2)


def _images(b=2, h=12, w=12, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _torch_warp(torch, pixels, theta, align_corners):
    """torch oracle: affine_grid + grid_sample(bilinear, reflection) on NHWC numpy input."""
    F = torch.nn.functional
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    th = torch.as_tensor(np.asarray(theta, np.float32))[None].repeat(x.shape[0], 1, 1)
    grid = F.affine_grid(th, list(x.shape), align_corners=align_corners)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=align_corners)
    return out.permute(0, 2, 3, 1).numpy()


def _torch_rot_theta(torch, angle):
    # As AnoVL builds it: float32 cos/sin of a float32 angle.
    a = torch.tensor(angle, dtype=torch.float32)
    return torch.stack([torch.stack([torch.cos(a), -torch.sin(a), torch.tensor(0.0)]),
                        torch.stack([torch.sin(a), torch.cos(a), torch.tensor(0.0)])]).numpy()


# ------------------------------------------------------------------ affine_sample
@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid")  # the 1-px case
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("hw", [(12, 12), (7, 10), (1, 5)])
def test_affine_sample_matches_torch_random_thetas(align_corners, hw):
    torch = pytest.importorskip("torch")
    pixels = _images(2, *hw, seed=1)
    rng = np.random.default_rng(2)
    for _ in range(4):
        # Large shifts / scales so the reflection folds several times; source coords reach
        # ~30 px, where a float32 ulp of the coordinate times the noise gradient is ~1e-5.
        theta = rng.normal(size=(2, 3)).astype(np.float32) * np.float32(1.5)
        ref = _torch_warp(torch, pixels, theta, align_corners)
        out = np.asarray(_warp(pixels, theta, align_corners))
        np.testing.assert_allclose(out, ref, atol=3e-5, rtol=0)


def _smooth_images(b, n, seed):
    """Noise bilinearly upsampled 16 -> n: photograph-like gradients at CLIP size."""
    torch = pytest.importorskip("torch")
    coarse = torch.from_numpy(_images(b, 16, 16, seed)).permute(0, 3, 1, 2)
    fine = torch.nn.functional.interpolate(coarse, size=(n, n), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(fine.permute(0, 2, 3, 1).numpy())


# White noise at 16 px, and a smooth image at AnoCLIP's 240 px. (White noise at 240 px
# differs from torch by ~2e-4: float32 rounding of source coordinates ~200 px times
# neighbour differences ~5; the two implementations round the grid differently.)
@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size", [16, 240])
def test_affine_views_match_torch(align_corners, size):
    torch = pytest.importorskip("torch")
    pixels = _images(2, 16, 16, seed=3) if size == 16 else _smooth_images(1, size, seed=3)
    views = np.asarray(_views(pixels, align_corners=align_corners))
    atol = 1e-5 if size == 16 else 2e-5
    for i, angle in enumerate(ROTATION_ANGLES):
        ref = _torch_warp(torch, pixels, _torch_rot_theta(torch, angle), align_corners)
        np.testing.assert_allclose(views[1 + i], ref, atol=atol, rtol=0, err_msg=VIEW_NAMES[1 + i])
    for i, (tx, ty) in enumerate(TRANSLATIONS):
        theta = np.array([[1, 0, tx], [0, 1, ty]], np.float32)
        ref = _torch_warp(torch, pixels, theta, align_corners)
        np.testing.assert_allclose(views[9 + i], ref, atol=atol, rtol=0, err_msg=VIEW_NAMES[9 + i])


@pytest.mark.parametrize("align_corners", [True, False])
def test_identity_theta_reproduces_input(align_corners):
    # The float32 base grid lands on pixel centres only up to rounding (so does torch's).
    pixels = _images(2, 16, 16, seed=4)
    out = np.asarray(_warp(pixels, np.eye(2, 3, dtype=np.float32), align_corners))
    np.testing.assert_allclose(out, pixels, atol=1e-5, rtol=0)


def test_translation_by_whole_pixels_shifts_and_reflects():
    # align_corners=True: 2/(W-1) in normalised units is one pixel; output[j] = input[j+1],
    # and the last column reflects about the last pixel centre onto input[W-2].
    pixels = _images(2, 16, 16, seed=5)
    out = np.asarray(_warp(pixels, translation_theta(2 / 15, 0.0), True))
    np.testing.assert_allclose(out[:, :, :-1], pixels[:, :, 1:], atol=1e-5)
    np.testing.assert_allclose(out[:, :, -1], pixels[:, :, -2], atol=1e-5)


def test_rotation_sign_is_counter_clockwise():
    # theta(+pi/2) with align_corners=True on a square image is np.rot90 (counter-clockwise).
    pixels = _images(2, 16, 16, seed=6)
    out = np.asarray(_warp(pixels, rotation_theta(math.pi / 2), True))
    np.testing.assert_allclose(out, np.rot90(pixels, 1, axes=(1, 2)), atol=1e-5)


# ------------------------------------------------------------------ flips, rot90, grayscale
def test_hflip_and_rot90_are_exact():
    pixels = _images(2, 16, 16, seed=7)
    views = np.asarray(_views(pixels))
    np.testing.assert_array_equal(views[VIEW_NAMES.index("hflip")], np.flip(pixels, axis=2))
    for k in (1, 2, 3):
        np.testing.assert_array_equal(views[VIEW_NAMES.index(f"rot90x{k}")], np.rot90(pixels, k, axes=(1, 2)))


def test_rot90_direction_matches_torch():
    # AnoVL's kornia rotate(90k deg) turns counter-clockwise, like torch.rot90 over (H, W)
    # and like its own affine rotation by +k*pi/2 (both checked here against torch).
    torch = pytest.importorskip("torch")
    pixels = _images(2, 16, 16, seed=8)
    views = np.asarray(_views(pixels))
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    for k in (1, 2, 3):
        view = views[VIEW_NAMES.index(f"rot90x{k}")]
        ref = torch.rot90(x, k, dims=(2, 3)).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(view, ref)
        ref_affine = _torch_warp(torch, pixels, _torch_rot_theta(torch, k * math.pi / 2), True)
        np.testing.assert_allclose(view, ref_affine, atol=1e-5)


def test_grayscale_reference_is_on_normalised_values():
    pixels = _images(2, 16, 16, seed=9)
    w = np.array(LUMA_WEIGHTS, np.float64)
    assert LUMA_WEIGHTS == (0.299, 0.587, 0.114)  # kornia rgb_to_grayscale, float images
    expected = np.repeat((pixels.astype(np.float64) @ w)[..., None], 3, axis=-1)
    np.testing.assert_allclose(np.asarray(grayscale(pixels)), expected, atol=1e-6)
    views = np.asarray(_views(pixels))
    np.testing.assert_allclose(views[VIEW_NAMES.index("grayscale")], expected, atol=1e-6)


def test_grayscale_in_pixel_space():
    rng = np.random.default_rng(10)
    raw = rng.uniform(size=(2, 5, 5, 3))
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    pixels = ((raw - mean) / std).astype(np.float32)
    luma = raw @ np.array([0.2989, 0.587, 0.114])  # torchvision weights via the argument
    expected = (luma[..., None] - mean) / std
    out = np.asarray(grayscale(pixels, CLIP_MEAN, CLIP_STD, weights=(0.2989, 0.587, 0.114)))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError):
        grayscale(pixels, mean=CLIP_MEAN)


# ------------------------------------------------------------------ the stack
def test_view_names_and_order():
    assert len(VIEW_NAMES) == 22 and len(set(VIEW_NAMES)) == 22
    assert VIEW_NAMES[0] == "original"
    assert VIEW_NAMES[1:9] == ("rotate(-pi/4)", "rotate(-3pi/16)", "rotate(-pi/8)", "rotate(-pi/16)",
                               "rotate(+pi/16)", "rotate(+pi/8)", "rotate(+3pi/16)", "rotate(+pi/4)")
    assert VIEW_NAMES[9] == "translate(+0.2,+0.2)" and VIEW_NAMES[16] == "translate(+0.1,-0.1)"
    assert VIEW_NAMES[17:] == ("hflip", "grayscale", "rot90x1", "rot90x2", "rot90x3")
    sixteenths = [-4, -3, -2, -1, 1, 2, 3, 4]
    np.testing.assert_allclose(ROTATION_ANGLES, [m * math.pi / 16 for m in sixteenths])
    assert sorted(map(abs, np.ravel(TRANSLATIONS))) == [0.1] * 8 + [0.2] * 8
    assert len({(np.sign(a), np.sign(b), abs(a)) for a, b in TRANSLATIONS}) == 8


def test_anoclip_views_stack_jit_and_vmap():
    pixels = _images(2, 16, 16, seed=11)
    views = _views(pixels)
    assert views.shape == (22, 2, 16, 16, 3) and views.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(views[0]), pixels)
    # The views differ from one another (no view silently repeats another).
    flat = np.asarray(views).reshape(22, -1)
    dists = np.abs(flat[:, None] - flat[None]).max(-1)
    assert (dists + np.eye(22) > 1e-3).all()
    # vmap over a leading axis gives the same views image by image.
    per_image = jax.jit(jax.vmap(anoclip_views))(pixels[:, None])  # [2, 22, 1, 16, 16, 3]
    np.testing.assert_allclose(np.asarray(per_image[:, :, 0]).swapaxes(0, 1), np.asarray(views), atol=1e-6)


def test_anoclip_views_rejects_non_square():
    with pytest.raises(ValueError):
        anoclip_views(_images(1, 6, 8))
