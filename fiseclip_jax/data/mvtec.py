"""MVTec AD reader: `<root>/<category>/test/<defect>/*.png`, masks in
`<root>/<category>/ground_truth/<defect>/<stem>_mask.png`; `good` is normal."""

from __future__ import annotations

from pathlib import Path

from .core import IMAGE_EXTENSIONS, Category, DataError, Sample


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (extension case-insensitive), sorted by name."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def pick_categories(requested, found: list[str], dataset: str, where) -> list[str]:
    """The requested names (all found ones when None), checked against what exists."""
    if requested is None:
        if not found:
            raise DataError(f"no {dataset} category found under {where}")
        return found
    names = [requested] if isinstance(requested, str) else list(requested)
    for name in names:
        if name not in found:
            raise DataError(
                f"unknown {dataset} category {name!r} under {where}; "
                f"found: {', '.join(found) if found else 'none'}"
            )
    return names


def _category(root: Path, name: str) -> Category:
    test, truth = root / name / "test", root / name / "ground_truth"
    samples = []
    for defect_dir in subfolders(test):
        defect = defect_dir.name
        for path in image_files(defect_dir):
            if defect == "good":
                samples.append(Sample(str(path), 0, None, defect))
                continue
            mask = truth / defect / f"{path.stem}_mask.png"
            samples.append(Sample(str(path), 1, str(mask) if mask.is_file() else None, defect))
    if not samples:
        raise DataError(f"no test images in {test}")
    return Category(name=name, dataset="mvtec", samples=tuple(samples))


def list_mvtec(root, categories=None) -> list[Category]:
    """Test split of MVTec AD categories (all found under `root`, sorted, when None).

    Samples are sorted by defect folder, then file name. An anomalous image whose
    mask file is absent gets mask_path None; `validate_category` reports it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MVTec AD root folder not found: {root}")
    found = [d.name for d in subfolders(root) if (d / "test").is_dir()]
    return [_category(root, name) for name in pick_categories(categories, found, "MVTec AD", root)]
