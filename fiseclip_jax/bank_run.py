"""`run_bank_build`: a folder of known-good (or mostly normal) images in, a reference bank out (`bank build`).

Like `run_detect`, it never loses work:
  * everything is checked before any computing (`plan_bank_build`: the folder holds images, BANK does not
    exist yet unless `overwrite`, is not inside the folder and can be written);
  * each encoded batch is kept in .BANK.partial/ as soon as it is done, so `resume=True` encodes only what
    is missing;
  * an unreadable image is skipped with a warning and listed in bank.json (`strict=True` stops instead);
  * the bank appears whole, at the end (`save_bank` is atomic), and .BANK.partial/ is then removed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .bank import Bank, bank_from_features, bank_threshold, check_method, encode_in_batches, save_bank, \
    weights_fingerprint
from .clip.preprocess import preprocess
from .data import Category, infer_class_name, list_folder, load_image
from .errors import FiseclipError
from .outputs import WRITE_LOCK, Status, atomic_write_text, check_out
from .prompts import text_features_full
from .runner import DiskStore, ResumeError


@dataclasses.dataclass
class BankPlan:
    """What a bank build reads and writes, checked before any weights load (`plan_bank_build`)."""

    folder: Path
    out: Path
    category: Category
    class_name: str
    class_name_source: str
    resume: bool
    overwrite: bool
    strict: bool

    @property
    def partial(self) -> Path:
        return self.out.parent / f".{self.out.name}.partial"

    @property
    def paths(self) -> list[Path]:
        return [Path(s.path) for s in self.category.samples]


def plan_bank_build(folder, out, *, class_name=None, overwrite=False, resume=False, strict=False) -> BankPlan:
    """Check the image folder and BANK before any computing."""
    folder, out = Path(folder), Path(out)
    category = list_folder(folder)  # the folder exists and holds images; errors name it
    if overwrite and resume:
        raise FiseclipError("--overwrite and --resume exclude each other: choose one")
    check_out(out, folder, overwrite=False, resume=True)  # a folder outside the input tree that can be written
    if out.exists():
        if not overwrite:
            raise FiseclipError(f"--out {out} already exists: pass --overwrite to replace it (or choose another path)")
        if not (out / "bank.json").exists() and any(out.iterdir()):
            raise FiseclipError(f"--out {out} exists and is not a reference bank: choose another path")
    source = "--class-name"
    if not class_name:
        class_name, source = infer_class_name(folder)
    plan = BankPlan(folder, out, category, class_name, source, resume, overwrite, strict)
    if plan.partial.exists() and not (resume or overwrite):
        raise FiseclipError(f"an interrupted build of {out} is in {plan.partial}: pass --resume to finish it or "
                            "--overwrite to start again")
    if overwrite:
        shutil.rmtree(plan.partial, ignore_errors=True)
    return plan


def build_config(plan: BankPlan, cfg, method, *, size, capacity, mode, budget, encode_batch, weights, seed) -> dict:
    """Everything the bank depends on; a resumed build must match it."""
    return json.loads(json.dumps({
        "folder": str(plan.folder.resolve()), "files": [str(p.relative_to(plan.folder)) for p in plan.paths],
        "class_name": plan.class_name, "size": size, "weights": weights, "seed": seed, "clip": cfg.to_dict(),
        "config": method.record(), "capacity": capacity, "mode": mode, "budget": budget,
        "encode_batch": encode_batch}, default=str))


def _encode_batch(params, cfg, method, paths, size, encode_batch, strict):
    """Decode and encode one batch of files -> (features of the readable ones, their indices, {index: error})."""
    rows, idx, errors = [], [], {}
    for i, path in paths:
        try:
            rows.append(preprocess([load_image(path)], size)[0])
            idx.append(i)
        except FiseclipError as err:
            if strict:
                raise
            errors[i] = str(err)
    feats = encode_in_batches(params, cfg, np.stack(rows), method, encode_batch) if rows else {}
    return feats, idx, errors


def run_bank_build(params, cfg, plan: BankPlan, method, *, size=None, capacity=None, mode="exact", budget=None,
                   coreset_dim=128, encode_batch=8, weights="", seed=0, random_weights=False,
                   status: Status | None = None, say: Callable[[str], None] = lambda msg: None) -> Bank:
    """Encode every image of the plan's folder (batch by batch, resumable), build the bank, save it to plan.out."""
    check_method(method)
    status = status or Status()
    size = size or cfg.vision.image_size
    if size < 1 or size % cfg.vision.patch_size:
        raise FiseclipError(f"--size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    paths = plan.paths
    status.total = len(paths)
    current = build_config(plan, cfg, method, size=size, capacity=capacity, mode=mode, budget=budget,
                           encode_batch=encode_batch, weights=weights, seed=seed)
    partial = plan.partial
    if plan.resume and partial.exists():
        try:
            recorded = json.loads((partial / "build_config.json").read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != current:
            raise ResumeError(f"--resume: {partial} holds an interrupted build with other options (folder, weights, "
                              "method, size, capacity, mode or files); use the same options or --overwrite")
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_text(partial / "build_config.json", json.dumps(current))
    store = DiskStore(partial / "features")
    feats, good, errors = [], [], {}
    batches = [(lo, min(lo + encode_batch, len(paths))) for lo in range(0, len(paths), encode_batch)]
    say(f"encoding {len(paths)} images with {method.label} at {size}px")
    for b, (lo, hi) in enumerate(batches):
        key = f"{b:06d}"
        stored = store.get(key)
        if stored is None:
            f, idx, err = _encode_batch(params, cfg, method, [(i, paths[i]) for i in range(lo, hi)], size,
                                        encode_batch, plan.strict)
            with WRITE_LOCK:
                store[key] = {"features": f, "indices": np.asarray(idx, int), "errors": err}
        else:
            f, idx, err = stored["features"], stored["indices"], stored["errors"]
        for i, message in err.items():
            say(f"warning: skipped {message}")
        if len(idx):
            feats.append(f)
        good.extend(int(i) for i in idx)
        errors.update(err)
        status.done = hi
    if len(good) < 2:
        raise FiseclipError(f"a reference bank needs at least 2 readable images; {plan.folder} has {len(good)}")
    feats = {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}
    text = text_features_full(params, cfg, plan.class_name, method.prompts) if method.prompts is not None else None
    say(f"scoring each of the {len(good)} images against the others ({mode} bank)")
    bank = bank_from_features(feats, text, method, cfg=cfg, size=size, fingerprint=weights_fingerprint(params),
                              capacity=capacity, mode=mode, budget=budget, coreset_dim=coreset_dim,
                              class_name=plan.class_name, weights=weights)
    rels = [str(p.relative_to(plan.folder)) for p in paths]
    notes = {"command": "bank build", "folder": str(plan.folder), "files": [rels[i] for i in good],
             "skipped": {rels[i]: m for i, m in errors.items()}, "seed": seed, "random_weights": random_weights,
             "class_name_source": plan.class_name_source, "threshold_fpr_0.01": bank_threshold(bank, 0.01)}
    with WRITE_LOCK:
        if plan.out.exists() and plan.overwrite:  # a bank or an empty folder (`plan_bank_build`)
            shutil.rmtree(plan.out)
        save_bank(plan.out, bank, notes=notes)
        shutil.rmtree(partial, ignore_errors=True)
    return bank
