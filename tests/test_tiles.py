"""AnoVL's VisA protocol (SPEC §4.4): short side to S, two S×S tiles, tile maps averaged where they overlap.
Checked against hand-built cases and against plain (square) AnoCLIP run on each tile by hand."""

import jax
import numpy as np
import pytest
from PIL import Image

import fiseclip_jax as fj
from fiseclip_jax.clip.preprocess import normalize
from fiseclip_jax.tiles import TileLayout, prepare_tiled, short_side_size

S = 32  # tiny CLIP, patch 8: a 4 x 4 grid per tile


def recover_by_hand(a, b, offset):
    """AnoVL's image_recover for [H, S] tiles a (left) and b (right) -> [H, S + offset]."""
    s = a.shape[1]
    out = np.empty((a.shape[0], s + offset))
    out[:, :offset] = a[:, :offset]
    out[:, offset:s] = (a[:, offset:] + b[:, :s - offset]) / 2
    out[:, s:] = b[:, s - offset:]
    return out


def test_short_side_rule_is_torchvisions():
    assert short_side_size(1168, 1284, 240) == (240, 263)  # VisA candle: AnoVL's "263-240=23"
    assert short_side_size(1000, 1500, 240) == (240, 360)
    assert short_side_size(1500, 1000, 240) == (360, 240)  # portrait: the width is the short side
    assert short_side_size(700, 700, 240) == (240, 240)
    img = (np.random.default_rng(0).random((60, 90, 3)) * 255).astype(np.uint8)
    px = prepare_tiled(img, S, "bilinear")
    want = normalize(np.asarray(Image.fromarray(img).resize((48, S), Image.Resampling.BILINEAR)))
    np.testing.assert_array_equal(px, want)


def test_split_and_merge_against_hand_built_tiles():
    rng = np.random.default_rng(1)
    layout = TileLayout(S, 48)
    assert (layout.tile, layout.offset) == (S, 16)
    pixels = rng.normal(size=(2, S, 48, 3)).astype(np.float32)
    tiles = np.asarray(layout.split(pixels))
    np.testing.assert_array_equal(tiles[:, 0], pixels[:, :, :S])
    np.testing.assert_array_equal(tiles[:, 1], pixels[:, :, 16:])
    maps = rng.normal(size=(2, 2, S, S)).astype(np.float32)
    merged = np.asarray(layout.merge(maps))
    for i in range(2):
        np.testing.assert_allclose(merged[i], recover_by_hand(maps[i, 0], maps[i, 1], 16), rtol=0, atol=1e-6)
    # constant tiles: 1 | (1 + 3) / 2 | 3
    const = np.asarray(layout.merge(np.stack([np.ones((S, S)), 3 * np.ones((S, S))])[None]))[0]
    np.testing.assert_array_equal(const[0], [1.0] * 16 + [2.0] * 16 + [3.0] * 16)
    # portrait: tiles top and bottom, the same rule along the height
    tall = TileLayout(40, S)
    merged = np.asarray(tall.merge(maps))
    for i in range(2):
        np.testing.assert_allclose(merged[i], recover_by_hand(maps[i, 0].T, maps[i, 1].T, 8).T, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="too long"):
        TileLayout(S, 2 * S + 1)


@pytest.fixture(scope="module")
def tiny():
    cfg = fj.get_config("tiny")
    return fj.init_clip(cfg, jax.random.key(0)), cfg


def wide_images():
    rng = np.random.default_rng(2)
    return [(rng.random(shape) * 255).astype(np.uint8) for shape in ((60, 90, 3), (60, 90, 3), (45, 60, 3))]


def test_tiled_anoclip_is_plain_anoclip_per_tile_averaged(tiny):
    """detect on a wide input = plain AnoCLIP on the left and right squares, maps recovered by hand and
    image scores averaged over the two tiles (AnoVL vis_test.py)."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "candle", "anoclip")
    px = np.stack([prepare_tiled(im, S) for im in wide_images()[:2]])  # [2, 32, 48, 3]
    tiled = fj.detect(params, cfg, px, text, fj.AnoCLIPConfig(tiles=2))
    left = fj.detect(params, cfg, px[:, :, :S], text, fj.AnoCLIPConfig())
    right = fj.detect(params, cfg, px[:, :, 16:], text, fj.AnoCLIPConfig())
    assert tiled.anomaly_maps.shape == (2, S, 48)
    for i in range(2):
        want = recover_by_hand(np.asarray(left.anomaly_maps[i]), np.asarray(right.anomaly_maps[i]), 16)
        np.testing.assert_allclose(tiled.anomaly_maps[i], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(tiled.image_scores, (np.asarray(left.image_scores) + right.image_scores) / 2,
                               rtol=0, atol=1e-6)
    assert np.abs(np.asarray(left.anomaly_maps) - np.asarray(right.anomaly_maps)).max() > 1e-6  # tiles differ


def test_detect_category_keeps_each_images_shape(tiny):
    """Images of two aspect ratios: batches are runs of one input shape in file order, and each map comes
    back at its image's resized size (a list when the sizes differ)."""
    params, cfg = tiny
    ims = wide_images()
    method = fj.AnoCLIPConfig(tiles=2)
    res = fj.detect_category(params, cfg, ims, "candle", method, size=S, encode_batch=8, resample="bilinear",
                             progress=False)
    assert [m.shape for m in res.anomaly_maps] == [(S, 48), (S, 48), (S, 42)]
    text = fj.text_features_full(params, cfg, "candle", "anoclip")
    for im, amap, score in zip(ims, res.anomaly_maps, res.image_scores):
        one = fj.detect(params, cfg, prepare_tiled(im, S)[None], text, method)
        np.testing.assert_allclose(amap, one.anomaly_maps[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(score, one.image_scores[0], rtol=0, atol=1e-6)
    same = fj.detect_category(params, cfg, ims[:2], "candle", method, size=S, resample="bilinear", progress=False)
    assert isinstance(same.anomaly_maps, np.ndarray) and same.anomaly_maps.shape == (2, S, 48)
