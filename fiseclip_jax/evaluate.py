"""`evaluate`: datasets through one method, anomalib-style reports, resumable runs (SPEC §5–§6).

Layout under OUT/<method>/<dataset>/ (method: fiseclip | musc | anoclip | anoclip+):
  run.json                    exact configuration (method, CLIP, weights, size, root, categories,
                              mask rule, AUPRO variant, seed), library versions, status
  results.md / .csv / .json   one row per finished category and their mean (report.py)
  <category>/metrics.json     fractions and percent, counts, timings, the run configuration
  <category>/scores.csv       file (relative to the dataset root), label, score
  <category>/overlays/*.png   image | heat map | ground-truth mask, for the highest- and
                              lowest-scoring defects and normals
Metrics are computed at the anomaly-map resolution S x S: ground-truth masks are resized to
S x S and binarised at > 0.5 (or, mask_rule="strict", only fully white pixels count; SPEC §5).

Each category is written to a temporary folder and renamed into place when it finishes, and
the tables are rebuilt after every category, so a killed run loses at most the category in
progress. With resume=True, categories whose metrics.json exists are skipped, provided they
were computed with the same configuration; otherwise `ResumeError` is raised.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .data import Category, list_folder, list_mvtec, list_visa, load_image, load_mask, validate_category
from .detect import detect_category
from .errors import FiseclipError
from .metrics import image_metrics, pixel_metrics
from .overlay import side_by_side
from .report import clean, percents, write_tables
from .outputs import atomic_write_text, library_versions, overlay_name

DATASETS = ("mvtec", "visa", "folder")
MASK_RULES = {"resize>0.5": "resize>0.5", "resize": "resize>0.5", "strict": "strict"}
AUPRO_VARIANTS = ("exact", "legacy")


class ResumeError(FiseclipError):
    """--resume found results made with a different configuration."""


def list_categories(dataset: str, root, categories=None, masks=None) -> list[Category]:
    """The categories of a dataset (for "folder": `root` is one category; its name may be given)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if masks is not None and dataset != "folder":
        raise ValueError(f"a masks folder is only for --dataset folder ({dataset} has its own masks)")
    if isinstance(categories, str):
        categories = [categories]
    if dataset == "mvtec":
        return list_mvtec(root, categories)
    if dataset == "visa":
        return list_visa(root, categories)
    if categories and len(categories) > 1:
        raise ValueError("a folder dataset is one category: give at most one --category (its name)")
    return [list_folder(root, masks, name=categories[0] if categories else None)]


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def run_config(cfg, method, *, dataset, root, masks, size, aupro, mask_rule, weights, seed,
               encode_batch) -> dict:
    """Everything a result depends on; resume compares it key by key (JSON-normalised)."""
    return _jsonable({
        "method": method.label, "method_config": method.record(), "clip": cfg.to_dict(),
        "weights": weights, "random_weights": weights.startswith("random:"), "seed": seed,
        "dataset": dataset, "root": str(Path(root).resolve()),
        "masks": None if masks is None else str(Path(masks).resolve()),
        "size": size, "encode_batch": encode_batch, "mask_rule": mask_rule, "aupro": aupro,
        "metric_resolution": f"{size}x{size}",
    })


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _check_resume(recorded: dict | None, current: dict, where: Path) -> None:
    if recorded is not None and recorded != current:
        raise ResumeError(
            f"cannot resume: {where} was made with a different configuration ({_diff(recorded, current)}). "
            "Use the same options, another --out, or run without --resume to recompute everything.")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ResumeError(f"cannot resume: unreadable {path}: {err}") from None


def load_masks(cat: Category, size: int, strict: bool) -> np.ndarray:
    """bool [N, S, S]: each defect's mask resized to S (SPEC §5); normal images all False."""
    masks = np.zeros((len(cat), size, size), bool)
    for i, s in enumerate(cat.samples):
        if s.mask_path is not None:
            masks[i] = load_mask(s.mask_path, size, strict=strict)  # errors name the file
    return masks


def pick_overlays(labels, scores, k: int) -> list[tuple[int, str]]:
    """Up to k (index, tag): highest- and lowest-scoring of each group (defects, normals,
    unlabelled), taken in turns, e.g. defect_high1, normal_high1, defect_low1, normal_low1."""
    groups = []
    for label, tag in ((1, "defect"), (0, "normal"), (None, "image")):
        idx = sorted((i for i, l in enumerate(labels) if l == label), key=lambda i: (-scores[i], i))
        seq = []
        for j in range((len(idx) + 1) // 2):
            seq.append((idx[j], f"{tag}_high{j + 1}"))
            if len(idx) - 1 - j != j:
                seq.append((idx[len(idx) - 1 - j], f"{tag}_low{j + 1}"))
        if seq:
            groups.append(seq)
    picks, turn = [], 0
    while len(picks) < k and any(turn < len(g) for g in groups):
        picks += [g[turn] for g in groups if turn < len(g)][: k - len(picks)]
        turn += 1
    return picks


def _write_category(final: Path, cat: Category, root: Path, scores, maps, masks, record: dict,
                    overlays: int) -> None:
    """Everything of one category into a temporary folder, then renamed into place."""
    for stale in final.parent.glob(f".{final.name}.*-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    (tmp / "overlays").mkdir(parents=True)
    rels = [os.path.relpath(s.path, root) for s in cat.samples]
    with open(tmp / "scores.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "label", "score"])
        w.writerows([rel, "" if s.label is None else s.label, repr(float(x))]
                    for rel, s, x in zip(rels, cat.samples, scores))
    vmin, vmax = float(maps.min()), float(maps.max())
    common = os.path.commonpath([s.path for s in cat.samples]) if len(cat) > 1 else os.path.dirname(cat.samples[0].path)
    for i, tag in pick_overlays(cat.labels, scores, overlays):
        name = f"{tag}__{overlay_name(os.path.relpath(cat.samples[i].path, common))}"
        side_by_side(load_image(cat.samples[i].path), maps[i], vmin=vmin, vmax=vmax,
                     mask=None if masks is None else masks[i]).save(tmp / "overlays" / name)
    record["overlay_scale"] = [vmin, vmax]
    (tmp / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")  # last: marks completion
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _progress_factory(enabled: bool, label: str):
    from tqdm.auto import tqdm

    return lambda total, desc: tqdm(total=total, desc=label, unit="img", disable=not enabled)


def evaluate_category(params, cfg, cat: Category, method, *, size: int, aupro="exact", strict=False,
                      encode_batch=8, progress=True, mesh=None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Detect and score one category: (record, image_scores [N], anomaly_maps [N, S, S], masks [N, S, S] | None).

    Image metrics need every label; pixel metrics also need the dataset's masks."""
    t0 = time.perf_counter()
    result = detect_category(params, cfg, [s.path for s in cat.samples], cat.class_name, method, size=size,
                             encode_batch=encode_batch, progress=progress, mesh=mesh)
    scores = np.asarray(result.image_scores, np.float64)
    maps = np.asarray(result.anomaly_maps)
    t1 = time.perf_counter()
    labels = cat.labels
    labelled = all(l is not None for l in labels)
    masks = load_masks(cat, maps.shape[-1], strict) if labelled and cat.has_masks else None
    t2 = time.perf_counter()
    metrics = {}
    if labelled:
        metrics.update(image_metrics(np.asarray(labels, np.int64), scores))
    if masks is not None:
        metrics.update(pixel_metrics(masks, maps, aupro=aupro))
    metrics = {k: clean(v) for k, v in metrics.items()}
    t3 = time.perf_counter()
    record = {
        "category": cat.name, "class_name": cat.class_name, "dataset": cat.dataset,
        "n_images": len(cat), "n_normal": sum(l == 0 for l in labels),
        "n_anomalous": sum(l == 1 for l in labels), "n_unlabelled": sum(l is None for l in labels),
        "metrics": metrics, "percent": percents(metrics),
        "metric_resolution": f"{maps.shape[-1]}x{maps.shape[-1]}",
        "timing_s": {"detect": t1 - t0, "masks": t2 - t1, "metrics": t3 - t2},
    }
    if not labelled:
        record["note"] = "unlabelled images: scores only, no metrics"
    elif not cat.has_masks:
        record["note"] = "no masks: image metrics only"
    return record, scores, maps, masks


def evaluate(params, cfg, dataset: str, root, method, *, categories=None, size: int | None, out, masks=None,
             resume: bool = False, aupro: str = "exact", mask_rule: str = "resize>0.5",
             overlays_per_category: int = 4, progress: bool = True, mesh=None, weights: str = "",
             seed: int = 0, encode_batch: int = 8) -> dict:
    """Evaluate `method` (a method config) on categories of a dataset; returns the results.json record:
    {"categories": {name: {"metrics": fractions, "percent": ..., counts}}, "mean": {...}, ...}.

    dataset: "mvtec" | "visa" | "folder" (then `root` is the folder, `masks` its masks folder);
    size: input side S (None: the weights' native size); aupro: "exact" | "legacy" (SPEC §6);
    mask_rule: "resize>0.5" | "strict" (SPEC §5). Outputs as in the module docstring.
    """
    if aupro not in AUPRO_VARIANTS:
        raise ValueError(f"aupro must be one of {AUPRO_VARIANTS}, got {aupro!r}")
    if mask_rule not in MASK_RULES:
        raise ValueError(f"mask_rule must be one of {tuple(MASK_RULES)}, got {mask_rule!r}")
    mask_rule = MASK_RULES[mask_rule]
    size = size or cfg.vision.image_size
    if size % cfg.vision.patch_size:
        raise ValueError(f"size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    root = Path(root)
    cats = list_categories(dataset, root, categories, masks)
    for cat in cats:  # every file checked before hours of compute; errors name the files
        validate_category(cat)

    base = Path(out) / method.label / dataset
    current = run_config(cfg, method, dataset=dataset, root=root, masks=masks, size=size, aupro=aupro,
                         mask_rule=mask_rule, weights=weights, seed=seed, encode_batch=encode_batch)
    done_before = set()
    if resume:  # check everything before computing anything
        prev = _read_json(base / "run.json")
        _check_resume(None if prev is None else prev.get("run_config"), current, base / "run.json")
        for cat in cats:
            rec = _read_json(base / cat.name / "metrics.json")
            if rec is not None:
                _check_resume(rec.get("run_config"), current, base / cat.name / "metrics.json")
                done_before.add(cat.name)
    base.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in cats]
    run = {"command": "evaluate", "run_config": current, "categories": names, "versions": library_versions(),
           "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if current["random_weights"]:
        run["warning"] = "random weights: every metric is meaningless"
    atomic_write_text(base / "run.json", json.dumps(run, indent=2) + "\n")
    header = {"method": method.label, "dataset": dataset, "size": size, "mask_rule": mask_rule, "aupro": aupro,
              "metric_resolution": f"{size}x{size}", "weights": weights,
              "random_weights": current["random_weights"]}

    t_start, done, timings = time.perf_counter(), [], {}
    for k, cat in enumerate(cats, 1):
        label = f"[{k}/{len(cats)}] {dataset}/{cat.name}"
        if cat.name in done_before:
            done.append(cat.name)
            if progress:
                print(f"{label}: done before, skipped (--resume)", file=sys.stderr)
            continue
        record, scores, maps, gt = evaluate_category(
            params, cfg, cat, method, size=size, aupro=aupro, strict=mask_rule == "strict",
            encode_batch=encode_batch, progress=_progress_factory(progress, label), mesh=mesh)
        record["run_config"] = current
        t0 = time.perf_counter()
        _write_category(base / cat.name, cat, root, scores, maps, gt, record, overlays_per_category)
        timings[cat.name] = {**record["timing_s"], "write": time.perf_counter() - t0}
        done.append(cat.name)
        write_tables(base, done, header)  # a killed run keeps a table of what finished
        if progress:
            summary = ", ".join(f"{m} {v if v is not None else 'n/a'}" for m, v in record["percent"].items())
            print(f"{label}: {summary or 'scores only'}", file=sys.stderr)

    results = write_tables(base, done, header)
    run.update(status="complete", elapsed_s=time.perf_counter() - t_start, timing_s=timings,
               resumed=sorted(done_before))
    atomic_write_text(base / "run.json", json.dumps(run, indent=2) + "\n")
    return results
