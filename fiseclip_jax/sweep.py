"""`sweep`: one method over a grid of its options on a dataset, each image encoded once per distinct encoding.

    grid = parse_grid(["fusion_weight=0.3,0.5,0.7", "theta=0.4,0.6"])     # the product: 6 configurations
    rows = sweep(params, cfg, "mvtec", root, FiSeCLIPConfig(), grid, categories=["bottle"], size=224,
                 out="ablation/", cache="feats/")

Grid points are ordered so that those sharing their encoding (`Method.encoding_fields`) run one
after the other; every image goes through a `features.FeatureCache` (`cache`, or a temporary one
under OUT/.features removed when the sweep completes), so the forward pass runs once per image
and distinct encoding, and every grid point only scores. Each configuration is evaluated exactly
as `evaluate.evaluate_category` does (same metrics, SPEC §6) on every category.

Layout under OUT:
  rows/<id>/run.json   one per configuration, written atomically when it finishes: the swept values,
                       the full run configuration (`evaluate.run_config`: method config, weights, size,
                       protocol...), the mean and per-category metrics, seconds. `evaluate --config
                       rows/<id>/run.json` reruns it exactly.
  ablation.csv / .md   one row per configuration: swept values, every metric (percent, mean over the
                       categories), seconds; sorted by `sort` (best first). Rebuilt after every row.
  run.json             the sweep: base method, grid, fixed settings, status.
A rerun with the same options skips every row whose run.json holds the same run configuration, so
an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .cache import MemoryLRU, key_digest
from .errors import FiseclipError
from .data import validate_category
from .evaluate import check_settings, evaluate_category, list_categories, run_config
from .features import FeatureCache
from .outputs import atomic_write_text, library_versions
from .overrides import apply_overrides, format_value
from .report import METRIC_NAMES, mean_metrics, percents

SORT_KEYS = METRIC_NAMES + ("seconds",)


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """["KEY=V1,V2", ...] -> {KEY: [V1, V2]}. Alternatives are separated by ',' or, when the value holds a
    ';', by ';' (for tuple fields: "layers=3,6,9,12;6,12" is two alternatives)."""
    grid: dict[str, list[str]] = {}
    for item in items or ():
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise FiseclipError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid theta=0.4,0.5,0.6)")
        parts = values.split(";") if ";" in values else values.split(",")
        grid[key] = [p.strip() for p in parts if p.strip()]
    return grid


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One configuration: its swept `values` ({key: value as given}), the resolved `method`, and `row`,
    a stable id (digest of the method config) naming its folder under OUT/rows."""

    values: dict
    method: Any
    row: str


def grid_points(method, grid: Mapping[str, Sequence[Any]]) -> list[GridPoint]:
    """The product of the grid applied to `method` (each point validated by `apply_overrides`), duplicates
    dropped, ordered so that points sharing their encoding are consecutive (grid order otherwise)."""
    keys = list(grid)
    for k in keys:
        if not grid[k]:
            raise FiseclipError(f"--grid {k}: no values")
    points, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        m = apply_overrides(method, values, source="--grid")
        row = key_digest(m.record())[:12]
        if row not in seen:
            seen.add(row)
            points.append(GridPoint({k: format_value(v) if not isinstance(v, str) else v for k, v in values.items()},
                                    m, row))
    order = {}
    for p in points:
        order.setdefault(_encoding_key(p.method), len(order))
    return sorted(points, key=lambda p: order[_encoding_key(p.method)])


def _encoding_key(method) -> str:
    return json.dumps({f: getattr(method, f) for f in method.encoding_fields}, sort_keys=True, default=str)


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by a killed run: the row is computed again


def _fmt(value, digits) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_ablation(out: Path, keys: list[str], rows: list[dict], sort: str) -> list[dict]:
    """ablation.csv (percent, 3 decimals) and ablation.md (1 decimal) from finished rows, sorted by `sort`
    (descending; seconds ascending; rows without the metric last). Returns the sorted rows."""
    def order(r):
        v = r["seconds"] if sort == "seconds" else r["mean"]["metrics"].get(sort)
        return (v is None, 0 if v is None else (v if sort == "seconds" else -v))

    rows = sorted(rows, key=order)
    names = [m for m in METRIC_NAMES if any(m in r["mean"]["metrics"] for r in rows)]
    head = keys + names + ["seconds", "row"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        frac = r["mean"]["metrics"]
        w.writerow([r["values"][k] for k in keys] + [_fmt(None if frac.get(m) is None else 100 * frac[m], 3)
                                                     for m in names] + [f"{r['seconds']:.2f}", r["row"]])
    atomic_write_text(out / "ablation.csv", buf.getvalue())
    first = rows[0]["run_config"] if rows else {}
    lines = [f"# {first.get('method', '')} sweep on {first.get('dataset', '')}", ""]
    if first.get("random_weights"):
        lines += ["**Random weights: every metric is meaningless** (a pipeline check only).", ""]
    lines += [f"Sorted by {sort}; metrics in percent, mean over the categories; seconds per configuration "
              "(the first of each encoding includes encoding).", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        pct = r["mean"]["percent"]
        lines.append("| " + " | ".join([r["values"][k] for k in keys] + [_fmt(pct.get(m), 1) for m in names]
                                       + [f"{r['seconds']:.1f}", r["row"]]) + " |")
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    return rows


def sweep(params, cfg, dataset: str, root, method, grid: Mapping[str, Sequence[Any]], *, out, categories=None,
          masks=None, size: int | None = None, cache=None, sort: str = "pixel_AUROC", progress: bool = True,
          weights: str = "", seed: int = 0, encode_batch: int = 8, aupro: str = "exact",
          mask_rule: str = "resize>0.5", resample: str = "bicubic", metric_resolution: str = "input",
          image_ap: str = "average_precision", class_names: str = "clean", protocol: str | None = None,
          say=lambda msg: None) -> list[dict]:
    """Evaluate every point of `grid` ({key: [values]}, text as for --set or typed) applied to `method` on
    the categories of a dataset; returns the finished rows sorted by `sort` (see the module docstring).

    cache: a folder or `FeatureCache` kept after the sweep (a rerun encodes nothing); None: a temporary
    cache under OUT/.features, removed when the sweep completes. Other options as `evaluate.evaluate`."""
    if sort not in SORT_KEYS:
        raise FiseclipError(f"--sort {sort!r}: allowed values: {', '.join(SORT_KEYS)}")
    points = grid_points(method, grid)
    mask_rule, size = check_settings(cfg, size=size, aupro=aupro, mask_rule=mask_rule,
                                     metric_resolution=metric_resolution, image_ap=image_ap, class_names=class_names)
    cats = list_categories(dataset, root, categories, masks)
    for cat in cats:  # every file checked before any compute; errors name the files
        validate_category(cat)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FiseclipError(f"--out {out}: exists and is not a folder")
    temporary = cache is None
    fcache = cache if isinstance(cache, FeatureCache) else FeatureCache(out / ".features" if temporary else cache)
    settings = dict(resample=resample, metric_resolution=metric_resolution, image_ap=image_ap,
                    class_names=class_names)
    keys = list(grid)
    out.mkdir(parents=True, exist_ok=True)
    run = {"command": "sweep", "method": method.label, "base_config": method.record(),
           "grid": {k: [format_value(v) if not isinstance(v, str) else v for v in vs] for k, vs in grid.items()},
           "rows": [p.row for p in points], "dataset": dataset, "categories": [c.name for c in cats],
           "size": size, "weights": weights, "sort": sort, "versions": library_versions(), "status": "running",
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if weights.startswith("random:"):
        run["warning"] = "random weights: every metric is meaningless"
    atomic_write_text(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")

    finished, todo = [], []
    for p in points:
        current = run_config(cfg, p.method, dataset=dataset, root=root, masks=masks, size=size, aupro=aupro,
                             mask_rule=mask_rule, weights=weights, seed=seed, encode_batch=encode_batch,
                             protocol=protocol, **settings)
        rec = _read(out / "rows" / p.row / "run.json")
        if rec is not None and rec.get("run_config") == current and rec.get("status") == "complete":
            finished.append({**rec, "values": p.values})  # this grid's names for the swept values
        else:
            todo.append((p, current))
    n_enc = len({_encoding_key(p.method) for p, _ in todo})
    say(f"{len(points)} configurations ({len(finished)} done before, {len(todo)} to run; {n_enc} distinct "
        f"encoding(s) of {sum(len(c) for c in cats)} images)")
    bar = tqdm(total=len(points), initial=len(finished), desc="sweep", unit="config", disable=not progress)
    memo = MemoryLRU(256 << 20)  # each category's masks loaded once, not once per configuration
    try:
        for p, current in todo:
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in p.values.items()))
            t0 = time.perf_counter()
            per_cat = {}
            for cat in cats:
                record, *_ = evaluate_category(params, cfg, cat, p.method, size=size, aupro=aupro,
                                               mask_rule=mask_rule, encode_batch=encode_batch, progress=progress,
                                               feature_cache=fcache, mask_memo=memo, **settings)
                per_cat[cat.name] = {k: record[k] for k in ("n_images", "n_normal", "n_anomalous", "metrics",
                                                            "percent", "timing_s") if k in record}
            mean = mean_metrics([c["metrics"] for c in per_cat.values()])
            rec = {"command": "sweep", "status": "complete", "row": p.row, "values": p.values,
                   "run_config": current, "mean": {"metrics": mean, "percent": percents(mean)},
                   "categories": per_cat, "seconds": time.perf_counter() - t0, "versions": library_versions()}
            if current["random_weights"]:
                rec["warning"] = "random weights: every metric is meaningless"
            (out / "rows" / p.row).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "rows" / p.row / "run.json", json.dumps(rec, indent=2) + "\n")
            finished.append(rec)
            write_ablation(out, keys, finished, sort)
            bar.update(1)
    finally:
        bar.close()
    rows = write_ablation(out, keys, finished, sort)
    if temporary:
        shutil.rmtree(out / ".features", ignore_errors=True)
    run.update(status="complete", feature_cache={"hits": fcache.hits, "misses": fcache.misses,
                                                 "folder": None if temporary else str(fcache.folder)})
    atomic_write_text(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")
    if progress:
        print(f"sweep: {len(rows)} configurations; feature cache {fcache.hits} hits, {fcache.misses} misses",
              file=sys.stderr)
    return rows


__all__ = ["GridPoint", "SORT_KEYS", "grid_points", "parse_grid", "sweep", "write_ablation"]
