"""curves.py: curves whose areas are the metrics, and thresholds against brute force."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from fiseclip_jax import metrics
from fiseclip_jax.curves import f1_threshold, fpr_threshold, integrate, pixel_analysis, pr_curve, pro_curve, roc_curve


def _tied_scores(rng, n):
    return rng.integers(0, 12, n) / 4.0  # many ties


@pytest.mark.parametrize("seed", range(6))
def test_roc_and_pr_areas_are_the_metrics(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = _tied_scores(rng, 60) if seed % 2 else rng.normal(size=60) + labels
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    assert integrate(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert integrate(fpr, tpr) == pytest.approx(metrics.auroc(labels, scores), abs=1e-12)
    recall, precision, _ = pr_curve(labels, scores)
    step_area = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    assert step_area == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def _brute_f1(labels, scores):
    """Every candidate threshold (each score and below the lowest), "score > t" flagged."""
    best = None
    for t in sorted(set(scores.tolist()) | {scores.min() - 1}, reverse=True):
        flag = scores > t
        tp = int(np.sum(flag & (labels == 1)))
        fp = int(np.sum(flag & (labels == 0)))
        f1 = 2 * tp / (labels.sum() + tp + fp)
        if best is None or f1 > best[0] + 1e-15:
            best = (f1, tp, fp)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_f1_threshold_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = [0, 1]
    scores = _tied_scores(rng, 40) if seed % 2 else np.round(rng.normal(size=40) + labels, 2)
    got = f1_threshold(labels, scores)
    f1, tp, fp = _brute_f1(labels, scores)
    assert got["f1"] == pytest.approx(f1, abs=1e-12)
    assert got["f1"] == pytest.approx(metrics.f1_max(labels, scores), abs=1e-12)
    flag = scores > got["threshold"]  # the threshold reproduces the counts it reports
    assert (int(np.sum(flag & (labels == 1))), int(np.sum(flag & (labels == 0)))) == (got["tp"], got["fp"])
    assert (got["tp"], got["fp"]) == (tp, fp)
    assert got["threshold"] in scores or got["threshold"] < scores.min()


def test_f1_threshold_that_flags_everything_sits_below_the_lowest_score():
    got = f1_threshold([1, 1, 1, 0], [0.3, 0.4, 0.5, 0.6])
    assert got["threshold"] < 0.3 and got["tp"] == 3 and got["fp"] == 1 and got["f1"] == pytest.approx(6 / 7)


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.07, 0.1, 0.29, 0.5, 1.0])
def test_fpr_threshold_is_the_lowest_with_at_most_that_share_flagged(fpr):
    rng = np.random.default_rng(3)
    normal = np.r_[_tied_scores(rng, 60), rng.normal(size=40)]  # 100 scores, ties
    got = fpr_threshold(normal, fpr)
    candidates = np.r_[np.unique(normal), normal.min() - 1]
    ok = [t for t in candidates if np.mean(normal > t) <= fpr + 1e-12]
    expected = min(ok) if min(ok) >= normal.min() else normal.min() - 1
    if expected < normal.min():  # everything flagged: just below the lowest score
        assert got["threshold"] < normal.min() and np.all(normal > got["threshold"])
    else:
        assert got["threshold"] == expected
    assert got["flagged"] == int(np.sum(normal > got["threshold"])) and got["fpr"] <= fpr + 1e-12


def _masks_maps(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:6, 3:9] = True
    masks[1, 10:14, 10:12] = True
    masks[1, 1:3, 1:3] = True
    maps = rng.random((3, 16, 16)) + 0.6 * masks
    return masks, np.round(maps, 2)  # ties


@pytest.mark.parametrize("seed", range(3))
def test_pixel_analysis_curves_give_the_metrics(seed):
    masks, maps = _masks_maps(seed)
    m = metrics.pixel_metrics(masks, maps)
    out = pixel_analysis(masks, maps, fpr=0.05, max_points=10**6)  # unthinned: areas are exact
    assert integrate(out["roc"]["fpr"], out["roc"]["tpr"]) == pytest.approx(m["pixel_AUROC"], abs=1e-12)
    ap = np.sum(np.diff(np.r_[0.0, out["pr"]["recall"]]) * np.asarray(out["pr"]["precision"]))
    assert ap == pytest.approx(m["pixel_AP"], abs=1e-12)
    pro = out["pro"]
    assert pro["fpr"][-1] == pytest.approx(0.3)
    assert integrate(pro["fpr"], pro["pro"]) / 0.3 == pytest.approx(m["pixel_AUPRO"], abs=1e-12)
    fx, py = pro_curve(masks, maps)
    assert integrate(fx, py) / 0.3 == pytest.approx(m["pixel_AUPRO"], abs=1e-12)
    # thresholds against the flat brute force
    f1, tp, fp = _brute_f1(masks.ravel().astype(int), maps.ravel())
    assert out["f1"]["f1"] == pytest.approx(f1) and (out["f1"]["tp"], out["f1"]["fp"]) == (tp, fp)
    normal = maps[~masks]
    t = out["at_fpr"]["threshold"]
    assert np.mean(normal > t) <= 0.05 and np.mean(normal >= t) > 0.05  # the lowest such threshold


def test_thinned_curves_stay_close():
    masks, maps = _masks_maps(0)
    maps = maps + np.random.default_rng(1).random(maps.shape) * 1e-3  # all distinct
    m = metrics.pixel_metrics(masks, maps)
    out = pixel_analysis(masks, maps, max_points=50)
    assert len(out["roc"]["fpr"]) <= 51
    assert integrate(out["roc"]["fpr"], out["roc"]["tpr"]) == pytest.approx(m["pixel_AUROC"], abs=0.02)
