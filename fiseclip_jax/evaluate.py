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
  <category>/thresholds.json  decision thresholds (`detect --thresholds`): F1-optimal image and pixel
                              thresholds, and those flagging at most a share `fpr` of good images
                              (normal pixels); a score above a threshold is anomalous (curves.py)
  <category>/report_data.json pixel ROC / PR / PRO curves (thinned for plotting) and the gallery list
  <category>/gallery/*.png    worst cases first (highest-scored good, lowest-scored defective):
                              image | ground-truth mask | anomaly-map overlay
  report.html                 one self-contained page of all of it (html_report.py); rebuilt from
                              these files by `fiseclip-jax report`
Metrics (SPEC §5) are computed at metric_resolution="input" (default): the anomaly map's own
size (S x S; 240 x W' for tiled wide images), ground-truth masks resized to it and binarised at
> 0.5 (mask_rule "strict": only fully white pixels count, MuSc on MVTec; "resize>0": every
nonzero pixel, MuSc on VisA); or at "original": every map resized bilinearly (half-pixel
centres, align_corners=False) to its image's stored size and compared with the mask as stored.

Each category is written to a temporary folder and renamed into place when it finishes, and
the tables and run.json are rebuilt after every category (under `outputs.WRITE_LOCK`), so a
killed run loses at most the category in progress and run.json always lists exactly the
categories of results.*. OUT/<method>/<dataset> must be empty unless overwrite=True (it is
cleared first) or resume=True: categories whose metrics.json exists are then skipped, provided
they were computed with the same configuration; otherwise `ResumeError` is raised.

An image that cannot be read is left out of its category's metrics (strict=True: the run stops
instead); metrics.json lists it under "unreadable" and results.json counts it (n_unreadable).
"""

from __future__ import annotations

import csv
import dataclasses
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
from .cache import MemoryLRU
from .curves import f1_threshold, fpr_threshold, pixel_analysis
from .html_report import write_report
from .metrics import IMAGE_AP, image_metrics, pixel_metrics
from .overlay import side_by_side, triptych
from .postprocess import upsample_bilinear
from .prompts import text_features_full
from .report import clean, percents, write_tables
from .outputs import WRITE_LOCK, Status, atomic_write_text, check_out, library_versions, overlay_name

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


@dataclasses.dataclass
class EvalPlan:
    """What an evaluate run reads and writes, checked before any weights load (`plan_evaluate`)."""

    base: Path  # OUT/<method>/<dataset>
    categories: list  # [Category], unreadable images left out
    unreadable: dict  # {category name: {path: why}}
    resume: bool
    strict: bool


def plan_evaluate(dataset: str, root, method, *, out, categories=None, masks=None, overwrite: bool = False,
                  resume: bool = False, strict: bool = False) -> EvalPlan:
    """Check the dataset (every image and mask header; unreadable images are left out unless strict) and
    the output folder before any computing; `overwrite` clears OUT/<method>/<dataset>."""
    cats = list_categories(dataset, root, categories, masks)
    base = Path(out) / method.label / dataset
    check_out(base, root, overwrite=overwrite, resume=resume)
    kept, unreadable = [], {}
    for cat in cats:  # every file checked before hours of compute; errors name the files
        bad = validate_category(cat, skip_unreadable=not strict)
        if bad:
            unreadable[cat.name] = bad
            cat = dataclasses.replace(cat, samples=tuple(s for s in cat.samples if s.path not in bad))
            if not cat.samples:
                raise FiseclipError(f"{dataset} category {cat.name!r}: none of its images can be read "
                                    f"(first: {next(iter(bad.values()))})")
        kept.append(cat)
    if overwrite and base.exists():
        shutil.rmtree(base)
    return EvalPlan(base, kept, unreadable, resume, strict)


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
               class_names="clean", protocol=None, fpr=0.01) -> dict:
    """Everything a result depends on; resume compares it key by key (JSON-normalised)."""
    return _jsonable({
        "method": method.label, "method_config": method.record(), "clip": cfg.to_dict(),
        "weights": weights, "random_weights": weights.startswith("random:"), "seed": seed,
        "dataset": dataset, "root": str(Path(root).resolve()),
        "masks": None if masks is None else str(Path(masks).resolve()),
        "protocol": protocol, "size": size, "resample": resample, "class_names": class_names,
        "encode_batch": encode_batch, "mask_rule": mask_rule, "aupro": aupro, "image_ap": image_ap,
        "metric_resolution": metric_resolution, "fpr": fpr,
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


def _masks(cat: Category, sizes, rule: str, memo: MemoryLRU | None):
    """`load_masks`, through `memo` when given (keyed by the mask files, the sizes and the rule)."""
    if memo is None:
        return load_masks(cat, sizes) if sizes is None else load_masks(cat, sizes, rule)
    key = (tuple((s.path, s.mask_path) for s in cat.samples), None if sizes is None else tuple(map(tuple, sizes)),
           None if sizes is None else rule)
    masks = memo.get(key)
    if masks is None:
        masks = _masks(cat, sizes, rule, None)
        memo.put(key, masks)
    return masks


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


def pick_gallery(labels, scores, k: int) -> list[tuple[int, str]]:
    """Worst cases first: up to k good images by descending score, then up to k defective ones by
    ascending score, as (index, "normal" | "defect")."""
    normal = sorted((i for i, l in enumerate(labels) if l == 0), key=lambda i: (-scores[i], i))[:k]
    defect = sorted((i for i, l in enumerate(labels) if l == 1), key=lambda i: (scores[i], i))[:k]
    return [(i, "normal") for i in normal] + [(i, "defect") for i in defect]


def category_thresholds(labels, scores, maps, masks, *, fpr: float = 0.01) -> tuple[dict, dict | None]:
    """(thresholds, pixel curves | None) of one category (curves.py): image thresholds need labels of both
    kinds (the FPR one only good images), pixel ones masks with defect and normal pixels."""
    image, pixel, curves = None, None, None
    if all(l is not None for l in labels):
        y = np.asarray(labels, np.int64)
        image = {}
        if 0 < y.sum() < y.size:
            image["f1"] = f1_threshold(y, scores)
        if (y == 0).any():
            image["at_fpr"] = fpr_threshold(np.asarray(scores)[y == 0], fpr)
    if masks is not None and any(np.any(m) for m in masks) and not all(np.all(m) for m in masks):
        curves = pixel_analysis(masks, maps, fpr=fpr)
        pixel = {"f1": curves.pop("f1"), "at_fpr": curves.pop("at_fpr")}
    return {"rule": "a score above the threshold is anomalous", "fpr": fpr, "image": image or None,
            "pixel": pixel}, curves


def _write_category(final: Path, cat: Category, root: Path, scores, maps, masks, record: dict,
                    overlays: int, thresholds: dict | None = None, curves: dict | None = None,
                    gallery: int = 4) -> None:
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
    shown = []
    if gallery:
        (tmp / "gallery").mkdir()
    for rank, (i, kind) in enumerate(pick_gallery(cat.labels, scores, gallery)):
        name = f"{rank:02d}_{kind}__{overlay_name(os.path.relpath(cat.samples[i].path, common))}"
        triptych(load_image(cat.samples[i].path), None if masks is None else masks[i], maps[i],
                 vmin=vmin, vmax=vmax).save(tmp / "gallery" / name)
        shown.append({"png": f"gallery/{name}", "file": rels[i], "label": cat.samples[i].label,
                      "score": float(scores[i])})
    (tmp / "report_data.json").write_text(json.dumps({"pixel_curves": curves, "gallery": shown}) + "\n")
    if thresholds is not None:
        (tmp / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
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
                      skip_errors: bool = False, feature_cache=None,
                      mask_memo: MemoryLRU | None = None) -> tuple[dict, np.ndarray, list, list]:
    """Detect and score one category: (record, image_scores [N], anomaly_maps, masks | None), maps and masks
    at the metric resolution ([N, h, w] arrays, or lists when the images' sizes differ).

    Image metrics need every label; pixel metrics also need the dataset's masks. skip_errors=True: an
    image that cannot be decoded is left out (record["unreadable"]: {path: why}); N counts the others. A
    `feature_cache` (`features.FeatureCache`) replaces the forward pass of images it holds; a `mask_memo`
    (`cache.MemoryLRU`) keeps the masks for the next call on the same images (a sweep)."""
    t0 = time.perf_counter()
    name = prompt_class_name(cat, class_names)
    text = None if method.prompts is None else \
        text_features_full(params, cfg, name, method.prompts, verbatim=class_names != "clean")
    result = detect_category(params, cfg, [s.path for s in cat.samples], name, method, size=size,
                             encode_batch=encode_batch, resample=resample, text=text, progress=progress, mesh=mesh,
                             skip_errors=skip_errors, feature_cache=feature_cache)
    unreadable = {cat.samples[i].path: why for i, why in sorted(result.errors.items())}
    if unreadable:
        cat = dataclasses.replace(cat, samples=tuple(s for s in cat.samples if s.path not in unreadable))
    scores = np.asarray(result.image_scores, np.float64)
    maps = result.anomaly_maps
    t1 = time.perf_counter()
    labels = cat.labels
    labelled = all(l is not None for l in labels)
    if metric_resolution == "original":
        masks = _masks(cat, None, mask_rule, mask_memo) if labelled and cat.has_masks else None
        shapes = [m.shape for m in masks] if masks is not None else [image_size(s.path) for s in cat.samples]
        maps = original_resolution(maps, shapes)
        if len({m.shape for m in maps}) == 1:
            maps = np.stack(maps)
    else:
        masks = _masks(cat, [m.shape for m in maps], mask_rule, mask_memo) if labelled and cat.has_masks else None
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
        "n_unreadable": len(unreadable), "unreadable": unreadable,
    }
    if not labelled:
        record["note"] = "unlabelled images: scores only, no metrics"
    elif not cat.has_masks:
        record["note"] = "no masks: image metrics only"
    return record, scores, maps, masks


def check_settings(cfg, *, size, aupro, mask_rule, metric_resolution, image_ap, class_names) -> tuple[str, int]:
    """Every evaluation option checked before any compute (`evaluate`, `sweep`): (mask rule, input size)."""
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
    return MASK_RULES[mask_rule], size


def evaluate(params, cfg, dataset: str, root, method, *, categories=None, size: int | None, out, masks=None,
             resume: bool = False, aupro: str = "exact", mask_rule: str = "resize>0.5",
             overlays_per_category: int = 4, progress: bool = True, mesh=None, weights: str = "",
             seed: int = 0, encode_batch: int = 8, resample: str = "bicubic", metric_resolution: str = "input",
             image_ap: str = "average_precision", class_names: str = "clean", protocol: str | None = None,
             overwrite: bool = False, strict: bool = False, plan: EvalPlan | None = None,
             status: Status | None = None, say=lambda msg: None, fpr: float = 0.01, gallery: int = 4,
             html: bool = True, feature_cache=None) -> dict:
    """Evaluate `method` (a method config) on categories of a dataset; returns the results.json record:
    {"categories": {name: {"metrics": fractions, "percent": ..., counts}}, "mean": {...}, ...}.

    dataset: "mvtec" | "visa" | "folder" (then `root` is the folder, `masks` its masks folder);
    size: input side S (None: the weights' native size); resample: "bicubic" | "bilinear" (the
    preprocessing resize); aupro: "exact" | "legacy" (SPEC §6); mask_rule: "resize>0.5" | "strict" |
    "resize>0" (SPEC §5, §8); metric_resolution: "input" | "original" (SPEC §5); image_ap:
    "average_precision" | "pr_auc" (AnoVL's auc(recall, precision)); class_names: "clean" | "anovl"
    (the name in the prompts); protocol: the name of the preset these settings came from
    (`protocols.get`), recorded only. overwrite / resume: what to do with earlier results in
    OUT/<method>/<dataset> (neither: it must be empty); strict: stop at the first unreadable image
    instead of leaving it out. `plan` (from `plan_evaluate`, which the CLI calls before loading
    weights) replaces categories/masks/overwrite/resume/strict; `status` counts finished categories
    (what an interrupt reports); `say` gets phase messages; fpr: the target false-positive rate of
    thresholds.json; gallery: worst cases per kind shown in report.html (html=False: no report.html);
    feature_cache: a `features.FeatureCache` (`--cache DIR`) that stores each image's encoded features,
    so a later run with other scoring options skips the forward pass. Outputs as in the module docstring.
    """
    if not 0.0 <= fpr <= 1.0:
        raise FiseclipError(f"--fpr must be between 0 and 1, got {fpr}")
    mask_rule, size = check_settings(cfg, size=size, aupro=aupro, mask_rule=mask_rule,
                                     metric_resolution=metric_resolution, image_ap=image_ap, class_names=class_names)
    root = Path(root)
    if plan is None:
        plan = plan_evaluate(dataset, root, method, out=out, categories=categories, masks=masks,
                             overwrite=overwrite, resume=resume, strict=strict)
    cats, base, resume = plan.categories, plan.base, plan.resume
    status = status if status is not None else Status()
    status.total = len(cats)
    settings = dict(resample=resample, metric_resolution=metric_resolution, image_ap=image_ap,
                    class_names=class_names)
    current = run_config(cfg, method, dataset=dataset, root=root, masks=masks, size=size, aupro=aupro,
                         mask_rule=mask_rule, weights=weights, seed=seed, encode_batch=encode_batch,
                         protocol=protocol, fpr=fpr, **settings)
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
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if current["random_weights"]:
        run["warning"] = "random weights: every metric is meaningless"
    header = {"method": method.label, "dataset": dataset, "protocol": protocol, "size": size,
              "resample": resample, "mask_rule": mask_rule, "aupro": aupro, "image_ap": image_ap,
              "metric_resolution": metric_resolution, "weights": weights,
              "random_weights": current["random_weights"]}
    t_start, done, timings = time.perf_counter(), [], {}

    def write_state(final: bool) -> dict:
        """results.* and run.json together, listing the same finished categories."""
        results = write_tables(base, done, header)  # a killed run keeps a table of what finished
        run.update(status="complete" if final else "incomplete", finished=list(done),
                   elapsed_s=time.perf_counter() - t_start, timing_s=timings, resumed=sorted(done_before))
        if not final:
            run["resume"] = "rerun the same command with --resume to finish the other categories"
        else:
            run.pop("resume", None)
        atomic_write_text(base / "run.json", json.dumps(run, indent=2) + "\n")
        return results

    with WRITE_LOCK:
        write_state(final=False)
    for k, cat in enumerate(cats, 1):
        label = f"[{k}/{len(cats)}] {dataset}/{cat.name}"
        if cat.name in done_before:
            done.append(cat.name)
            status.done += 1
            say(f"{label}: done before, skipped (--resume)")
            continue
        say(f"{label}: {len(cat)} images" + (" (the first batch compiles)" if k == 1 else ""))
        record, scores, maps, gt = evaluate_category(
            params, cfg, cat, method, size=size, aupro=aupro, mask_rule=mask_rule, encode_batch=encode_batch,
            progress=_progress_factory(progress, label), mesh=mesh, skip_errors=not plan.strict,
            feature_cache=feature_cache, **settings)
        unreadable = {**plan.unreadable.get(cat.name, {}), **record["unreadable"]}
        scored = dataclasses.replace(cat, samples=tuple(s for s in cat.samples if s.path not in unreadable))
        record.update(n_unreadable=len(unreadable), run_config=current,
                      unreadable={os.path.relpath(p, root): why for p, why in unreadable.items()})
        if unreadable:
            print(f"fiseclip-jax evaluate: warning: {len(unreadable)} image(s) of {cat.name} could not be read and "
                  f"are left out of its metrics (listed in {base / cat.name / 'metrics.json'})", file=sys.stderr)
        say(f"{label}: writing scores and overlays")
        t0 = time.perf_counter()
        thresholds, curves = category_thresholds(scored.labels, scores, maps, gt, fpr=fpr)
        thresholds = {"category": cat.name, "method": method.label, "weights": weights, "size": size,
                      "class_name": record["class_name"], "random_weights": current["random_weights"],
                      **thresholds}
        record["timing_s"]["thresholds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with WRITE_LOCK:
            _write_category(base / cat.name, scored, root, scores, maps, gt, record, overlays_per_category,
                            thresholds, curves, gallery)
            timings[cat.name] = {**record["timing_s"], "write": time.perf_counter() - t0}
            done.append(cat.name)
            status.done += 1
            write_state(final=False)
        if progress:
            summary = ", ".join(f"{m} {v if v is not None else 'n/a'}" for m, v in record["percent"].items())
            print(f"{label}: {summary or 'scores only'}", file=sys.stderr)

    with WRITE_LOCK:
        results = write_state(final=True)
    if html:  # last: built only from the files above (`fiseclip-jax report` rebuilds it the same way)
        say(f"writing {base / 'report.html'}")
        write_report(base)
    return results
