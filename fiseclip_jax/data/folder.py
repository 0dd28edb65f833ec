"""Plain-folder reader: your own images, with or without labels and masks.

Images (png, jpg, jpeg, bmp, tif, tiff; any case) directly in `root` and in its
direct sub-folders. Images in a sub-folder are labelled from its name: `good`
is normal (0), any other name anomalous (1), the name kept as `defect`. Images
directly in `root` have label None. Masks, when a masks folder is given, are
matched by file stem: `<masks>/<defect>/<stem>.png` or `<stem>_mask.png` first,
then `<masks>/<stem>.png` or `<stem>_mask.png` (names compared case-insensitively);
normal (`good`) images get no mask.
"""

from __future__ import annotations

from pathlib import Path

from .core import Category, DataError, IMAGE_EXTENSIONS, Sample
from .mvtec import image_files, subfolders


def _mask_index(folder: Path) -> dict[str, Path]:
    """lower-case file name -> path, for the .png files directly in folder."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png"}


def list_folder(root, masks=None, name=None) -> Category:
    """One category from a folder of images (rules in the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    masks_dir = Path(masks) if masks is not None else None
    if masks_dir is not None and not masks_dir.is_dir():
        raise DataError(f"masks folder not found: {masks_dir}")

    groups: list[tuple[str | None, list[Path]]] = [(None, image_files(root))]
    for sub in subfolders(root):
        if masks_dir is not None and sub.resolve() == masks_dir.resolve():
            continue
        groups.append((sub.name, image_files(sub)))
    if not any(files for _, files in groups):
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {root} or its sub-folders")

    flat = _mask_index(masks_dir) if masks_dir is not None else {}
    claimed: dict[Path, Path] = {}  # flat mask -> image, to catch one mask matched twice
    samples = []
    for defect, files in groups:
        label = None if defect is None else int(defect != "good")
        nested = _mask_index(masks_dir / defect) if (masks_dir is not None and defect) else {}
        for path in files:
            mask = None
            if masks_dir is not None and label != 0:
                candidates = (f"{path.stem}.png".lower(), f"{path.stem}_mask.png".lower())
                mask = next((nested[c] for c in candidates if c in nested), None)
                if mask is None:
                    mask = next((flat[c] for c in candidates if c in flat), None)
                    if mask is not None and mask in claimed:
                        raise DataError(
                            f"mask {mask} matches both {claimed[mask]} and {path}; "
                            f"put masks in <masks>/<sub-folder>/ to tell them apart"
                        )
                    if mask is not None:
                        claimed[mask] = path
            samples.append(Sample(str(path), label, str(mask) if mask else None, defect))
    return Category(
        name=name if name is not None else root.resolve().name,
        dataset="folder",
        samples=tuple(samples),
        has_masks=masks_dir is not None,
    )


# Folder names of dataset layouts that are not the product: MVTec <class>/test/<defect>, VisA
# <class>/Data/Images/{Normal,Anomaly}, and the usual split names.
_LAYOUT_NAMES = {"test", "train", "val", "validation", "good", "ok", "ng", "normal", "anomaly", "defect", "defects",
                 "images", "data", "ground_truth"}


def infer_class_name(folder) -> tuple[str, str]:
    """(class name for the prompts, how it was found) from a folder path: the folder's own name, or,
    when that is a layout name (MVTec `bottle/test`, `bottle/test/broken_large`, VisA
    `candle/Data/Images/Anomaly`), the nearest ancestor that is not. Underscores become spaces."""
    path = Path(folder).resolve()
    parts = [path, *path.parents]
    names = [p.name for p in parts if p.name]
    for i, name in enumerate(names):
        under_split = i + 1 < len(names) and names[i + 1].lower() in ("test", "train")
        if name.lower() not in _LAYOUT_NAMES and not under_split:
            how = "the folder name" if i == 0 else f"the folder path ({'/'.join(reversed(names[:i + 1]))})"
            return name.replace("_", " "), how
    return path.name.replace("_", " "), "the folder name"
