"""`preprocess(resample=...)` against an antialiased resize written here in numpy (SPEC §1, §8).

The oracle follows the documented convolution-based resize that PIL performs (and that AnoVL's
bilinear / the other references' bicubic pipelines rely on): separable, one axis then the other, each
output pixel the normalised kernel-weighted sum of the input pixels whose centres fall within the kernel
support, the support stretched by the scale factor when shrinking (antialiasing), 8-bit rounding after
each pass. Which axis goes first is PIL's internal choice (it differs by shape: the 8-bit rounding in
between makes the orders disagree by up to a level, more with bicubic's overshoot clipped), so the
oracle computes both orders and the output must match one of them. The CLIP normalisation constants are OpenAI's published values, typed here.
"""

import numpy as np
import pytest

from fiseclip_jax.clip.preprocess import preprocess

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def triangle(x):
    x = np.abs(x)
    return np.where(x < 1, 1 - x, 0.0)


def keys_cubic(x, a=-0.5):
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


KERNELS = {"bilinear": (triangle, 1.0), "bicubic": (keys_cubic, 2.0)}


def weights(n_in, n_out, kernel, support):
    """[n_out, n_in] resampling matrix, rows summing to 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = support * stretch
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = kernel((j - centre + 0.5) / stretch)
        w[i, lo:hi] = k / k.sum()
    return w


def resize_numpy(img, size, resample, order="hv"):
    kernel, support = KERNELS[resample]
    h, w = img.shape[:2]
    x = img.astype(np.float64)
    for axis in order:  # each pass rounded to 8 bits
        if axis == "h" and w != size:
            x = np.clip(np.floor(np.einsum("ow,hwc->hoc", weights(w, size, kernel, support), x) + 0.5), 0, 255)
        if axis == "v" and h != size:
            x = np.clip(np.floor(np.einsum("oh,hwc->owc", weights(h, size, kernel, support), x) + 0.5), 0, 255)
    return x


def image(h, w, seed):
    """Smooth gradients plus noise and a sharp edge: every frequency band is present."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * xx / w, 255 * yy / h, 127 + 100 * np.sin(xx / 3.0)], -1)
    base[: h // 3, w // 2:] = 250
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape,size", [((50, 37), 24), ((64, 64), 32), ((20, 28), 32), ((90, 60), 45)])
def test_preprocess_matches_numpy_antialiased_resize(resample, shape, size):
    img = image(*shape, seed=size)
    got = preprocess([img], size, resample=resample)[0]
    assert got.shape == (size, size, 3) and got.dtype == np.float32
    levels = got * STD + MEAN  # back to [0, 1], through the published constants
    diffs = {order: np.abs(levels - resize_numpy(img, size, resample, order) / 255) * 255 for order in ("hv", "vh")}
    order = min(diffs, key=lambda o: (diffs[o] > 1e-3).mean())
    diff = diffs[order]
    # PIL keeps fixed-point (22-bit) coefficients: an 8-bit rounding may land one level off, rarely.
    assert diff.max() < 1 + 1e-3
    assert (diff < 1e-3).mean() > 0.99
    # and the normalisation itself: exact on the pixels where the levels agree
    want = resize_numpy(img, size, resample, order) / 255
    exact = diff < 1e-3
    np.testing.assert_allclose(got[exact], ((want - MEAN) / STD)[exact].astype(np.float32), atol=2e-6, rtol=0)


def test_bilinear_is_not_bicubic():
    """The option reaches the resize: on a sharp edge the two kernels differ by far more than a level."""
    img = image(50, 37, seed=1)
    a, b = preprocess([img], 24, resample="bilinear"), preprocess([img], 24, resample="bicubic")
    assert np.abs(a - b).max() * STD.min() * 255 > 5
    assert np.abs(resize_numpy(img, 24, "bilinear") - resize_numpy(img, 24, "bicubic")).max() > 5
