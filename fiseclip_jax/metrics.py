"""Evaluation metrics in numpy float64, outside jit (SPEC §6).

Image level: AUROC, AP, F1-max. Pixel level: the same three plus AUPRO.
Every metric is returned as a fraction in [0, 1]; the reporting layer
converts to percent. Names: image_AUROC, image_AP, image_F1Max, pixel_AUROC,
pixel_AP, pixel_F1Max, pixel_AUPRO.

Exactness. AUROC and AP equal scikit-learn's `roc_auc_score` and
`average_precision_score` (tied scores form one step of the curve), computed
without sklearn: the negatives are sorted once and every positive is placed
among them with `searchsorted`, so only the (few) positives need per-value
work. Pixel counts are int64 and all ratios float64.

Degenerate input (one rule everywhere): a metric that is undefined on the
data returns nan and emits a `MetricWarning` saying why —
  * AUROC: needs at least one positive and one negative;
  * AP, F1-max: need at least one positive (with no negative both are 1.0);
  * AUPRO: needs at least one defect region and one normal pixel.
Malformed input (empty arrays, shape mismatch, labels other than 0/1,
non-finite scores, a bad `max_fpr`) raises ValueError.

Pixel metrics take masks and maps as [N, H, W] arrays or, for images of different sizes
(metrics at the original resolution, tiled wide images), as lists of [H_i, W_i] arrays.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

__all__ = [
    "MetricWarning",
    "auroc",
    "average_precision",
    "pr_auc",
    "f1_max",
    "aupro",
    "aupro_legacy",
    "image_metrics",
    "pixel_metrics",
]

# 8-connectivity inside one image, no connection across the image axis.
_EIGHT_CONNECTED_2D = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_2D[1] = True


class MetricWarning(UserWarning):
    """A metric is undefined on the given data and was returned as nan."""


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined: {reason}; returning nan", MetricWarning, stacklevel=3)
    return float("nan")


# ------------------------------------------------------------ input checks
def _as_labels(labels, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype == bool:
        return y
    if not (np.issubdtype(y.dtype, np.number)):
        raise ValueError(f"{what} must be bool or 0/1 numbers, got dtype {y.dtype}")
    binary = (y == 0) | (y == 1)
    if not binary.all():
        bad = np.unique(y[~binary])[:5]
        raise ValueError(f"{what} must be bool or 0/1, found values {bad.tolist()}")
    return y == 1


def _as_scores(scores, what: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(s.dtype, np.number) or s.dtype == bool):
            raise ValueError(f"{what} must be numeric, got dtype {s.dtype}")
        s = s.astype(np.float64)  # float16 and integers: exact in float64
    if not np.isfinite(s).all():
        raise ValueError(f"{what} contain nan or inf")
    return s


def _pair(labels, scores, names=("labels", "scores")) -> tuple[np.ndarray, np.ndarray]:
    y = _as_labels(labels, names[0])
    s = _as_scores(scores, names[1])
    if y.shape != s.shape:
        raise ValueError(f"{names[0]} shape {y.shape} != {names[1]} shape {s.shape}")
    if y.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty")
    return y, s


def _check_max_fpr(max_fpr: float) -> float:
    max_fpr = float(max_fpr)
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    return max_fpr


# ----------------------------------------------------------- ranking core
class _Ranking:
    """Positives placed among sorted negatives: everything AUROC/AP/F1 need.

    pos_values: distinct positive scores, descending [k]
    pos_count:  how many positives have exactly that score [k]
    tp:         positives scoring >= value [k]
    fp_ge:      negatives scoring >= value [k]
    fp_gt:      negatives scoring >  value [k]
    """

    def __init__(self, pos_scores: np.ndarray, neg_sorted: np.ndarray):
        self.n_pos = int(pos_scores.size)
        self.n_neg = int(neg_sorted.size)
        values, counts = np.unique(pos_scores, return_counts=True)  # ascending
        self.pos_values = values[::-1]
        self.pos_count = counts[::-1].astype(np.int64)
        self.tp = np.cumsum(self.pos_count)
        self.fp_ge = self.n_neg - np.searchsorted(neg_sorted, self.pos_values, side="left").astype(np.int64)
        self.fp_gt = self.n_neg - np.searchsorted(neg_sorted, self.pos_values, side="right").astype(np.int64)
        self.neg_sorted = neg_sorted

    @classmethod
    def from_arrays(cls, y: np.ndarray, s: np.ndarray) -> "_Ranking":
        y, s = y.ravel(), s.ravel()
        return cls(s[y], np.sort(s[~y]))

    def auroc(self) -> float:
        if self.n_pos == 0 or self.n_neg == 0:
            which = "positive" if self.n_pos == 0 else "negative"
            return _undefined("AUROC", f"no {which} samples")
        # Mann-Whitney U with ties counted 1/2 == trapezoid ROC area (sklearn).
        # Twice the count of (negative below) + (negative tied), exact in int64.
        below = self.n_neg - self.fp_ge
        tied = self.fp_ge - self.fp_gt
        twice_u = int(np.sum(self.pos_count * (2 * below + tied)))
        return twice_u / (2.0 * self.n_pos * self.n_neg)

    def average_precision(self) -> float:
        if self.n_pos == 0:
            return _undefined("AP", "no positive samples")
        # sum over thresholds of (recall step) * precision; recall moves only at positive values.
        precision = self.tp / (self.tp + self.fp_ge)
        return float(np.sum(self.pos_count * precision) / self.n_pos)

    def pr_auc(self) -> float:
        if self.n_pos == 0:
            return _undefined("PR AUC", "no positive samples")
        # sklearn's auc(recall, precision) over precision_recall_curve: trapezoids between curve points;
        # recall only moves at positive values, from the point just above each (precision with the
        # negatives scoring strictly higher) to the point at it. Before the first positive the curve
        # sits at (0, 1) when no negative scores higher, else at (0, 0).
        recall = self.tp / self.n_pos
        prev_tp = np.r_[0, self.tp[:-1]]
        denom = prev_tp + self.fp_gt
        p_before = np.where(denom > 0, prev_tp / np.maximum(denom, 1), 1.0)
        p_at = self.tp / (self.tp + self.fp_ge)
        return float(np.sum(np.diff(np.r_[0.0, recall]) * (p_before + p_at) / 2.0))

    def f1_max(self) -> float:
        if self.n_pos == 0:
            return _undefined("F1-max", "no positive samples")
        return self.f1_cut()[1]

    # Curves (curves.py) from the same counts as the areas above: one code path.
    def roc_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR), every vertex of the ROC polyline whose trapezoid area is `auroc()`: at each positive
        value b, the point just above b, then the point at b (a diagonal over tied scores)."""
        prev_tp = np.r_[0, self.tp[:-1]]
        fpr = np.r_[0.0, np.stack([self.fp_gt, self.fp_ge], 1).ravel() / self.n_neg, 1.0]
        tpr = np.r_[0.0, np.stack([prev_tp, self.tp], 1).ravel() / self.n_pos, 1.0]
        return fpr, tpr

    def pr_points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(recall, precision, score) at each positive value, descending score: `average_precision()` is
        the area under the step curve that holds precision[k] over (recall[k-1], recall[k]]."""
        return self.tp / self.n_pos, self.tp / (self.tp + self.fp_ge), self.pos_values

    def f1_cut(self) -> tuple[int, float]:
        """(k, F1-max): flagging every score >= pos_values[k] gives the first maximum of F1."""
        # 2PR/(P+R) = 2TP/(n_pos + TP + FP). Between positive values TP is fixed and FP
        # grows, so the maximum over the whole PR curve sits at a positive value.
        f1 = 2.0 * self.tp / (self.n_pos + self.tp + self.fp_ge)
        k = int(np.argmax(f1))
        return k, float(f1[k])


# ------------------------------------------------------------ public: image
def auroc(labels, scores) -> float:
    """Area under the ROC curve, equal to `sklearn.metrics.roc_auc_score`; labels/scores any equal shape."""
    return _Ranking.from_arrays(*_pair(labels, scores)).auroc()


def average_precision(labels, scores) -> float:
    """Average precision, equal to `sklearn.metrics.average_precision_score`."""
    return _Ranking.from_arrays(*_pair(labels, scores)).average_precision()


def pr_auc(labels, scores) -> float:
    """Trapezoidal area under the precision-recall curve, equal to sklearn's
    `auc(recall, precision)` of `precision_recall_curve`: the "AP" column of AnoVL's image table
    (SPEC §8). Not average precision (`average_precision`), which steps instead of interpolating."""
    return _Ranking.from_arrays(*_pair(labels, scores)).pr_auc()


def f1_max(labels, scores) -> float:
    """Max of 2PR/(P+R) over the precision-recall curve (finite points only)."""
    return _Ranking.from_arrays(*_pair(labels, scores)).f1_max()


IMAGE_AP = ("average_precision", "pr_auc")


def image_metrics(labels, scores, *, ap: str = "average_precision") -> dict[str, float]:
    """image_AUROC, image_AP, image_F1Max of per-image scores; labels 1 = anomalous. [N], [N].

    ap: "average_precision" (default, sklearn's AP) or "pr_auc" (AnoVL's trapezoidal PR area)."""
    if ap not in IMAGE_AP:
        raise ValueError(f"ap must be one of {IMAGE_AP}, got {ap!r}")
    r = _Ranking.from_arrays(*_pair(labels, scores))
    return {"image_AUROC": r.auroc(), "image_AP": r.average_precision() if ap == "average_precision" else r.pr_auc(),
            "image_F1Max": r.f1_max()}


# ------------------------------------------------------------------ AUPRO
def _ragged(x) -> bool:
    return isinstance(x, (list, tuple)) and len({np.shape(m) for m in x}) > 1


class _Pixels:
    """Masks and maps of a pixel metric: y, s bool/float arrays of one shape ([N, H, W], or flat over
    images of different sizes) and `regions`: each pixel's 8-connected defect region id (0: none)."""

    def __init__(self, masks, maps):
        if _ragged(masks) or _ragged(maps):
            if len(masks) != len(maps):
                raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
            pairs = [_pair(m, a, ("masks", "maps")) for m, a in zip(masks, maps)]
            if any(y.ndim != 2 for y, _ in pairs):
                raise ValueError("per-image masks and maps must each be [H, W]")
            labels, offset = [], 0
            for y, _ in pairs:
                lab, k = ndimage.label(y, structure=_EIGHT_CONNECTED_2D[1])
                labels.append(np.where(lab > 0, lab + offset, 0).ravel())
                offset += k
            self.y = np.concatenate([y.ravel() for y, _ in pairs])
            self.s = np.concatenate([a.ravel() for _, a in pairs])
            self.regions, self.n_regions = np.concatenate(labels), offset
            return
        y, s = _pair(np.asarray(masks) if isinstance(masks, (list, tuple)) else masks,
                     np.asarray(maps) if isinstance(maps, (list, tuple)) else maps, ("masks", "maps"))
        if y.ndim == 2:
            y, s = y[None], s[None]
        if y.ndim != 3:
            raise ValueError(f"masks and maps must be [N, H, W] (or [H, W]), got shape {y.shape}")
        self.y, self.s = y, s
        self.regions, self.n_regions = ndimage.label(y, structure=_EIGHT_CONNECTED_2D)


def _region_weights(px: _Pixels) -> tuple[np.ndarray, int]:
    """Per defect pixel (C order of y[y]) 1 / (R * |its region|), and R.

    Regions: 8-connected components of each image's mask (SPEC §6)."""
    if px.n_regions == 0:
        return np.zeros(0), 0
    ids = px.regions[px.y]
    size = np.bincount(ids, minlength=px.n_regions + 1).astype(np.float64)
    return 1.0 / (px.n_regions * size[ids]), px.n_regions


def _integrate_to(x: np.ndarray, y: np.ndarray, max_fpr: float) -> float:
    """Trapezoid area under the polyline (x nondecreasing, starting at 0) on [0, max_fpr]."""
    j = int(np.searchsorted(x, max_fpr, side="right"))  # first point strictly past max_fpr
    area = float(np.trapezoid(y[:j], x[:j]))
    if j < x.size:  # add the piece up to max_fpr, curve linearly interpolated there
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        area += (max_fpr - x0) * (y0 + y_cut) / 2.0
    return area


def _pro_polyline(pos_scores, pos_weights, neg_sorted, n_neg, n_neg_kept):
    """The PRO-over-FPR polyline (x = FPR nondecreasing from 0, y = PRO), every vertex of it.

    neg_sorted holds (ascending) every negative scoring >= some cut c, n_neg_kept of them;
    pos_scores/pos_weights every positive scoring >= c. Curve points only change slope at
    positive values b: a horizontal run (only negatives) to (FP(>b), PRO(>b)), then one step
    over the tie group at b to (FP(>=b), PRO(>=b)). The final point (n_neg_kept/N, PRO) lies
    on the horizontal run that follows, at FPR > max_fpr unless everything was kept.
    """
    order = np.argsort(pos_scores)[::-1]
    s, w = pos_scores[order], pos_weights[order]
    last_of_group = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    pro_ge = np.cumsum(w)[last_of_group] if s.size else np.zeros(0)
    pro_gt = np.r_[0.0, pro_ge[:-1]]
    values = s[last_of_group]
    fp_gt = n_neg_kept - np.searchsorted(neg_sorted, values, side="right")
    fp_ge = n_neg_kept - np.searchsorted(neg_sorted, values, side="left")
    x = np.empty(2 * values.size + 2)
    y = np.empty_like(x)
    x[0] = y[0] = 0.0
    x[1:-1:2], x[2:-1:2] = fp_gt / n_neg, fp_ge / n_neg
    y[1:-1:2], y[2:-1:2] = pro_gt, pro_ge
    x[-1], y[-1] = n_neg_kept / n_neg, (pro_ge[-1] if pro_ge.size else 0.0)
    return x, y


def _aupro_curve_area(pos_scores, pos_weights, neg_sorted, n_neg, n_neg_kept, max_fpr) -> float:
    """Exact PRO-over-FPR area on [0, max_fpr] / max_fpr (the polyline of `_pro_polyline`)."""
    x, y = _pro_polyline(pos_scores, pos_weights, neg_sorted, n_neg, n_neg_kept)
    # Clip: PRO sums 1/(R |region|) weights, so a perfect map can land 1 ulp above 1.
    return float(np.clip(_integrate_to(x, y, max_fpr) / max_fpr, 0.0, 1.0))


def _pro_inputs(px: _Pixels):
    """(region weights, normal-pixel count, why PRO is undefined or None)."""
    weights, n_regions = _region_weights(px)
    n_neg = int(px.y.size - np.count_nonzero(px.y))
    why = "no defect region in the masks" if n_regions == 0 else \
        "no normal pixel in the masks" if n_neg == 0 else None
    return weights, n_neg, why


def _pro_kept(px: _Pixels, max_fpr: float, neg_sorted: np.ndarray | None):
    """(positive scores, their weights, sorted negatives, n_neg) of the PRO curve up to max_fpr, or a
    string saying why PRO is undefined. Without `neg_sorted` only the top max_fpr share of negatives
    is kept: partition (O(n)), sort that part."""
    y, s = px.y, px.s
    weights, n_neg, why = _pro_inputs(px)
    if why:
        return why
    pos = s[y]
    if neg_sorted is None:
        neg = s[~y]
        k = min(n_neg, int(np.floor(max_fpr * n_neg)) + 1)  # FP >= k  =>  FPR > max_fpr
        cut = np.partition(neg, n_neg - k)[n_neg - k]  # k-th largest negative
        neg_sorted = np.sort(neg[neg >= cut])
        keep = pos >= cut
        pos, weights = pos[keep], weights[keep]
    return pos, weights, neg_sorted, n_neg


def _aupro_exact(px: _Pixels, max_fpr: float, neg_sorted: np.ndarray | None) -> float:
    kept = _pro_kept(px, max_fpr, neg_sorted)
    if isinstance(kept, str):
        return _undefined("AUPRO", kept)
    pos, weights, neg_sorted, n_neg = kept
    return _aupro_curve_area(pos, weights, neg_sorted, n_neg, neg_sorted.size, max_fpr)


def aupro(masks, maps, max_fpr: float = 0.3) -> float:
    """Exact normalised area under the PRO curve up to `max_fpr` (SPEC §6). [N, H, W] each.

    Regions are the 8-connected components of each image's mask. At every distinct
    threshold t: PRO = mean over all regions of all images of the fraction of the region
    scoring >= t; FPR = share of all normal pixels (of all images, defect-free ones
    included) scoring >= t. PRO is integrated over FPR on [0, max_fpr] by trapezoids, the
    curve linearly interpolated at max_fpr, and divided by max_fpr: a perfect map gives 1.
    """
    return _aupro_exact(_Pixels(masks, maps), _check_max_fpr(max_fpr), None)


def aupro_legacy(masks, maps, num_thresholds: int = 200, max_fpr: float = 0.3) -> float:
    """The older AUPRO of the MuSc / AnoVL / AnomalyCLIP / APRIL-GAN tables; use it only
    to reproduce those published numbers like for like (SPEC §6, §8).

    Thresholds: `np.arange(lo, hi, (hi - lo) / num_thresholds)` with lo, hi the min and
    max of all maps, computed in the maps' dtype as those scripts do (about
    num_thresholds values; hi itself excluded). A pixel is predicted anomalous when its
    score is strictly greater than the threshold. Per threshold PRO is the mean over
    8-connected regions of the covered fraction and FPR the share of normal pixels
    predicted anomalous. Thresholds with FPR < max_fpr are kept, their FPRs min-max
    rescaled to [0, 1], and PRO integrated over them by trapezoids (`sklearn.metrics.auc`).
    Unlike `aupro`, the result depends on the threshold grid and the rescaling. It is
    nan (with a warning) when fewer than two distinct FPRs are kept — as for a perfect
    map, whose FPR is 0 at every threshold below max_fpr (the scripts divide 0 by 0).
    """
    return _aupro_legacy(_Pixels(masks, maps), num_thresholds, max_fpr)


def _aupro_legacy(px: _Pixels, num_thresholds: int, max_fpr: float) -> float:
    y, s = px.y, px.s
    max_fpr = _check_max_fpr(max_fpr)
    if int(num_thresholds) < 1:
        raise ValueError(f"num_thresholds must be >= 1, got {num_thresholds}")
    weights, n_neg, why = _pro_inputs(px)
    if why:
        return _undefined("AUPRO (legacy)", why)
    lo, hi = s.min(), s.max()
    if lo == hi:
        return _undefined("AUPRO (legacy)", "all map values are equal")
    thresholds = np.arange(lo, hi, (hi - lo) / int(num_thresholds)).astype(np.float64)
    t = thresholds.size
    # Pixel above threshold k  <=>  k < (number of thresholds strictly below the pixel).
    n_below_pos = np.searchsorted(thresholds, s[y], side="left")
    n_below_neg = np.searchsorted(thresholds, s[~y], side="left")
    pro_hist = np.bincount(n_below_pos, weights=weights, minlength=t + 1)
    neg_hist = np.bincount(n_below_neg, minlength=t + 1).astype(np.int64)
    pro = np.cumsum(pro_hist[::-1])[::-1][1:]  # pro[k] = sum over n_below > k
    fpr = np.cumsum(neg_hist[::-1])[::-1][1:] / n_neg
    keep = fpr < max_fpr
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return _undefined("AUPRO (legacy)", f"fewer than two distinct FPRs below {max_fpr}")
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    # FPR falls as the threshold rises: integrate in ascending FPR order.
    return float(np.trapezoid(pro[::-1], fpr[::-1]))


# ------------------------------------------------------------ public: pixel
def pixel_metrics(masks, maps, *, aupro: str | None = "exact", max_fpr: float = 0.3) -> dict[str, float]:
    """pixel_AUROC, pixel_AP, pixel_F1Max and pixel_AUPRO over all pixels. [N, H, W] each.

    aupro: "exact" (default, `aupro`), "legacy" (`aupro_legacy` with 200 thresholds, for
    published MuSc/AnoVL/AnomalyCLIP tables) or None to skip it (key omitted). The
    negatives are sorted once and shared by all four metrics.
    """
    if aupro not in ("exact", "legacy", None):
        raise ValueError(f"aupro must be 'exact', 'legacy' or None, got {aupro!r}")
    px = _Pixels(masks, maps)
    y, s = px.y, px.s
    max_fpr = _check_max_fpr(max_fpr)
    neg_sorted = np.sort(s[~y])
    r = _Ranking(s[y], neg_sorted)
    out = {"pixel_AUROC": r.auroc(), "pixel_AP": r.average_precision(), "pixel_F1Max": r.f1_max()}
    if aupro == "exact":
        out["pixel_AUPRO"] = _aupro_exact(px, max_fpr, neg_sorted)
    elif aupro == "legacy":
        out["pixel_AUPRO"] = _aupro_legacy(px, 200, max_fpr)
    return out
