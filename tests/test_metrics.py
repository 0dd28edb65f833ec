"""Metrics against independent oracles: scikit-learn, hand-built maps with known
answers, and slow loops written straight from the definitions (SPEC §6)."""

import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from fiseclip_jax import metrics
from fiseclip_jax.metrics import MetricWarning


# ------------------------------------------------------------------ oracles
def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return f1[np.isfinite(f1)].max()


def _regions(masks):
    """List of bool [N, H, W] arrays, one per 8-connected region of each image."""
    out = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            region = np.zeros(masks.shape, bool)
            region[i] = labelled == r
            out.append(region)
    return out


def _integrate_clipped(xs, ys, max_fpr):
    """Trapezoids segment by segment, the segment crossing max_fpr cut by interpolation."""
    area = 0.0
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area


def slow_aupro(masks, maps, max_fpr=0.3, valid=None):
    """valid: pixels that exist (images of different sizes drawn on one canvas); default all."""
    masks = masks.astype(bool)
    regions = _regions(masks)
    normal = ~masks if valid is None else ~masks & valid
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps if valid is None else maps[valid])[::-1]:  # every distinct threshold, high to low
        above = maps >= t
        ys.append(np.mean([above[r].mean() for r in regions]))
        xs.append(above[normal].mean())
    return _integrate_clipped(xs, ys, max_fpr) / max_fpr


def slow_aupro_legacy(masks, maps, num_thresholds=200, max_fpr=0.3, valid=None):
    masks = masks.astype(bool)
    regions = _regions(masks)
    normal = ~masks if valid is None else ~masks & valid
    lo, hi = (maps.min(), maps.max()) if valid is None else (maps[valid].min(), maps[valid].max())
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / num_thresholds):
        predicted = maps > th
        pros.append(np.mean([predicted[r].mean() for r in regions]))
        fprs.append(predicted[normal].mean())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < max_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = (fprs - fprs.min()) / (fprs.max() - fprs.min())
    return auc(fprs, pros)  # thresholds ascending: FPR non-increasing, as in the scripts


def random_case(seed, n=3, size=12, decimals=None):
    """Blobby masks (image 0 defect-free) and maps correlated with them."""
    rng = np.random.default_rng(seed)
    blobs = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 1.2, 1.2))
    masks = blobs > 0.25
    masks[0] = False
    maps = rng.normal(size=masks.shape) + 1.2 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return masks, maps


# -------------------------------------------------- AUROC, AP, F1 vs sklearn
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_ranking_metrics_equal_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    labels = rng.random(1000) < 0.3
    scores = rng.normal(size=1000) + 0.8 * labels
    if tied:  # few distinct values, many ties across classes
        scores = np.round(scores, 1)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    out = metrics.image_metrics(labels.astype(int), scores.astype(np.float32))
    s32 = scores.astype(np.float32)
    assert out["image_AUROC"] == pytest.approx(roc_auc_score(labels, s32), abs=1e-12)
    assert out["image_AP"] == pytest.approx(average_precision_score(labels, s32), abs=1e-12)
    assert out["image_F1Max"] == pytest.approx(sklearn_f1_max(labels, s32), abs=1e-12)


def test_extreme_ties_equal_sklearn():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.5
    scores = rng.integers(0, 3, 300).astype(float)  # three distinct values
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12)
    assert metrics.f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    constant = np.zeros(300)  # one threshold: AUROC 1/2, AP = F1 precision = prevalence
    assert metrics.auroc(labels, constant) == 0.5
    assert metrics.average_precision(labels, constant) == pytest.approx(labels.mean(), abs=1e-15)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tied", [False, True])
def test_pr_auc_equals_sklearn_auc_of_the_pr_curve(seed, tied):
    """AnoVL's image "AP" column: sklearn's auc(recall, precision), trapezoids, not average precision."""
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.4
    scores = rng.normal(size=200) + 0.8 * labels
    if tied:
        scores = np.round(scores, 1)
    scores[np.argmax(scores)] += 5.0 * (seed % 2)  # half the cases: a negative or a positive on top
    labels[np.argmax(scores)] = bool(seed % 4 < 2)
    precision, recall, _ = precision_recall_curve(labels, scores)
    assert metrics.pr_auc(labels, scores) == pytest.approx(auc(recall, precision), abs=1e-12)
    out = metrics.image_metrics(labels, scores, ap="pr_auc")
    assert out["image_AP"] == pytest.approx(auc(recall, precision), abs=1e-12)
    assert out["image_AP"] != pytest.approx(average_precision_score(labels, scores), abs=1e-6)


def test_pixel_metrics_of_images_of_different_sizes():
    """Lists of [H_i, W_i] (metrics at the original resolution, tiled wide images): all pixels together,
    regions per image. Oracle: the slow definitions on one canvas where only real pixels count."""
    masks, maps = random_case(5, n=3, size=14, decimals=1)
    sizes = [(14, 14), (9, 14), (14, 6)]
    ragged_masks = [m[:h, :w] for m, (h, w) in zip(masks, sizes)]
    ragged_maps = [m[:h, :w] for m, (h, w) in zip(maps, sizes)]
    valid = np.zeros(masks.shape, bool)
    for i, (h, w) in enumerate(sizes):
        valid[i, :h, :w] = True
    canvas_masks = masks & valid
    y = np.concatenate([m.ravel() for m in ragged_masks])
    s = np.concatenate([m.ravel() for m in ragged_maps])
    out = metrics.pixel_metrics(ragged_masks, ragged_maps)
    assert out["pixel_AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_AP"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert out["pixel_AUPRO"] == pytest.approx(slow_aupro(canvas_masks, maps, valid=valid), abs=1e-6)
    legacy = metrics.pixel_metrics(ragged_masks, ragged_maps, aupro="legacy")["pixel_AUPRO"]
    assert legacy == pytest.approx(slow_aupro_legacy(canvas_masks, maps, valid=valid), abs=1e-12)
    assert metrics.aupro(ragged_masks, ragged_maps) == pytest.approx(out["pixel_AUPRO"], abs=1e-12)


def test_pixel_metrics_equal_sklearn_and_aupro():
    masks, maps = random_case(3, n=4, size=16, decimals=1)
    out = metrics.pixel_metrics(masks, maps)
    assert set(out) == {"pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO"}
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_AP"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert out["pixel_F1Max"] == pytest.approx(sklearn_f1_max(y, s), abs=1e-12)
    # pixel_metrics shares one full sort; aupro() alone sorts only the top max_fpr share.
    assert out["pixel_AUPRO"] == pytest.approx(metrics.aupro(masks, maps), abs=1e-12)
    legacy = metrics.pixel_metrics(masks, maps, aupro="legacy")
    assert legacy["pixel_AUPRO"] == pytest.approx(metrics.aupro_legacy(masks, maps), abs=1e-12)
    assert "pixel_AUPRO" not in metrics.pixel_metrics(masks, maps, aupro=None)


# ------------------------------------------------------ AUPRO, known values
def test_aupro_perfect_map_is_one():
    masks, _ = random_case(0, n=3, size=20)
    maps = masks + 0.01 * np.random.default_rng(0).random(masks.shape)  # defects above all normals
    assert metrics.aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pixel_metrics(masks, maps)["pixel_AUPRO"] == pytest.approx(1.0, abs=1e-12)
    assert metrics.aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)  # binary map


def test_aupro_one_region_half_covered():
    # One 2x2 region (4 px) and 12 normal px. Two region px score 1 (above every normal),
    # two score -1 (below every normal). Curve: (0,0) -> (0, 1/2) [top half of the region]
    # -> (1, 1/2) [normals] -> (1, 1). On [0, 0.3] PRO is 1/2: area 0.15, / 0.3 = 0.5.
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 1:3, 1:3] = True
    maps = np.zeros((1, 4, 4))
    maps[~mask] = np.linspace(0.1, 0.5, 12)
    maps[0, 1, 1:3] = 1.0
    maps[0, 2, 1:3] = -1.0
    assert metrics.aupro(mask, maps) == pytest.approx(0.5, abs=1e-12)
    assert slow_aupro(mask, maps) == pytest.approx(0.5, abs=1e-12)


def _two_regions_and_defect_free():
    # Image A (4x5): region R1 = 1 px at (0,0); region R2 = 3 px (2,2),(3,3),(2,4), one
    # region only under 8-connectivity (diagonal neighbours). Its 16 normal px score 0.
    # Image B (4x5), defect-free: 4 px score 5, 16 px score 0. 36 normal px in all.
    # R1 scores 10, R2 scores 3. Curve: (0,0) -> (0, 1/2) [R1: 1/R of PRO]
    # -> (4/36, 1/2) [B's false positives] -> (1/9, 1) [R2] -> (1, 1).
    # Area on [0, .3] = (1/9)(1/2) + (0.3 - 1/9)(1) = 0.3 - 1/18; / 0.3 = 1 - 5/27 = 22/27.
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 0, 0] = True
    masks[0, 2, 2] = masks[0, 3, 3] = masks[0, 2, 4] = True
    maps = np.zeros((2, 4, 5))
    maps[0, 0, 0] = 10.0
    maps[0][masks[0] & (maps[0] == 0)] = 3.0
    maps[1, 0, :4] = 5.0
    return masks, maps


def test_aupro_two_regions_and_a_defect_free_image():
    masks, maps = _two_regions_and_defect_free()
    assert metrics.aupro(masks, maps) == pytest.approx(22 / 27, abs=1e-12)
    assert slow_aupro(masks, maps) == pytest.approx(22 / 27, abs=1e-12)
    # Without image B nothing normal outranks R2: perfect.
    assert metrics.aupro(masks[:1], maps[:1]) == pytest.approx(1.0, abs=1e-12)
    # (4-connectivity would split R2 into three regions and give 1 - 0.75/2.7 instead.)


def test_aupro_ties_between_defect_and_normal():
    # Region of 2 px, 10 normal px. One region px scores 1; the other ties with 4 normals
    # at 0.5; 6 normals score 0. The tie is one step: (0, 1/2) -> (0.4, 1) on a straight
    # line. At FPR 0.3 the line is at 1/2 + 1/2 * 0.3/0.4 = 0.875.
    # Area = 0.3 * (0.5 + 0.875) / 2 = 0.20625; / 0.3 = 0.6875.
    masks = np.zeros((1, 3, 4), bool)
    masks[0, 0, :2] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, 0], maps[0, 0, 1] = 1.0, 0.5
    maps[0, 1, :4] = 0.5
    assert metrics.aupro(masks, maps) == pytest.approx(0.6875, abs=1e-12)
    assert slow_aupro(masks, maps) == pytest.approx(0.6875, abs=1e-12)
    # Constant map: one diagonal step (0,0) -> (1,1): area 0.3^2/2, / 0.3 = 0.15.
    assert metrics.aupro(masks, np.ones_like(maps)) == pytest.approx(0.15, abs=1e-12)


# ------------------------------------------------ AUPRO vs slow definitions
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_equals_slow_definition(seed, decimals, max_fpr):
    masks, maps = random_case(seed, decimals=decimals)
    expected = slow_aupro(masks, maps, max_fpr)
    assert metrics.aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-6)
    full = metrics.pixel_metrics(masks, maps, max_fpr=max_fpr)["pixel_AUPRO"]
    assert full == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aupro_legacy_equals_slow_definition(seed, dtype):
    masks, maps = random_case(seed, n=3, size=14)
    maps = maps.astype(dtype)
    assert metrics.aupro_legacy(masks, maps) == pytest.approx(slow_aupro_legacy(masks, maps), abs=1e-12)
    assert metrics.aupro_legacy(masks, maps, num_thresholds=37) == pytest.approx(
        slow_aupro_legacy(masks, maps, num_thresholds=37), abs=1e-12)


# --------------------------------------------------------------- degenerate
def test_undefined_metrics_are_nan_with_warning():
    labels, scores = np.ones(5, bool), np.arange(5.0)
    with pytest.warns(MetricWarning, match="no negative"):
        assert np.isnan(metrics.auroc(labels, scores))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # defined without negatives: every threshold is precise
        assert metrics.average_precision(labels, scores) == 1.0
        assert metrics.f1_max(labels, scores) == 1.0
    with pytest.warns(MetricWarning, match="no positive"):
        out = metrics.image_metrics(~labels, scores)
    assert all(np.isnan(v) for v in out.values())
    masks = np.zeros((2, 4, 4), bool)
    with pytest.warns(MetricWarning, match="no defect region"):
        assert np.isnan(metrics.aupro(masks, np.random.default_rng(0).random(masks.shape)))
    with pytest.warns(MetricWarning, match="no normal pixel"):
        assert np.isnan(metrics.aupro(~masks, np.random.default_rng(0).random(masks.shape)))
    perfect_masks, _ = random_case(0)
    with pytest.warns(MetricWarning, match="fewer than two distinct FPRs"):  # FPR 0 throughout
        assert np.isnan(metrics.aupro_legacy(perfect_masks, perfect_masks.astype(float)))
    with pytest.warns(MetricWarning, match="all map values are equal"):
        assert np.isnan(metrics.aupro_legacy(masks | (np.arange(4) == 1), np.zeros((2, 4, 4))))


@pytest.mark.parametrize("labels, scores, match", [
    ([], [], "empty"),
    ([0, 1], [0.1, 0.2, 0.3], "shape"),
    ([0, 255], [0.1, 0.2], "0/1"),
    ([0, 1], [0.1, np.nan], "nan or inf"),
])
def test_malformed_input_raises(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        metrics.auroc(labels, scores)


def test_bad_arguments_raise():
    masks, maps = _two_regions_and_defect_free()
    with pytest.raises(ValueError, match="max_fpr"):
        metrics.aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(ValueError, match="aupro must be"):
        metrics.pixel_metrics(masks, maps, aupro="fast")
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        metrics.aupro(masks[..., None], maps[..., None])
