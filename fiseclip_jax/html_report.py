"""report.html: one self-contained page a person reads to trust or debug a detector.

Built only from the files `evaluate` leaves in OUT/<method>/<dataset>/ (results.json, and per
category metrics.json, scores.csv, thresholds.json, report_data.json, gallery/*.png), so
`fiseclip-jax report DIR` rebuilds it for any finished (or interrupted) run. Per category and for
the mean: the metric table, image ROC and PR, pixel ROC and PR, the PRO curve up to FPR 0.3 with
its integrated area shaded, a histogram of good vs defective image scores with the thresholds
marked, the confusion counts at those thresholds and a gallery of the worst cases. Every picture is
a PNG embedded as base64 (no external file, no script, no network). Plots use matplotlib's Agg
canvas directly, so no global backend is changed.

Image curves are recomputed from scores.csv with `curves.roc_curve` / `pr_curve`, the ranking that
computes image_AUROC / image_AP; the areas written beside the plotted curves are integrated from
the plotted points. Pixel curves were saved (thinned to at most 1500 vertices) while the maps were in
memory, so the report never needs the maps again; their legends quote metrics.json.

`table_page` / `write_table_report` render any table (e.g. of a parameter sweep) the same way.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from .curves import f1_threshold, fpr_threshold, integrate, pr_curve, roc_curve
from .errors import FiseclipError
from .outputs import atomic_write_text
from .report import METRIC_NAMES, percent

SECTIONS = ("Metrics", "Image ROC", "Image PR", "Pixel ROC", "Pixel PR", "PRO curve", "Score histogram",
            "Confusion counts", "Gallery")
_GOOD, _BAD, _MEAN = "#1f77b4", "#d62728", "#000000"

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em auto;max-width:1180px;
color:#222;background:#fff;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:.8em 0 .3em}.note{color:#555;font-size:.92em}
.warn{background:#fff3cd;border:1px solid #e0b400;padding:.6em 1em;font-weight:bold;margin:1em 0}
table{border-collapse:collapse;margin:.4em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th:first-child,td:first-child{text-align:left}
th{background:#f2f2f2}tr.mean td{font-weight:bold}
.plots{display:flex;flex-wrap:wrap;gap:.6em}.plot{flex:0 0 auto;width:370px}.plot img{width:370px;display:block}
.gallery{display:flex;flex-wrap:wrap;gap:1em}
.gallery figure{margin:0;font-size:.85em;width:390px;overflow-wrap:anywhere}
.gallery img{width:390px;image-rendering:pixelated;display:block;border:1px solid #999}
nav a{margin-right:.8em}
"""


# ----------------------------------------------------------------- building blocks
def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only when a report is drawn: 0.3 s of start-up

    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[object, object]:
    from matplotlib.figure import Figure  # only when a report is drawn (`detect` never loads matplotlib)

    fig = Figure(figsize=(3.7, 3.1), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot(title: str, fig, caption: str = "") -> str:
    alt = html.escape(f"{title}: {caption}" if caption else title)
    cap = f'<p class="note">{html.escape(caption)}</p>' if caption else ""
    return (f'<div class="plot"><h3>{html.escape(title)}</h3><img alt="{alt}" '
            f'src="{png_data_uri(figure_png(fig))}">{cap}</div>')


def _missing(title: str, why: str) -> str:
    return f'<div class="plot"><h3>{html.escape(title)}</h3><p class="note">{html.escape(why)}</p></div>'


def table_html(head: list[str], rows: list[list], mean_row: bool = False) -> str:
    """An HTML table; with mean_row the last row is set in bold."""
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"]
    for k, r in enumerate(rows):
        cls = ' class="mean"' if mean_row and k == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def page(title: str, body: list[str], *, warning: str | None = None, note: str = "") -> str:
    """A complete self-contained HTML page: inline CSS, no script, no external resource."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if warning:
        parts.append(f'<div class="warn">{html.escape(warning)}</div>')
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts += body
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def table_page(title: str, head: list[str], rows: list[list], *, note: str = "", warning: str | None = None,
               figures: list[tuple[str, object]] = ()) -> str:
    """A page of one table (and optional matplotlib figures), for results that are not one evaluate run
    (a parameter sweep: one row per setting)."""
    body = [table_html(head, rows)]
    if figures:
        body.append('<div class="plots">' + "".join(_plot(t, f) for t, f in figures) + "</div>")
    return page(title, body, warning=warning, note=note)


def write_table_report(path, title: str, head: list[str], rows: list[list], **kw) -> Path:
    """`table_page` written atomically to `path`; returns it."""
    path = Path(path)
    atomic_write_text(path, table_page(title, head, rows, **kw))
    return path


# ----------------------------------------------------------------- one category's data
def read_scores(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(scores [N] float64, labels [N] int or None when any image is unlabelled) of a scores.csv."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    scores = np.array([float(r["score"]) for r in rows], np.float64)
    if any(r["label"] == "" for r in rows):
        return scores, None
    return scores, np.array([int(r["label"]) for r in rows], np.int64)


def image_curves(labels, scores) -> dict:
    """The image-level curves the report plots, from the metrics' ranking: {"roc": (fpr, tpr),
    "pr": (recall, precision)}; None where a class is missing."""
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        return {"roc": None, "pr": None}
    recall, precision, _ = pr_curve(y, scores)
    return {"roc": roc_curve(y, scores), "pr": (recall, precision)}


def _step_pr(recall, precision):
    """The AP step curve as a polyline: precision[k] held on (recall[k-1], recall[k]]."""
    r = np.repeat(np.r_[0.0, recall], 2)[1:-1]
    p = np.repeat(np.asarray(precision), 2)
    return r, p


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _confusion(scores, labels, threshold: float) -> dict:
    flag = scores > threshold
    tp, fp = int(np.sum(flag & (labels == 1))), int(np.sum(flag & (labels == 0)))
    fn, tn = int(np.sum(~flag & (labels == 1))), int(np.sum(~flag & (labels == 0)))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _image_thresholds(thresholds: dict | None, scores, labels, fpr: float) -> dict:
    """{rule: threshold} from thresholds.json, else computed from scores.csv (runs made before it)."""
    got = (thresholds or {}).get("image") or {}
    out = {}
    if "f1" in got:
        out["F1-optimal"] = got["f1"]["threshold"]
    elif labels.min() != labels.max():
        out["F1-optimal"] = f1_threshold(labels, scores)["threshold"]
    if "at_fpr" in got:
        out[f"FPR {got['at_fpr']['target_fpr']:g} on good"] = got["at_fpr"]["threshold"]
    elif (labels == 0).any():
        out[f"FPR {fpr:g} on good"] = fpr_threshold(scores[labels == 0], fpr)["threshold"]
    return out


# ----------------------------------------------------------------- plots
def _curves_fig(curves, title: str, xlabel: str, ylabel: str, legend: str, mean=None, diagonal: bool = False):
    """One category's curve, or every category's (thinner) with their vertical average."""
    fig, ax = _figure(title, xlabel, ylabel)
    if diagonal:
        ax.plot([0, 1], [0, 1], ls=":", color="#999", lw=0.8)
    for label, x, y, color in curves:
        ax.plot(x, y, lw=1.4 if mean is None else 0.9, color=color, label=label, alpha=1 if mean is None else 0.6)
    if mean is not None:
        ax.plot(*mean, color=_MEAN, lw=1.8, label="mean (vertical average)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc=legend)
    return fig


def _roc_fig(curves: list[tuple[str, np.ndarray, np.ndarray, str]], title: str, mean=None):
    return _curves_fig(curves, title, "false-positive rate", "true-positive rate", "lower right", mean, diagonal=True)


def _pr_fig(curves, title: str, mean=None):
    return _curves_fig(curves, title, "recall", "precision", "lower left", mean)


def _pro_fig(curves, title: str, max_fpr: float, mean=None):
    fig, ax = _figure(title, "false-positive rate (normal pixels)", "per-region overlap")
    for label, x, y, color in curves:
        if mean is None:
            ax.fill_between(x, y, color=color, alpha=0.25, lw=0)
        ax.plot(x, y, lw=1.4 if mean is None else 0.9, color=color, label=label, alpha=1 if mean is None else 0.6)
    if mean is not None:
        ax.fill_between(*mean, color=_MEAN, alpha=0.15, lw=0)
        ax.plot(*mean, color=_MEAN, lw=1.8, label="mean (vertical average)")
    ax.set_xlim(0, max_fpr)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def _hist_fig(scores, labels, thresholds: dict, title: str):
    fig, ax = _figure(title, "image score", "images")
    edges = np.histogram_bin_edges(scores, bins=int(np.clip(scores.size // 3, 5, 40)))
    ax.hist([scores[labels == 0], scores[labels == 1]], bins=edges, color=[_GOOD, _BAD],
            label=[f"good ({int(np.sum(labels == 0))})", f"defective ({int(np.sum(labels == 1))})"])
    for (name, t), ls in zip(thresholds.items(), ("-", "--")):
        ax.axvline(t, color="#333", ls=ls, lw=1.2, label=f"{name}: {t:.4g}")
    ax.legend(fontsize=7)
    return fig


def _vertical_mean(curves, grid):
    ys = [np.interp(grid, x, y) for _, x, y, _ in curves]
    return grid, np.mean(ys, 0)


def _colors(n: int) -> list[str]:
    cycle = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
             "#bcbd22", "#17becf"]
    return [cycle[k % len(cycle)] for k in range(n)]


def _fmt_pct(v) -> str:
    return "n/a" if v is None else f"{percent(v):.1f}"


# ----------------------------------------------------------------- sections
class _Category:
    """What the report shows of one category, read from its folder."""

    def __init__(self, folder: Path, fpr: float):
        self.name = folder.name
        self.record = json.loads((folder / "metrics.json").read_text())
        self.metrics = self.record.get("metrics", {})
        self.scores, self.labels = read_scores(folder / "scores.csv")
        self.thresholds = _read_json(folder / "thresholds.json")
        data = _read_json(folder / "report_data.json") or {}
        self.pixel = data.get("pixel_curves")
        self.gallery = [dict(g, png=folder / g["png"]) for g in data.get("gallery", [])]
        self.image = image_curves(self.labels, self.scores) if self.labels is not None else \
            {"roc": None, "pr": None}
        self.cuts = _image_thresholds(self.thresholds, self.scores, self.labels, fpr) \
            if self.labels is not None else {}


def _confusion_table(entries: list[tuple[str, float | None, dict]]) -> str:
    rows = []
    for rule, t, c in entries:
        pos, neg, flagged = c["tp"] + c["fn"], c["fp"] + c["tn"], c["tp"] + c["fp"]
        rows.append([rule, "" if t is None else f"{t:.6g}", c["tp"], c["fp"], c["fn"], c["tn"],
                     f"{c['tp'] / flagged:.3f}" if flagged else "n/a", f"{c['tp'] / pos:.3f}" if pos else "n/a",
                     f"{c['fp'] / neg:.3f}" if neg else "n/a"])
    return table_html(["threshold rule", "threshold", "TP", "FP", "FN", "TN", "precision", "recall", "FPR"], rows)


def _category_section(c: _Category, metric_names: list[str]) -> str:
    parts = [f'<h2 id="cat-{html.escape(c.name)}">{html.escape(c.name)}</h2>']
    n_good, n_bad = c.record.get("n_normal", 0), c.record.get("n_anomalous", 0)
    parts.append(f'<p class="note">{c.record.get("n_images", c.scores.size)} images: {n_good} good, {n_bad} '
                 f'defective{", unlabelled: " + str(c.record["n_unlabelled"]) if c.record.get("n_unlabelled") else ""}'
                 f'. {html.escape(c.record.get("note", ""))}</p>')
    parts.append("<h3>Metrics</h3>")
    parts.append(table_html(metric_names, [[_fmt_pct(c.metrics.get(m)) for m in metric_names]])
                 if metric_names else '<p class="note">No labels: scores only.</p>')
    plots = []
    if c.image["roc"] is not None:
        fpr, tpr = c.image["roc"]
        label = f"AUROC {100 * integrate(fpr, tpr):.1f}"
        plots.append(_plot("Image ROC", _roc_fig([(label, fpr, tpr, _BAD)], f"{c.name}: image ROC"),
                           f"area under the plotted curve: {label}"))
        recall, precision = c.image["pr"]
        r, p = _step_pr(recall, precision)
        label = f"AP {100 * integrate(r, p):.1f}"
        plots.append(_plot("Image PR", _pr_fig([(label, r, p, _BAD)], f"{c.name}: image PR"),
                           f"area under the plotted steps: {label}"))
    else:
        plots += [_missing("Image ROC", "needs good and defective images"),
                  _missing("Image PR", "needs good and defective images")]
    px = c.pixel
    if px is not None:
        plots.append(_plot("Pixel ROC", _roc_fig(
            [(f"AUROC {_fmt_pct(c.metrics.get('pixel_AUROC'))}", px["roc"]["fpr"], px["roc"]["tpr"], _BAD)],
            f"{c.name}: pixel ROC"), f"metrics.json: AUROC {_fmt_pct(c.metrics.get('pixel_AUROC'))} "
            f"(curve thinned to {len(px['roc']['fpr'])} points)"))
        plots.append(_plot("Pixel PR", _pr_fig(
            [(f"AP {_fmt_pct(c.metrics.get('pixel_AP'))}", px["pr"]["recall"], px["pr"]["precision"], _BAD)],
            f"{c.name}: pixel PR"), f"metrics.json: AP {_fmt_pct(c.metrics.get('pixel_AP'))} "
            f"(curve thinned to {len(px['pr']['recall'])} points)"))
        if px.get("pro") is not None:
            pro = px["pro"]
            area = integrate(pro["fpr"], pro["pro"]) / pro["max_fpr"]
            label = f"AUPRO {100 * area:.1f}"
            plots.append(_plot("PRO curve", _pro_fig([(f"{label} (shaded / {pro['max_fpr']:g})",
                                                        pro["fpr"], pro["pro"], _BAD)],
                                                      f"{c.name}: PRO up to FPR {pro['max_fpr']:g}", pro["max_fpr"]),
                               f"shaded area / {pro['max_fpr']:g} (plotted, thinned): {label}; "
                               f"metrics.json: {_fmt_pct(c.metrics.get('pixel_AUPRO'))}"))
        else:
            plots.append(_missing("PRO curve", "no defect region"))
    else:
        why = "no masks (or no defect pixels), or a run made before report_data.json"
        plots += [_missing(t, why) for t in ("Pixel ROC", "Pixel PR", "PRO curve")]
    if c.labels is not None:
        plots.append(_plot("Score histogram", _hist_fig(c.scores, c.labels, c.cuts, f"{c.name}: image scores"),
                           "vertical lines: the thresholds of thresholds.json"))
    else:
        plots.append(_missing("Score histogram", "needs labels"))
    parts.append('<div class="plots">' + "".join(plots) + "</div>")
    parts.append("<h3>Confusion counts</h3>")
    if c.labels is not None and c.cuts:
        parts.append('<p class="note">Image level; an image is called defective when its score is above the '
                     'threshold (the thresholds of thresholds.json, for <code>detect --thresholds</code>).</p>')
        parts.append(_confusion_table([(rule, t, _confusion(c.scores, c.labels, t)) for rule, t in c.cuts.items()]))
    else:
        parts.append('<p class="note">Needs labels.</p>')
    parts.append("<h3>Gallery</h3>")
    if c.gallery:
        parts.append('<p class="note">Worst cases first: the highest-scored good images, then the lowest-scored '
                     'defective ones. Each: image | ground-truth mask | anomaly-map overlay (one colour scale per '
                     'category).</p><div class="gallery">')
        rule, cut = next(iter(c.cuts.items()), (None, None))
        for g in c.gallery:
            kind = {0: "good", 1: "defective"}.get(g["label"], "unlabelled")
            called = "" if cut is None else \
                f" · called {'defective' if g['score'] > cut else 'good'} at the {rule} threshold"
            cap = f"{kind} · score {g['score']:.6g}{called} · {g['file']}"
            try:
                src = png_data_uri(Path(g["png"]).read_bytes())
            except FileNotFoundError:
                continue
            parts.append(f'<figure><img alt="{html.escape(cap)}" src="{src}"><figcaption>{html.escape(cap)}'
                         "</figcaption></figure>")
        parts.append("</div>")
    else:
        parts.append('<p class="note">No gallery (no labelled images, or a run made before gallery/).</p>')
    return "\n".join(parts)


def _metric_table(results: dict, cats: list[_Category]) -> str:
    names = results.get("metric_names", [])
    rows = [[c.name, c.record.get("n_images", "")] + [_fmt_pct(c.metrics.get(m)) for m in names] for c in cats]
    mean = results.get("mean", {}).get("metrics", {})
    rows.append(["mean", sum(int(c.record.get("n_images", 0)) for c in cats)] + [_fmt_pct(mean.get(m)) for m in names])
    return table_html(["category", "N"] + names, rows, mean_row=True)


def _summary_section(results: dict, cats: list[_Category]) -> str:
    mean = results.get("mean", {}).get("metrics", {})
    parts = ['<h2 id="mean">Mean over categories</h2>', "<h3>Metrics</h3>", _metric_table(results, cats)]
    colors = _colors(len(cats))
    plots = []
    roc = [(f"{c.name} {_fmt_pct(c.metrics.get('image_AUROC'))}", *c.image["roc"], col)
           for c, col in zip(cats, colors) if c.image["roc"] is not None]
    pr = [(f"{c.name} {_fmt_pct(c.metrics.get('image_AP'))}", *_step_pr(*c.image["pr"]), col)
          for c, col in zip(cats, colors) if c.image["pr"] is not None]
    grid = np.linspace(0.0, 1.0, 201)
    plots.append(_plot("Image ROC", _roc_fig(roc, "image ROC, all categories", _vertical_mean(roc, grid)))
                 if roc else _missing("Image ROC", "needs good and defective images"))
    plots.append(_plot("Image PR", _pr_fig(pr, "image PR, all categories", _vertical_mean(pr, grid)))
                 if pr else _missing("Image PR", "needs good and defective images"))
    with_px = [(c, col) for c, col in zip(cats, colors) if c.pixel is not None]
    if with_px:
        proc = [(c.name, c.pixel["roc"]["fpr"], c.pixel["roc"]["tpr"], col) for c, col in with_px]
        ppr = [(c.name, c.pixel["pr"]["recall"], c.pixel["pr"]["precision"], col) for c, col in with_px]
        plots.append(_plot("Pixel ROC", _roc_fig(proc, "pixel ROC, all categories", _vertical_mean(proc, grid))))
        plots.append(_plot("Pixel PR", _pr_fig(ppr, "pixel PR, all categories", _vertical_mean(ppr, grid))))
        pros = [(c.name, c.pixel["pro"]["fpr"], c.pixel["pro"]["pro"], col) for c, col in with_px
                if c.pixel.get("pro") is not None]
        if pros:
            max_fpr = with_px[0][0].pixel["pro"]["max_fpr"] if with_px[0][0].pixel.get("pro") else 0.3
            mean_pro = _vertical_mean(pros, np.linspace(0.0, max_fpr, 201))
            plots.append(_plot("PRO curve", _pro_fig(
                pros, f"PRO up to FPR {max_fpr:g}; mean AUPRO {_fmt_pct(mean.get('pixel_AUPRO'))}", max_fpr, mean_pro)))
        else:
            plots.append(_missing("PRO curve", "no defect region"))
    else:
        plots += [_missing(t, "no pixel curves") for t in ("Pixel ROC", "Pixel PR", "PRO curve")]
    plots.append(_missing("Score histogram", "scores of different categories are not on one scale: "
                          "see each category's histogram"))
    parts.append('<div class="plots">' + "".join(plots) + "</div>")
    parts.append("<h3>Confusion counts</h3>")
    entries = {}
    for c in cats:
        for k, (rule, t) in enumerate(c.cuts.items()):
            got = _confusion(c.scores, c.labels, t)
            acc = entries.setdefault(k, [rule.split(" on ")[0] + " (each category's own)", None,
                                         {"tp": 0, "fp": 0, "fn": 0, "tn": 0}])
            for key in got:
                acc[2][key] += got[key]
    parts.append(_confusion_table([tuple(e) for e in entries.values()]) if entries
                 else '<p class="note">Needs labels.</p>')
    parts.append("<h3>Gallery</h3>")
    parts.append('<p class="note">' + " ".join(f'<a href="#cat-{html.escape(c.name)}">{html.escape(c.name)}</a>'
                                                for c in cats) + " (one gallery per category)</p>")
    return "\n".join(parts)


def render_report(base) -> str:
    """The report.html text of an evaluate results folder OUT/<method>/<dataset>/."""
    base = Path(base)
    results = _read_json(base / "results.json")
    if results is None:
        raise FiseclipError(f"{base}: no results.json (give the folder OUT/<method>/<dataset> of an evaluate run)")
    run = _read_json(base / "run.json") or {}
    fpr = float(run.get("run_config", {}).get("fpr", 0.01))
    cats = [_Category(base / name, fpr) for name in results["categories"]]
    names = [m for m in results.get("metric_names", []) if m in METRIC_NAMES]
    title = f"{results['method']} on {results['dataset']}"
    warning = None
    if results.get("random_weights"):
        warning = (f"RANDOM WEIGHTS ({results.get('weights')}): every number and picture here is MEANINGLESS; "
                   "this page only shows that the pipeline runs.")
    note = (f"Input size {results.get('size')}; mask rule {results.get('mask_rule')}; AUPRO {results.get('aupro')} "
            f"(FPR up to 0.3); image_AP {results.get('image_ap', 'average_precision')}; metric resolution "
            f"{results.get('metric_resolution', 'input')}; run status {run.get('status', 'unknown')}. "
            "Percent, 1 decimal.")
    nav = "<nav>" + "".join(f'<a href="#cat-{html.escape(c.name)}">{html.escape(c.name)}</a>' for c in cats) + \
        '<a href="#mean">mean over categories</a></nav>'
    # The table first; then each category; the curves of all categories together last.
    body = [nav, '<h2 id="summary">Summary</h2>', _metric_table(results, cats)]
    body += [_category_section(c, names) for c in cats] + [_summary_section(results, cats)]
    return page(title, body, warning=warning, note=note)


def write_report(base) -> Path:
    """Write base/report.html atomically (from the files of an evaluate results folder); returns its path."""
    base = Path(base)
    text = render_report(base)
    atomic_write_text(base / "report.html", text)
    return base / "report.html"


def find_results(folder) -> Path:
    """The evaluate results folder (the one holding results.json) at or up to two levels under `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FiseclipError(f"{folder}: not a folder")
    if (folder / "results.json").is_file():
        return folder
    found = sorted(p.parent for pattern in ("*/results.json", "*/*/results.json") for p in folder.glob(pattern))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FiseclipError(f"{folder}: no results.json in it or two levels under it (an evaluate --out folder, "
                            "or OUT/<method>/<dataset>)")
    raise FiseclipError(f"{folder}: several results folders ({', '.join(str(p) for p in found)}): give one")
