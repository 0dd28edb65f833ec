"""Evaluation tables (anomalib names, SPEC §6): results.md / results.csv / results.json.

Built only from the per-category `metrics.json` files, so a table can always be rebuilt
from what finished. Percent with 1 decimal in the Markdown and CSV tables; results.json
keeps the float64 fractions too. The mean row averages the fractions (then rounds); a
metric that is undefined (null) in any category has no mean (null), rather than a mean
over fewer categories.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .outputs import atomic_write_text

METRIC_NAMES = ("image_AUROC", "image_AP", "image_F1Max",
                "pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO")


def clean(value):
    """float (nan -> None) for JSON: strict JSON has no NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def percent(fraction):
    return None if fraction is None else round(100.0 * fraction, 1)


def percents(metrics: dict) -> dict:
    return {k: percent(v) for k, v in metrics.items()}


def mean_metrics(per_category: list[dict]) -> dict:
    """Mean fraction of each metric present in every category; None where any is None."""
    names = [m for m in METRIC_NAMES if per_category and all(m in c for c in per_category)]
    out = {}
    for m in names:
        values = [c[m] for c in per_category]
        out[m] = None if any(v is None for v in values) else math.fsum(values) / len(values)
    return out


def build_results(base: Path, names: list[str], header: dict) -> dict:
    """The results.json record from `base/<name>/metrics.json` of each finished category."""
    categories = {}
    for name in names:
        rec = json.loads((base / name / "metrics.json").read_text())
        categories[name] = {k: rec[k] for k in ("n_images", "n_normal", "n_anomalous", "n_unlabelled",
                                                "n_unreadable", "metrics", "percent", "metric_sizes") if k in rec}
    mean = mean_metrics([c["metrics"] for c in categories.values()])
    return {**header, "metric_names": [m for m in METRIC_NAMES if m in mean] if categories else [],
            "categories": categories,
            "mean": {"n_categories": len(categories), "metrics": mean, "percent": percents(mean)}}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _rows(results: dict) -> tuple[list[str], list[list[str]]]:
    names = results["metric_names"]
    head = ["category", "N"] + names
    rows = [[cat, str(c["n_images"])] + [_fmt(c["percent"].get(m)) for m in names]
            for cat, c in results["categories"].items()]
    if results["categories"]:
        n = sum(c["n_images"] for c in results["categories"].values())
        rows.append(["mean", str(n)] + [_fmt(results["mean"]["percent"].get(m)) for m in names])
    return head, rows


def markdown(results: dict) -> str:
    size = results["size"]
    lines = [f"# {results['method']} on {results['dataset']}", ""]
    if results.get("random_weights"):
        lines += [f"> **RANDOM WEIGHTS ({results['weights']}): these numbers are MEANINGLESS.** "
                  "They only show that the pipeline runs.", ""]
    n = results["mean"]["n_categories"]
    rule = {"strict": "strict: only fully white pixels", "resize>0": "> 0: every nonzero pixel"}.get(
        results["mask_rule"], "> 0.5")
    if results.get("metric_resolution", "input") == "original":
        pixels = ("Pixel metrics at each image's original resolution: maps resized bilinearly to it, "
                  "masks as stored")
    else:
        sizes = sorted({sz for c in results["categories"].values() for sz in c.get("metric_sizes", ())})
        pixels = (f"Pixel metrics at the anomaly-map resolution ({', '.join(sizes) or 'the input size'}): "
                  f"masks resized to it and binarised ({rule})")
    ap = "auc(recall, precision), AnoVL's column" if results.get("image_ap") == "pr_auc" else "average precision"
    protocol = f"Protocol {results['protocol']}. " if results.get("protocol") else ""
    lines += [f"{protocol}Percent, 1 decimal; mean over {n} categor{'y' if n == 1 else 'ies'} "
              f"(of the fractions). Input size {size} ({results.get('resample', 'bicubic')} resize). {pixels}; "
              f"AUPRO: {results['aupro']} (FPR up to 0.3); image_AP: {ap}.", ""]
    head, rows = _rows(results)
    if not results["metric_names"]:
        lines += ["No labels: scores only (see each category's scores.csv).", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in rows:
        cells = [f"**{c}**" if r[0] == "mean" else c for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    head, rows = _rows(results)
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([[c if c != "n/a" else "" for c in r] for r in rows])
    return buf.getvalue()


def write_tables(base: Path, names: list[str], header: dict) -> dict:
    """Rebuild results.md / .csv / .json (each written atomically) from finished categories."""
    results = build_results(base, names, header)
    atomic_write_text(base / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(base / "results.csv", csv_text(results))
    atomic_write_text(base / "results.md", markdown(results))
    return results
