"""`evaluate`: datasets through one method, anomalib-style reports, resumable runs (SPEC §5–§6).

Layout under OUT/<method>/<dataset>/ (method: fiseclip | musc | anoclip | anoclip+):
  run.json                    exact configuration (method, CLIP, weights, size, root, categories,
                              protocol, preprocessing, mask rule, AUPRO and image-AP variants,
                              metric resolution, seed), library versions, status
  results.md / .csv / .json   one row per finished category and their mean (report.py)
  <category>/metrics.json     fractions and percent, counts, timings, the run configuration
  <category>/scores.csv       file (relative to the dataset root), label, score
  <category>/overlays/*.png   image | heat map | ground-truth mask, for the highest- and
                              lowest-scoring defects and normals
Metrics (SPEC §5) are computed at metric_resolution="input" (default): the anomaly map's own
size (S x S; 240 x W' for tiled wide images), ground-truth masks resized to it and binarised at
> 0.5 (mask_rule "strict": only fully white pixels count, MuSc on MVTec; "resize>0": every
nonzero pixel, MuSc on VisA); or at "original": every map resized bilinearly (half-pixel
centres, align_corners=False) to its image's stored size and compared with the mask as stored.

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
from .data.images import image_size
from .detect import detect_category
from .errors import FiseclipError
from .metrics import IMAGE_AP, image_metrics, pixel_metrics
from .overlay import side_by_side
from .postprocess import upsample_bilinear
from .prompts import text_features_full
from .report import clean, percents, write_tables
from .outputs import atomic_write_text, library_versions, overlay_name

DATASETS = ("mvtec", "visa", "folder")
MASK_RULES = {"resize>0.5": "resize>0.5", "resize": "resize>0.5", "strict": "strict", "resize>0": "resize>0",
              "nonzero": "resize>0"}
AUPRO_VARIANTS = ("exact", "legacy")
METRIC_RESOLUTIONS = ("input", "original")
# The class name a category is prompted with. "clean": underscores to spaces (SPEC §3); "anovl": the
# folder name verbatim, as AnoVL's code prompts it ("metal_nut", "pipe_fryum"), macaroni1/2 -> macaroni.
_ANOVL_NAMES = {"macaroni1": "macaroni", "macaroni2": "macaroni"}
CLASS_NAMES = ("clean", "anovl")


class ResumeError(FiseclipError):
    """--resume found results made with a different configuration."""


def list_categories(dataset: str, root, categories=None, masks=None) -> list[Category]:
    """The categories of a dataset (for "folder": `root` is one category; its name may be given)."""
    if dataset not in DATASETS:
        raise FiseclipError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if masks is not None and dataset != "folder":
        raise FiseclipError(f"a masks folder is only for --dataset folder ({dataset} has its own masks)")
    if isinstance(categories, str):
        categories = [categories]
    if dataset == "mvtec":
        return list_mvtec(root, categories)
    if dataset == "visa":
        return list_visa(root, categories)
    if categories and len(categories) > 1:
        raise FiseclipError("a folder dataset is one category: give at most one --category (its name)")
    return [list_folder(root, masks, name=categories[0] if categories else None)]


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def run_config(cfg, method, *, dataset, root, masks, size, aupro, mask_rule, weights, seed,
               encode_batch, resample="bicubic", metric_resolution="input", image_ap="average_precision",
               class_names="clean", protocol=None) -> dict:
    """Everything a result depends on; resume compares it key by key (JSON-normalised)."""
    return _jsonable({
        "method": method.label, "method_config": method.record(), "clip": cfg.to_dict(),
        "weights": weights, "random_weights": weights.startswith("random:"), "seed": seed,
        "dataset": dataset, "root": str(Path(root).resolve()),
        "masks": None if masks is None else str(Path(masks).resolve()),
        "protocol": protocol, "size": size, "resample": resample, "class_names": class_names,
        "encode_batch": encode_batch, "mask_rule": mask_rule, "aupro": aupro, "image_ap": image_ap,
        "metric_resolution": metric_resolution,
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


def load_masks(cat: Category, sizes, rule: str = "resize>0.5"):
    """Each image's ground-truth mask (SPEC §5), normal images all False: resized to `sizes` (an int S,
    one (h, w), or one per image) and binarised by `rule`; or, sizes None, as stored. bool [N, h, w],
    or a list of [h_i, w_i] when the sizes differ."""
    n = len(cat)
    if sizes is None:
        per_image = [None] * n
    elif np.ndim(sizes) == 0:
        per_image = [(int(sizes), int(sizes))] * n
    elif np.ndim(sizes) == 1:
        per_image = [tuple(sizes)] * n
    else:
        per_image = [tuple(hw) for hw in sizes]
    masks = []
    for s, hw in zip(cat.samples, per_image):
        if s.mask_path is not None:
            masks.append(load_mask(s.mask_path, hw, rule=rule))  # errors name the file
        else:
            masks.append(np.zeros(hw if hw is not None else image_size(s.path), bool))
    return np.stack(masks) if len({m.shape for m in masks}) == 1 else masks


def original_resolution(maps, shapes) -> list:
    """Each map resized bilinearly (half-pixel centres: align_corners=False, no antialiasing) to its
    image's stored [H, W] (SPEC §5, metric_resolution="original")."""
    return [np.asarray(upsample_bilinear(m, tuple(hw), align_corners=False)) for m, hw in zip(maps, shapes)]


def prompt_class_name(cat: Category, rule: str = "clean") -> str:
    """The class name a category is prompted with (CLASS_NAMES)."""
    if rule not in CLASS_NAMES:
        raise FiseclipError(f"class_names must be one of {CLASS_NAMES}, got {rule!r}")
    return cat.class_name if rule == "clean" else _ANOVL_NAMES.get(cat.name, cat.name)


def _map_range(maps) -> tuple[float, float]:
    return float(min(np.min(m) for m in maps)), float(max(np.max(m) for m in maps))


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
    vmin, vmax = _map_range(maps)
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


def evaluate_category(params, cfg, cat: Category, method, *, size: int, aupro="exact", mask_rule="resize>0.5",
                      encode_batch=8, progress=True, mesh=None, resample="bicubic", metric_resolution="input",
                      image_ap="average_precision", class_names="clean",
                      feature_cache=None) -> tuple[dict, np.ndarray, list, list]:
    """Detect and score one category: (record, image_scores [N], anomaly_maps, masks | None), maps and masks
    at the metric resolution ([N, h, w] arrays, or lists when the images' sizes differ).

    Image metrics need every label; pixel metrics also need the dataset's masks. A `feature_cache`
    (`features.FeatureCache`) replaces the forward pass of images it holds."""
    t0 = time.perf_counter()
    name = prompt_class_name(cat, class_names)
    text = None if method.prompts is None else \
        text_features_full(params, cfg, name, method.prompts, verbatim=class_names != "clean")
    result = detect_category(params, cfg, [s.path for s in cat.samples], name, method, size=size,
                             encode_batch=encode_batch, resample=resample, text=text, progress=progress, mesh=mesh,
                             feature_cache=feature_cache)
    scores = np.asarray(result.image_scores, np.float64)
    maps = result.anomaly_maps
    t1 = time.perf_counter()
    labels = cat.labels
    labelled = all(l is not None for l in labels)
    if metric_resolution == "original":
        masks = load_masks(cat, None) if labelled and cat.has_masks else None
        shapes = [m.shape for m in masks] if masks is not None else [image_size(s.path) for s in cat.samples]
        maps = original_resolution(maps, shapes)
        if len({m.shape for m in maps}) == 1:
            maps = np.stack(maps)
    else:
        masks = load_masks(cat, [m.shape for m in maps], mask_rule) if labelled and cat.has_masks else None
    t2 = time.perf_counter()
    metrics = {}
    if labelled:
        metrics.update(image_metrics(np.asarray(labels, np.int64), scores, ap=image_ap))
    if masks is not None:
        metrics.update(pixel_metrics(masks, maps, aupro=aupro))
    metrics = {k: clean(v) for k, v in metrics.items()}
    t3 = time.perf_counter()
    sizes = sorted({f"{m.shape[0]}x{m.shape[1]}" for m in maps})
    record = {
        "category": cat.name, "class_name": name, "dataset": cat.dataset,
        "n_images": len(cat), "n_normal": sum(l == 0 for l in labels),
        "n_anomalous": sum(l == 1 for l in labels), "n_unlabelled": sum(l is None for l in labels),
        "metrics": metrics, "percent": percents(metrics),
        "metric_resolution": metric_resolution, "metric_sizes": sizes,
        "timing_s": {"detect": t1 - t0, "masks": t2 - t1, "metrics": t3 - t2},
    }
    if not labelled:
        record["note"] = "unlabelled images: scores only, no metrics"
    elif not cat.has_masks:
        record["note"] = "no masks: image metrics only"
    return record, scores, maps, masks


def check_settings(cfg, dataset, root, categories, masks, *, size, aupro, mask_rule, metric_resolution, image_ap,
                   class_names) -> tuple[str, int, list[Category]]:
    """Every evaluation option and every file checked before any compute: (mask rule, size, categories)."""
    if aupro not in AUPRO_VARIANTS:
        raise FiseclipError(f"aupro must be one of {AUPRO_VARIANTS}, got {aupro!r}")
    if mask_rule not in MASK_RULES:
        raise FiseclipError(f"mask_rule must be one of {tuple(MASK_RULES)}, got {mask_rule!r}")
    if metric_resolution not in METRIC_RESOLUTIONS:
        raise FiseclipError(f"metric_resolution must be one of {METRIC_RESOLUTIONS}, got {metric_resolution!r}")
    if image_ap not in IMAGE_AP:
        raise FiseclipError(f"image_ap must be one of {IMAGE_AP}, got {image_ap!r}")
    if class_names not in CLASS_NAMES:
        raise FiseclipError(f"class_names must be one of {CLASS_NAMES}, got {class_names!r}")
    size = size or cfg.vision.image_size
    if size % cfg.vision.patch_size:
        raise FiseclipError(f"size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    cats = list_categories(dataset, Path(root), categories, masks)
    for cat in cats:  # every file checked before hours of compute; errors name the files
        validate_category(cat)
    return MASK_RULES[mask_rule], size, cats


def evaluate(params, cfg, dataset: str, root, method, *, categories=None, size: int | None, out, masks=None,
             resume: bool = False, aupro: str = "exact", mask_rule: str = "resize>0.5",
             overlays_per_category: int = 4, progress: bool = True, mesh=None, weights: str = "",
             seed: int = 0, encode_batch: int = 8, resample: str = "bicubic", metric_resolution: str = "input",
             image_ap: str = "average_precision", class_names: str = "clean", protocol: str | None = None,
             feature_cache=None) -> dict:
    """Evaluate `method` (a method config) on categories of a dataset; returns the results.json record:
    {"categories": {name: {"metrics": fractions, "percent": ..., counts}}, "mean": {...}, ...}.

    dataset: "mvtec" | "visa" | "folder" (then `root` is the folder, `masks` its masks folder);
    size: input side S (None: the weights' native size); resample: "bicubic" | "bilinear" (the
    preprocessing resize); aupro: "exact" | "legacy" (SPEC §6); mask_rule: "resize>0.5" | "strict" |
    "resize>0" (SPEC §5, §8); metric_resolution: "input" | "original" (SPEC §5); image_ap:
    "average_precision" | "pr_auc" (AnoVL's auc(recall, precision)); class_names: "clean" | "anovl"
    (the name in the prompts); protocol: the name of the preset these settings came from
    (`protocols.get`), recorded only; feature_cache: a `features.FeatureCache` (`--cache DIR`) that
    stores each image's encoded features, so a later run with other scoring options skips the forward
    pass. Outputs as in the module docstring.
    """
    mask_rule, size, cats = check_settings(cfg, dataset, root, categories, masks, size=size, aupro=aupro,
                                           mask_rule=mask_rule, metric_resolution=metric_resolution,
                                           image_ap=image_ap, class_names=class_names)
    root = Path(root)

    base = Path(out) / method.label / dataset
    settings = dict(resample=resample, metric_resolution=metric_resolution, image_ap=image_ap,
                    class_names=class_names)
    current = run_config(cfg, method, dataset=dataset, root=root, masks=masks, size=size, aupro=aupro,
                         mask_rule=mask_rule, weights=weights, seed=seed, encode_batch=encode_batch,
                         protocol=protocol, **settings)
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
    header = {"method": method.label, "dataset": dataset, "protocol": protocol, "size": size,
              "resample": resample, "mask_rule": mask_rule, "aupro": aupro, "image_ap": image_ap,
              "metric_resolution": metric_resolution, "weights": weights,
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
            params, cfg, cat, method, size=size, aupro=aupro, mask_rule=mask_rule, encode_batch=encode_batch,
            progress=_progress_factory(progress, label), mesh=mesh, feature_cache=feature_cache, **settings)
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
