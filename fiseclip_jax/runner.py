"""`run_detect`: a folder of images in; scores.csv, overlays/ and run.json out (the `detect` command).

A run never loses work:
  * everything is checked before any computing (`plan_detect`: the folder holds images, `--out` is a
    folder that can be written, is not inside the input folder and holds no earlier results unless
    `overwrite` or `resume`);
  * each scored batch is written as soon as it is done: its rows into scores.csv (rewritten
    atomically), its maps into OUT/.partial/; a whole-category method (MuSc) also keeps each encode
    batch's features there, so a resumed run does not encode again;
  * `resume=True` scores only what is missing; the final files equal an uninterrupted run's, since
    batches are formed the same way every time;
  * an unreadable image becomes a row with an `error` and no score (`strict=True` stops instead);
  * overlays (one colour scale for the folder) and run.json are written last; run.json exists only
    when scores.csv is complete, and .partial/ is then removed.

With a reference bank (`bank=`, `detect --bank`) each image is scored against the bank alone, and a
`decision` column says `anomalous` (score above the threshold) or `normal`; the threshold is the
bank's (1 − fpr) normal-score quantile unless given, and run.json records it. Without a bank, a
threshold given (`threshold=`) or read from an evaluate run's thresholds.json (`thresholds=`, see
`read_thresholds`) adds the same column; a pixel threshold (`pixel_threshold=`, or the file's)
writes a binary defect mask per image, masks/<name>.png (white: map above the threshold), named
as its overlay.

With an exported detector (`exported=`, `detect --exported`, fiseclip_jax.export) the exported program
scores the images; method, size, class name (and bank) are the export's, everything written is the same.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .data import Category, image_size, infer_class_name, list_folder, load_image
from .bank import bank_digest, bank_threshold
from .detect import bank_groups, category_groups, few_images_message, iter_detect, iter_detect_bank
from .errors import FiseclipError
from .export import ExportedDetector
from .outputs import WRITE_LOCK, Status, atomic_write_text, check_out, library_versions, overlay_name
from .overlay import side_by_side
from .prompts import clean_class_name, text_features_full

OUTPUTS = ("scores.csv", "run.json", "overlays", "masks", ".partial")  # what a detect run writes into --out
COLUMNS = ("file", "score", "label", "error")
DECISION_COLUMNS = ("file", "score", "label", "decision", "error")  # with a bank or a threshold


class ResumeError(FiseclipError):
    """--resume found results of a different run configuration."""


@dataclasses.dataclass
class DetectPlan:
    """What a detect run reads and writes, checked before any weights load (`plan_detect`)."""

    folder: Path
    out: Path
    category: Category
    class_name: str
    class_name_source: str  # "--class-name" or how it was inferred from the path
    resume: bool
    strict: bool

    @property
    def paths(self) -> list[Path]:
        return [Path(s.path) for s in self.category.samples]

    @property
    def rels(self) -> list[str]:
        return [str(p.relative_to(self.folder)) for p in self.paths]


def plan_detect(folder, out, *, class_name=None, overwrite=False, resume=False, strict=False) -> DetectPlan:
    """Check the input folder and --out before any computing; `overwrite` clears earlier results."""
    folder, out = Path(folder), Path(out)
    category = list_folder(folder)  # the folder exists and holds images; errors name it
    check_out(out, folder, overwrite=overwrite, resume=resume)
    if class_name:
        source = "--class-name"
    else:
        class_name, source = infer_class_name(folder)
    if overwrite and out.is_dir():
        for name in OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return DetectPlan(folder, out, category, class_name, source, resume, strict)


# ------------------------------------------------------------------ on-disk state of a partial run
class DiskStore(MutableMapping):
    """{key: {"features": {name: array}, "indices": array, "errors": {index: message}}} as .npz files,
    written atomically; an unreadable entry reads as missing (it is recomputed, never trusted)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, key):
        return self.folder / f"{key}.npz"

    def __getitem__(self, key):
        try:
            with np.load(self._path(key), allow_pickle=False) as z:
                feats = {k[2:]: z[k] for k in z.files if k.startswith("f/")}
                return {"features": feats, "indices": z["indices"],
                        "errors": {int(k): v for k, v in json.loads(str(z["errors"])).items()}}
        except (OSError, ValueError, KeyError) as err:
            raise KeyError(key) from err

    def __setitem__(self, key, value):
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"f/{k}": np.asarray(v) for k, v in value["features"].items()}
        tmp = self._path(key).with_suffix(".tmp.npz")
        np.savez(tmp, indices=np.asarray(value["indices"], int), errors=json.dumps(value["errors"]), **arrays)
        os.replace(tmp, self._path(key))

    def __delitem__(self, key):
        self._path(key).unlink()

    def __iter__(self):
        return (p.stem for p in sorted(self.folder.glob("*.npz")) if not p.stem.endswith(".tmp"))

    def __len__(self):
        return sum(1 for _ in self)


def _read_rows(path: Path) -> dict[str, dict]:
    try:
        with open(path, newline="") as f:
            return {r["file"]: r for r in csv.DictReader(f)}
    except FileNotFoundError:
        return {}


def _write_rows(path: Path, rels: list[str], rows: dict[str, dict], columns=COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows[r] for r in rels if r in rows)
    atomic_write_text(path, buf.getvalue())


def run_config(plan: DetectPlan, cfg, method, *, size, encode_batch, weights, seed, devices, bank=None,
               threshold=None, pixel_threshold=None, exported: ExportedDetector | None = None) -> dict:
    """Everything the results depend on; a resumed run must match it."""
    config = {
        "folder": str(plan.folder.resolve()), "files": plan.rels, "class_name": plan.class_name, "size": size,
        "weights": weights, "clip": cfg.to_dict(), "config": method.record(), "encode_batch": encode_batch,
        "seed": seed, "devices": devices, "bank": None if bank is None else bank_digest(bank),
        "threshold": threshold, "pixel_threshold": pixel_threshold}
    if exported is not None:
        config["exported"] = exported_info(exported)
    return json.loads(json.dumps(config, default=str))


def exported_info(exported: ExportedDetector) -> dict:
    """What run.json records of an exported detector."""
    r = exported.record
    return {"dir": str(exported.path.resolve()), "platforms": r["platforms"], "batch": r["batch"],
            "weights_fingerprint": r["weights_fingerprint"], "bank": r.get("bank")}


THRESHOLD_RULES = ("f1", "fpr")


def read_thresholds(path, rule: str = "f1") -> dict:
    """The thresholds of an evaluate run's <category>/thresholds.json for `rule` ("f1": F1-optimal, "fpr": at
    most the recorded share of good images / normal pixels flagged): {"image": t | None, "pixel": t | None,
    "file", "rule", "method", "size", "weights", "class_name"}."""
    if rule not in THRESHOLD_RULES:
        raise FiseclipError(f"--threshold-rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FiseclipError(f"--thresholds {path}: file not found") from None
    except (OSError, ValueError) as err:
        raise FiseclipError(f"--thresholds {path}: not a readable thresholds.json ({err})") from None
    if not isinstance(record, dict) or "rule" not in record:
        raise FiseclipError(f"--thresholds {path}: not a thresholds.json written by evaluate")
    key = "f1" if rule == "f1" else "at_fpr"
    got = {level: ((record.get(level) or {}).get(key) or {}).get("threshold") for level in ("image", "pixel")}
    if got["image"] is None and got["pixel"] is None:
        raise FiseclipError(f"--thresholds {path}: holds no {rule} threshold (its category had no labels or masks)")
    return {**got, "file": str(path), "rule": rule, "fpr": record.get("fpr"),
            **{k: record.get(k) for k in ("method", "size", "weights", "class_name")}}


def check_thresholds(thresholds: dict, method, size: int, weights: str, class_name: str,
                     say: Callable[[str], None] = lambda msg: None) -> None:
    """Thresholds hold only for the scores they were chosen on: refuse another method or size, warn for
    other weights or another class name."""
    where = f"--thresholds {thresholds['file']}"
    if thresholds.get("method") not in (None, method.label):
        raise FiseclipError(f"{where} was computed with --method {thresholds['method']}, this run uses {method.label}")
    if thresholds.get("size") not in (None, size):
        raise FiseclipError(f"{where} was computed at --size {thresholds['size']}, this run uses {size}")
    if thresholds.get("weights") not in (None, weights):
        say(f"warning: {where} was computed with weights {thresholds['weights']}, this run uses {weights}")
    if thresholds.get("class_name") and clean_class_name(thresholds["class_name"]) != clean_class_name(class_name):
        say(f"warning: {where} is for class {thresholds['class_name']!r}, this run prompts {class_name!r}")


def resolve_threshold(bank, threshold=None, fpr: float = 0.01, thresholds: dict | None = None,
                      exported: ExportedDetector | None = None) -> dict | None:
    """{"threshold", "source"}: the decision threshold a run uses (given, else the image threshold of
    `thresholds` (`read_thresholds`), else the bank's (1 − fpr) quantile of its normal scores, the bank's of
    an exported bank detector too), or None when there is none of them (no decisions)."""
    if threshold is not None:
        return {"threshold": float(threshold), "source": "--threshold"}
    if thresholds is not None and thresholds["image"] is not None:
        return {"threshold": float(thresholds["image"]),
                "source": f"the {thresholds['rule']} image threshold of {thresholds['file']}"}
    if exported is not None and exported.is_bank:
        n = exported.record["bank"]["images"]
        return {"threshold": exported.threshold(fpr), "fpr": fpr,
                "source": f"the {1 - fpr:g} quantile of the exported bank's {n} leave-one-out normal scores "
                          f"(--fpr {fpr})"}
    if bank is None:
        return None
    n = int(np.sum(np.asarray(bank.valid)))
    return {"threshold": bank_threshold(bank, fpr), "fpr": fpr,
            "source": f"the {1 - fpr:g} quantile of the bank's {n} leave-one-out normal scores (--fpr {fpr})"}


def resolve_pixel_threshold(pixel_threshold=None, thresholds: dict | None = None) -> dict | None:
    """{"threshold", "source"} of the defect masks (given, else the file's pixel threshold), or None."""
    if pixel_threshold is not None:
        return {"threshold": float(pixel_threshold), "source": "--pixel-threshold"}
    if thresholds is not None and thresholds["pixel"] is not None:
        return {"threshold": float(thresholds["pixel"]),
                "source": f"the {thresholds['rule']} pixel threshold of {thresholds['file']}"}
    return None


def defect_mask(anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """Binary defect mask of a map: white (255) where the map is above the threshold. [H, W] -> L image."""
    return Image.fromarray((np.asarray(anomaly_map) > threshold).astype(np.uint8) * 255, mode="L")


def decide(score: float, decision: dict | None) -> str:
    """"anomalous" when the score is above the threshold, else "normal" ("" without decisions)."""
    if decision is None:
        return ""
    return "anomalous" if score > decision["threshold"] else "normal"


def input_notices(paths, size: int) -> tuple[list[str], dict[int, str]]:
    """Read every header once: (notices for images much smaller than `size` or far from square,
    {index: error} for files whose header cannot be read)."""
    notices, errors = [], {}
    for i, p in enumerate(paths):
        try:
            h, w = image_size(p)
        except FiseclipError as err:
            errors[i] = str(err)
            continue
        if min(h, w) * 2 < size:
            notices.append(f"{p} is {w}x{h}, much smaller than the input size {size}: it is upsampled")
        if max(h, w) > 2 * min(h, w):
            notices.append(f"{p} is {w}x{h}, far from square: it is squashed to {size}x{size}")
    return notices, errors


def run_detect(params, cfg, folder, method, *, out, class_name=None, size=None, encode_batch=8, progress=True,
               random_weights=False, weights="", seed=0, mesh=None, overwrite=False, resume=False, strict=False,
               plan: DetectPlan | None = None, status: Status | None = None,
               say: Callable[[str], None] = lambda msg: None, bank=None, threshold=None, fpr=0.01,
               thresholds: dict | None = None, pixel_threshold=None,
               exported: ExportedDetector | None = None, feature_cache=None) -> dict:
    """Score every image of `folder` into `out`; returns the run record (also written as run.json),
    with "errors": {file: message} of images that could not be read. With a reference `bank` (method,
    size and class name are the bank's) images are scored against it and get a decision; so do they with
    a `threshold` or `thresholds` (`read_thresholds` of an evaluate run's thresholds.json, checked against
    this run's method and size). A pixel threshold (`pixel_threshold` or the file's) writes defect masks.
    With `exported` (`load_exported`; params and cfg are then unused) its program scores the images. A
    `feature_cache` (`features.FeatureCache`, `--cache DIR`) replaces the forward pass of the images it holds."""
    plan = plan or plan_detect(folder, out, class_name=class_name, overwrite=overwrite, resume=resume,
                               strict=strict)
    status = status or Status()
    if bank is not None:
        method, size = bank.meta.method, bank.meta.size
        plan.class_name, plan.class_name_source = bank.meta.class_name, "the bank"
    if exported is not None:
        method, size, cfg = exported.method, exported.size, exported.clip
        plan.class_name, plan.class_name_source = exported.class_name, "the export"
        weights, random_weights = exported.record["weights"], exported.record["random_weights"]
    against_bank = bank is not None or (exported is not None and exported.is_bank)
    decision = resolve_threshold(bank, threshold, fpr, thresholds, exported)
    pixel = resolve_pixel_threshold(pixel_threshold, thresholds)
    size = size or cfg.vision.image_size
    if thresholds is not None:
        check_thresholds(thresholds, method, size, weights, plan.class_name, say)
    if size < 1 or size % cfg.vision.patch_size:
        raise FiseclipError(f"--size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    paths, rels, out = plan.paths, plan.rels, plan.out
    n = len(paths)
    if n < method.min_images and not against_bank:
        raise FiseclipError(few_images_message(method, n, plan.class_name))
    status.total = n
    devices = 1 if mesh is None else int(mesh.size)
    current = run_config(plan, cfg, method, size=size, encode_batch=encode_batch, weights=weights, seed=seed,
                         devices=devices, bank=bank, threshold=decision and decision["threshold"],
                         pixel_threshold=pixel and pixel["threshold"], exported=exported)
    columns = COLUMNS if decision is None else DECISION_COLUMNS
    notices, header_errors = input_notices(paths, size)
    for notice in notices:
        say(f"notice: {notice}")
    if header_errors and plan.strict:  # --strict: stop at the first unreadable file, before computing
        raise FiseclipError(header_errors[min(header_errors)])
    partial = out / ".partial"
    rows = _read_rows(out / "scores.csv") if plan.resume else {}
    if plan.resume and (rows or partial.exists() or (out / "run.json").exists()):
        recorded = _read_state(partial / "run_config.json") or (_read_state(out / "run.json") or {}).get("run_config")
        if recorded != current:
            raise ResumeError(f"--resume: {out} holds results of a different run (other folder, weights, method, "
                              "options or files); use the same options, another --out, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    (partial / "maps").mkdir(parents=True, exist_ok=True)
    atomic_write_text(partial / "run_config.json", json.dumps(current))
    (out / "run.json").unlink(missing_ok=True)  # written again, last, when the results are complete


    if exported is not None:
        groups = exported.groups(n, encode_batch)
    else:
        groups = category_groups(method, n, encode_batch) if bank is None else bank_groups(n, encode_batch)
    done = {g for g, (lo, hi) in enumerate(groups)
            if (partial / "maps" / f"{g:06d}.npz").exists() and all(rels[i] in rows for i in range(lo, hi))}
    status.done = sum(hi - lo for g, (lo, hi) in enumerate(groups) if g in done)
    if done:
        say(f"resuming: {status.done} of {n} images already scored")
    if method.prompts is not None and exported is None:
        say(f"encoding the {method.prompts} prompts for {plan.class_name!r}")
        text = text_features_full(params, cfg, plan.class_name, method.prompts)
    else:
        text = None
    say(f"scoring {n - status.done} images with {method.label} at {size}px"
        f"{' against the reference bank' if against_bank else ''}{' (exported program)' if exported else ''} "
        "(the first batch compiles, later ones reuse it)")
    if exported is not None:
        results = exported.iter_groups(paths, encode_batch=encode_batch, progress=progress, skip_groups=done,
                                       feature_store=DiskStore(partial / "features"), skip_errors=not plan.strict)
    elif bank is None:
        results = iter_detect(params, cfg, paths, plan.class_name, method, size=size, encode_batch=encode_batch,
                              text=text, progress=progress, mesh=mesh, skip_groups=done,
                              feature_store=DiskStore(partial / "features"), skip_errors=not plan.strict,
                              feature_cache=feature_cache)
    else:
        results = iter_detect_bank(params, cfg, bank, paths, encode_batch=encode_batch, text=text, progress=progress,
                                   skip_groups=done, skip_errors=not plan.strict)
    for res in results:
        lo, hi = groups[res.group]
        with WRITE_LOCK:
            _save_maps(partial / "maps" / f"{res.group:06d}.npz", res.anomaly_maps)
            for i, score in zip(res.indices, res.image_scores):
                written = f"{float(score):.6f}"  # decided on the score as written: the CSV agrees with itself
                rows[rels[i]] = _row(rels[i], plan.category.samples[i].label, score=written,
                                     decision=decide(float(written), decision))
            for i, message in res.errors.items():
                rows[rels[i]] = _row(rels[i], plan.category.samples[i].label, error=message)
            _write_rows(out / "scores.csv", rels, rows, columns)
            status.done += hi - lo

    say("writing overlays")
    scale = _overlays(plan, groups, partial, rows, None if pixel is None else pixel["threshold"])
    errors = {r: row["error"] for r, row in rows.items() if row.get("error")}
    record = {
        "command": "detect", "folder": str(plan.folder), "class_name": plan.class_name,
        "class_name_source": plan.class_name_source, "size": size, "weights": weights,
        "random_weights": random_weights, "clip": cfg.to_dict(), "seed": seed, "config": method.record(),
        "versions": library_versions(), "num_images": n, "num_scored": n - len(errors), "errors": errors,
        "overlay_scale": scale, "devices": devices, "run_config": current,
    }
    if decision is not None:
        record["decision"] = decision
    if pixel is not None:
        record["pixel_threshold"] = pixel
    if exported is not None:
        record["exported"] = exported_info(exported)
    if bank is not None:
        record["bank"] = {"mode": bank.meta.mode, "images": int(np.sum(np.asarray(bank.valid))),
                          "fingerprint": bank.meta.fingerprint, "digest": bank_digest(bank)}
    if random_weights:
        record["warning"] = "random weights: scores and maps are meaningless"
    with WRITE_LOCK:
        atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str))
        shutil.rmtree(partial, ignore_errors=True)
    return record


def _row(rel, label, score="", error="", decision=""):
    return {"file": rel, "score": score, "label": "" if label is None else label, "decision": decision, "error": error}


def _save_maps(path: Path, maps) -> None:
    """A group's maps ([k, H, W], or k maps of different sizes for tiled wide images), atomically."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *[np.asarray(m) for m in maps])
    os.replace(tmp, path)


def _load_maps(path: Path) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


def _read_state(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _overlays(plan: DetectPlan, groups, partial: Path, rows, pixel_threshold=None) -> list[float] | None:
    """image | heat map for every scored image, on one colour scale for the folder (and its defect mask
    with a pixel threshold); maps read back one batch at a time from .partial/maps (memory does not grow
    with the folder)."""
    files = [partial / "maps" / f"{g:06d}.npz" for g in range(len(groups))]
    lows, highs = [], []
    for f in files:
        for m in _load_maps(f):
            lows.append(float(m.min()))
            highs.append(float(m.max()))
    if not lows:
        return None
    vmin, vmax = min(lows), max(highs)
    (plan.out / "overlays").mkdir(exist_ok=True)
    if pixel_threshold is not None:
        (plan.out / "masks").mkdir(exist_ok=True)
    rels = plan.rels
    for (lo, hi), f in zip(groups, files):
        maps = _load_maps(f)
        scored = [i for i in range(lo, hi) if rows.get(rels[i], {}).get("score")]
        for i, amap in zip(scored, maps):
            side_by_side(load_image(plan.paths[i]), amap, vmin=vmin, vmax=vmax).save(
                plan.out / "overlays" / overlay_name(rels[i]))
            if pixel_threshold is not None:
                defect_mask(amap, pixel_threshold).save(plan.out / "masks" / overlay_name(rels[i]))
    return [vmin, vmax]
