"""Published protocols as presets (`protocols.get`, `evaluate --protocol`), metrics at the original image
resolution, and tiled wide images through evaluate. Random tiny weights, synthetic MVTec-layout data."""

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from test_evaluate import _png, make_mvtec

import fiseclip_jax as fj
from fiseclip_jax import protocols
from fiseclip_jax.cli import build_parser, main
from fiseclip_jax.cli.common import method_from_args
from fiseclip_jax.cli.evaluate import run_settings
from fiseclip_jax.data import list_mvtec, load_mask
from fiseclip_jax.evaluate import evaluate_category


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = fj.resolve_weights("random:tiny", seed=0)
    return params, cfg


# ------------------------------------------------------------------ presets
def test_presets_set_what_the_authors_ran():
    musc = protocols.get("musc-paper", dataset="mvtec")
    assert musc.method_config() == fj.MuScConfig(act="gelu", k_list=(1, 2, 3))
    assert musc.method_config().sigma == 0.0  # the authors' map
    assert musc.settings() == {"size": 518, "resample": "bicubic", "mask_rule": "strict", "aupro": "legacy",
                               "image_ap": "average_precision", "metric_resolution": "input",
                               "class_names": "clean", "protocol": "musc-paper"}
    visa = protocols.get("musc-paper", dataset="visa")
    assert visa.method_config().k_list == (1, 8, 9) and visa.mask_rule == "resize>0"
    assert musc.weights == "ViT-L/14@336"

    ano = protocols.get("anoclip-paper")
    assert ano.method_config() == fj.AnoCLIPConfig(views=True, tta=fj.TTAConfig(carry_moments=True))
    assert ano.method_config("anoclip") == fj.AnoCLIPConfig(views=True)
    assert (ano.size, ano.resample, ano.aupro, ano.image_ap, ano.class_names, ano.weights) == \
        (240, "bilinear", "legacy", "pr_auc", "anovl", "ViT-B-16-plus-240")
    ano_visa = protocols.get("anoclip-paper", dataset="visa")
    assert ano_visa.method_config() == fj.AnoCLIPConfig(tiles=2, tta=fj.TTAConfig(adapter="linear",
                                                                                  carry_moments=True))
    with pytest.raises(ValueError, match="covers the methods"):
        ano.method_config("musc")
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.get("winclip-paper")


def test_explicit_flags_win_over_the_protocol():
    args = build_parser().parse_args(["evaluate", "--dataset", "visa", "--root", "x", "--weights", "random:tiny",
                                      "--out", "o", "--protocol", "musc-paper", "--size", "64", "--aupro", "exact",
                                      "--act", "quick_gelu"])
    protocol = protocols.get(args.protocol, args.dataset)
    assert run_settings(args, protocol) == {**protocol.settings(), "size": 64, "aupro": "exact"}
    assert method_from_args(args, protocol) == fj.MuScConfig(act="quick_gelu", k_list=(1, 8, 9))
    plain = build_parser().parse_args(["evaluate", "--dataset", "mvtec", "--root", "x", "--weights", "w",
                                       "--out", "o"])
    assert run_settings(plain, None) == {} and method_from_args(plain) == fj.FiSeCLIPConfig()


def test_evaluate_protocol_from_the_command_line(tmp_path, capsys):
    root = make_mvtec(tmp_path / "data", categories=("alpha",), size=40)
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "mvtec", "--root", str(root), "--weights", "random:tiny",
                 "--protocol", "musc-paper", "--size", "32", "--out", str(out), "--no-progress"]) == 0
    assert "defined for ViT-L/14@336 weights; these are tiny" in capsys.readouterr().err
    results = json.loads((out / "musc" / "mvtec" / "results.json").read_text())
    assert (results["protocol"], results["size"], results["mask_rule"], results["aupro"], results["image_ap"],
            results["metric_resolution"]) == ("musc-paper", 32, "strict", "legacy", "average_precision", "input")
    run = json.loads((out / "musc" / "mvtec" / "run.json").read_text())["run_config"]
    assert run["method_config"]["act"] == "gelu" and run["method_config"]["k_list"] == [1, 2, 3]
    assert run["protocol"] == "musc-paper"


# ------------------------------------------------------------------ metric resolution
def bilinear_half_pixel(m, out_h, out_w):
    """torch F.interpolate(bilinear, align_corners=False) of one [h, w] map, written out."""
    h, w = m.shape

    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, fy = axis(h, out_h)
    x0, x1, fx = axis(w, out_w)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def test_metrics_at_the_original_resolution(tiny, tmp_path):
    """maps resized to each image's stored size, masks as stored; against the input-resolution maps resized
    by hand and scikit-learn."""
    params, cfg = tiny
    cat = list_mvtec(make_mvtec(tmp_path / "data", categories=("alpha",), n_bad=3, size=40), ["alpha"])[0]
    method = fj.AnoCLIPConfig()
    rec_in, scores_in, maps_in, masks_in = evaluate_category(params, cfg, cat, method, size=32, progress=False)
    rec, scores, maps, masks = evaluate_category(params, cfg, cat, method, size=32, progress=False,
                                                 metric_resolution="original")
    assert rec["metric_resolution"] == "original" and rec["metric_sizes"] == ["40x40"]
    assert rec_in["metric_resolution"] == "input" and rec_in["metric_sizes"] == ["32x32"]
    np.testing.assert_array_equal(scores, scores_in)  # image metrics do not depend on it
    want_masks = np.stack([np.zeros((40, 40), bool) if s.mask_path is None else load_mask(s.mask_path)
                           for s in cat.samples])
    np.testing.assert_array_equal(masks, want_masks)
    want_maps = np.stack([bilinear_half_pixel(np.asarray(m, np.float64), 40, 40) for m in maps_in])
    np.testing.assert_allclose(maps, want_maps, rtol=0, atol=1e-6)
    assert rec["metrics"]["pixel_AUROC"] == pytest.approx(roc_auc_score(want_masks.ravel(), maps.ravel()), abs=1e-12)
    assert rec["metrics"]["pixel_AUROC"] != rec_in["metrics"]["pixel_AUROC"]


def test_tiled_wide_images_through_evaluate(tiny, tmp_path):
    """AnoVL's VisA protocol on wide images: maps at the resized image's 32x48, masks resized to it."""
    params, cfg = tiny
    rng = np.random.default_rng(3)
    root = tmp_path / "data"
    for i in range(2):
        _png(root / "wide" / "test" / "good" / f"{i:03d}.png", rng.integers(0, 256, (60, 90, 3), np.uint8))
        _png(root / "wide" / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 256, (60, 90, 3), np.uint8))
        mask = np.zeros((60, 90), np.uint8)
        mask[10:30, 20 + 30 * i:50 + 30 * i] = 255
        _png(root / "wide" / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    cat = list_mvtec(root, ["wide"])[0]
    rec, _, maps, masks = evaluate_category(params, cfg, cat, fj.AnoCLIPConfig(tiles=2), size=32,
                                            resample="bilinear", progress=False)
    assert maps.shape == (4, 32, 48) and rec["metric_sizes"] == ["32x48"]
    want = np.stack([np.zeros((32, 48), bool) if s.mask_path is None else load_mask(s.mask_path, (32, 48))
                     for s in cat.samples])
    np.testing.assert_array_equal(masks, want)
    assert rec["metrics"]["pixel_AUROC"] == pytest.approx(roc_auc_score(want.ravel(), maps.ravel()), abs=1e-12)
    assert Image.open(cat.samples[0].path).size == (90, 60)
