"""`run_detect`: a folder of images in, scores.csv + overlays + run.json out (the `detect` command)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .data import list_folder, load_image
from .detect import detect_category
from .outputs import atomic_write_text, library_versions, overlay_name
from .overlay import side_by_side


def run_detect(params, cfg, folder, method, *, class_name=None, out, size=None, encode_batch=8,
               progress=True, random_weights=False, weights="", seed=0, mesh=None) -> Path:
    folder, out = Path(folder), Path(out)
    category = list_folder(folder)
    class_name = class_name or folder.resolve().name
    size = size or cfg.vision.image_size
    if size % cfg.vision.patch_size:
        raise ValueError(f"--size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    paths = [Path(s.path) for s in category.samples]
    images = [load_image(p) for p in paths]  # errors name the file
    result = detect_category(params, cfg, images, class_name, method, size=size, encode_batch=encode_batch,
                             progress=progress, mesh=mesh)

    (out / "overlays").mkdir(parents=True, exist_ok=True)
    rels = [str(p.relative_to(folder)) for p in paths]
    lines = [["file", "score", "label"]] + [
        [rel, f"{score:.6f}", "" if s.label is None else s.label]
        for rel, score, s in zip(rels, result.image_scores, category.samples)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(lines)
    atomic_write_text(out / "scores.csv", buf.getvalue())
    vmin = float(min(np.min(m) for m in result.anomaly_maps))  # maps may differ in size (tiled wide images)
    vmax = float(max(np.max(m) for m in result.anomaly_maps))
    for rel, image, amap, score in zip(rels, images, result.anomaly_maps, result.image_scores):
        side_by_side(image, amap, vmin=vmin, vmax=vmax).save(out / "overlays" / overlay_name(rel))
    record = {
        "command": "detect", "folder": str(folder), "class_name": class_name, "size": size,
        "weights": weights, "random_weights": random_weights, "clip": cfg.to_dict(), "seed": seed,
        "config": method.record(), "versions": library_versions(), "num_images": len(paths),
        "overlay_scale": [vmin, vmax], "devices": 1 if mesh is None else int(mesh.size),
    }
    if random_weights:
        record["warning"] = "random weights: scores and maps are meaningless"
    atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=str))
    return out
