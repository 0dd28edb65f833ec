"""Method options that reach their code paths (found by mutation testing, docs/testing.md)."""

import numpy as np
import pytest

from fiseclip_jax import AnoCLIPConfig, FiSeCLIPConfig
from fiseclip_jax.clip.preprocess import preprocess
from fiseclip_jax.errors import FiseclipError


def test_anoclip_prepare_passes_the_resample_filter_on():
    img = np.random.default_rng(0).integers(0, 255, size=(50, 37, 3)).astype(np.uint8)
    method = AnoCLIPConfig()
    bilinear = method.prepare(img, 24, "bilinear")
    np.testing.assert_array_equal(bilinear, preprocess([img], 24, "bilinear")[0])
    assert np.abs(bilinear - method.prepare(img, 24, "bicubic")).max() > 0.1


@pytest.mark.parametrize("local", ["qq", "qq+kk", "vv", "identity"])
def test_fiseclip_accepts_every_documented_local_mode(local):
    assert FiSeCLIPConfig(local=local).local == local


def test_fiseclip_refuses_an_unknown_local_mode():
    with pytest.raises(FiseclipError, match="local"):
        FiSeCLIPConfig(local="IDENTITY")
