"""Dataset records shared by every reader: samples, categories, errors, constants."""

from __future__ import annotations

import dataclasses

from ..errors import FiseclipError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
# Lower-case suffixes of image files a folder reader picks up.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(FiseclipError):
    """A dataset file or folder is missing, unreadable or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str  # image file
    label: int | None  # 1 anomalous, 0 normal, None unknown
    mask_path: str | None  # ground-truth mask file; None for normal or unlabelled images
    defect: str | None  # sub-folder name, "good" for normal


@dataclasses.dataclass(frozen=True)
class Category:
    name: str  # e.g. "metal_nut"
    dataset: str  # "mvtec" | "visa" | "folder"
    samples: tuple[Sample, ...]
    # Whether anomalous samples must come with a mask (False: a folder read without masks).
    has_masks: bool = True

    @property
    def class_name(self) -> str:
        """The name used in text prompts: underscores to spaces (SPEC §3)."""
        return self.name.replace("_", " ")

    @property
    def labels(self) -> list[int | None]:
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)
