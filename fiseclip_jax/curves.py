"""Curves and decision thresholds, from the same counts as the metrics (metrics.py, SPEC §6).

ROC, PR and PRO points come from the ranking that computes AUROC, AP and AUPRO, so the area
under a plotted curve is the metric: trapezoids under `roc_curve` give `auroc`, the step curve of
`pr_curve` gives `average_precision`, trapezoids under `pro_curve` divided by max_fpr give `aupro`.

Thresholds follow one rule, the one `detect` decides by: a score is anomalous when it is ABOVE the
threshold. Each threshold is the highest evaluation score that is still called normal, so applying
it to the evaluation scores reproduces the counts it was chosen for:
  * `f1_threshold`: the F1-optimal cut (the first maximum of F1 from the top, i.e. the fewest
    flagged among equal F1);
  * `fpr_threshold`: the lowest threshold that flags at most a share `fpr` of the normal samples
    (floor(fpr * n) of n; ties can make it fewer).
When every sample is flagged there is no such score: the threshold is then the float just below
the lowest score.
"""

from __future__ import annotations

import math

import numpy as np

from .metrics import _pair, _Pixels, _pro_kept, _pro_polyline, _Ranking, _as_scores, _check_max_fpr

__all__ = ["roc_curve", "pr_curve", "pro_curve", "f1_threshold", "fpr_threshold", "thin", "pixel_analysis", "integrate"]


def _ranking(labels, scores) -> _Ranking:
    r = _Ranking.from_arrays(*_pair(labels, scores))
    if r.n_pos == 0 or r.n_neg == 0:
        raise ValueError("a curve needs at least one positive and one negative sample")
    return r


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR), every vertex of the ROC polyline: its trapezoid area is `metrics.auroc`."""
    return _ranking(labels, scores).roc_points()


def pr_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, score) at each distinct positive score, descending: the area of the step
    curve holding precision[k] on (recall[k-1], recall[k]] is `metrics.average_precision`."""
    return _ranking(labels, scores).pr_points()


def _clip_polyline(x, y, max_fpr):
    """The polyline on [0, max_fpr], linearly interpolated at max_fpr (as `_integrate_to` integrates it)."""
    j = int(np.searchsorted(x, max_fpr, side="right"))
    if j >= x.size:
        return x, y
    x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
    return np.r_[x[:j], max_fpr], np.r_[y[:j], y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]


def _pro_points(px: _Pixels, max_fpr: float, neg_sorted=None):
    kept = _pro_kept(px, max_fpr, neg_sorted)
    if isinstance(kept, str):
        raise ValueError(f"PRO curve undefined: {kept}")
    pos, weights, neg_sorted, n_neg = kept
    return _clip_polyline(*_pro_polyline(pos, weights, neg_sorted, n_neg, neg_sorted.size), max_fpr)


def pro_curve(masks, maps, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) on [0, max_fpr]: trapezoid area / max_fpr is `metrics.aupro`. [N, H, W] each."""
    return _pro_points(_Pixels(masks, maps), _check_max_fpr(max_fpr))


def _below(value: float, lower: list[float]) -> float:
    """The highest of `lower` (scores below `value`), or the float just below `value`."""
    return float(max(lower)) if lower else float(np.nextafter(value, -np.inf))


def _f1_threshold(r: _Ranking) -> dict:
    k, f1 = r.f1_cut()
    value = r.pos_values[k]
    lower = []
    i = int(np.searchsorted(r.neg_sorted, value, side="left"))
    if i > 0:
        lower.append(r.neg_sorted[i - 1])
    if k + 1 < r.pos_values.size:
        lower.append(r.pos_values[k + 1])
    tp, fp = int(r.tp[k]), int(r.fp_ge[k])
    return {"threshold": _below(float(value), lower), "f1": f1, "precision": tp / (tp + fp),
            "recall": tp / r.n_pos, "tp": tp, "fp": fp, "fn": r.n_pos - tp, "tn": r.n_neg - fp}


def f1_threshold(labels, scores) -> dict:
    """The F1-optimal threshold ("score > threshold" is anomalous) with its F1, precision, recall
    and confusion counts (tp, fp, fn, tn) on these samples."""
    return _f1_threshold(_ranking(labels, scores))


def _flagged_at_most(fpr: float, n: int) -> int:
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be between 0 and 1, got {fpr}")
    return min(n, math.floor(fpr * n + 1e-9))  # 0.29 * 100 is 28.999999999999996 in floats


def _fpr_threshold(neg_sorted: np.ndarray, fpr: float) -> dict:
    n = int(neg_sorted.size)
    k = _flagged_at_most(fpr, n)
    if k >= n:
        t = float(np.nextafter(neg_sorted[0], -np.inf))
    else:
        t = float(neg_sorted[n - 1 - k])  # the (k+1)-th highest: at most k score above it
    # t in the scores' own dtype: a float64 needle would make numpy cast (copy) the whole array.
    flagged = n - int(np.searchsorted(neg_sorted, neg_sorted.dtype.type(t), side="right"))
    return {"threshold": t, "target_fpr": float(fpr), "fpr": flagged / n, "flagged": flagged, "normal": n}


def fpr_threshold(normal_scores, fpr: float = 0.01) -> dict:
    """The lowest threshold under which at most a share `fpr` of `normal_scores` is above it, with the
    share and count actually flagged."""
    s = _as_scores(normal_scores, "normal scores").ravel()
    if s.size == 0:
        raise ValueError("fpr_threshold needs at least one normal score")
    return _fpr_threshold(np.sort(s), fpr)


def thin(x: np.ndarray, y: np.ndarray, max_points: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` vertices of a polyline, evenly spaced by index, first and last kept (for
    plotting pixel curves, which have a vertex per distinct defect-pixel score)."""
    if x.size <= max_points:
        return x, y
    idx = np.unique(np.r_[np.linspace(0, x.size - 1, max_points).round().astype(np.int64), x.size - 1])
    return x[idx], y[idx]


def pixel_analysis(masks, maps, *, fpr: float = 0.01, max_fpr: float = 0.3, max_points: int = 1500) -> dict:
    """Pixel-level curves (thinned to `max_points` for plotting) and thresholds of one category:
    {"roc": {fpr, tpr}, "pr": {recall, precision}, "pro": {fpr, pro, max_fpr} | None,
     "f1": f1_threshold dict, "at_fpr": fpr_threshold dict over normal pixels}. [N, H, W] each
    (or lists of [H_i, W_i]); the negatives are sorted once for all of it."""
    px = _Pixels(masks, maps)
    neg_sorted = np.sort(px.s[~px.y])
    r = _Ranking(px.s[px.y], neg_sorted)
    if r.n_pos == 0 or r.n_neg == 0:
        raise ValueError("pixel curves need defect pixels and normal pixels")
    roc = thin(*r.roc_points(), max_points)
    recall, precision, _ = r.pr_points()
    pr = thin(recall, precision, max_points)
    try:
        pro = thin(*_pro_points(px, _check_max_fpr(max_fpr), neg_sorted), max_points)
    except ValueError:
        pro = None
    return {"roc": {"fpr": roc[0].tolist(), "tpr": roc[1].tolist()},
            "pr": {"recall": pr[0].tolist(), "precision": pr[1].tolist()},
            "pro": None if pro is None else {"fpr": pro[0].tolist(), "pro": pro[1].tolist(), "max_fpr": max_fpr},
            "f1": _f1_threshold(r), "at_fpr": _fpr_threshold(neg_sorted, fpr)}


def integrate(x, y) -> float:
    """Trapezoid area under a polyline (what the report writes beside a plotted curve)."""
    return float(np.trapezoid(np.asarray(y, np.float64), np.asarray(x, np.float64)))
