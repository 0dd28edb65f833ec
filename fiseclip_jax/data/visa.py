"""VisA reader: `<root>/split_csv/1cls.csv` with columns object, split, label,
image, mask (paths relative to root; label "normal" / "anomaly"); test split."""

from __future__ import annotations

import csv
from pathlib import Path

from .core import Category, DataError, Sample
from .mvtec import pick_categories

_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"VisA split file {csv_path} lacks columns {missing}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read VisA split file {csv_path}: {err}") from None


def list_visa(root, categories=None) -> list[Category]:
    """Test split of VisA categories (all found in the csv, sorted, when None).

    defect is "good" for normal images and the image's folder name ("Anomaly")
    otherwise; samples are sorted by image path.
    """
    root = Path(root)
    csv_path = root / "split_csv" / "1cls.csv"
    per_object: dict[str, list[Sample]] = {}
    for line, row in enumerate(_read_rows(csv_path), start=2):  # line 1 is the header
        cell = {k: (row.get(k) or "").strip() for k in _COLUMNS}  # short rows give None
        if cell["split"] != "test":
            continue
        label = _LABELS.get(cell["label"].lower())
        if label is None:
            raise DataError(f"{csv_path} line {line}: label {cell['label']!r} is not normal/anomaly")
        if not cell["image"]:
            raise DataError(f"{csv_path} line {line}: empty image path")
        image = root / cell["image"]
        sample = Sample(
            path=str(image),
            label=label,
            mask_path=str(root / cell["mask"]) if cell["mask"] else None,
            defect="good" if label == 0 else image.parent.name,
        )
        per_object.setdefault(cell["object"], []).append(sample)
    names = pick_categories(categories, sorted(per_object), "VisA", csv_path)
    return [
        Category(name=n, dataset="visa", samples=tuple(sorted(per_object[n], key=lambda s: s.path)))
        for n in names
    ]
