"""Dataset readers (MVTec AD, VisA, a plain folder) and image / mask loading (SPEC §5)."""

from .core import (
    IMAGE_EXTENSIONS,
    MVTEC_CATEGORIES,
    MVTEC_TEXTURES,
    VISA_CATEGORIES,
    Category,
    DataError,
    Sample,
)
from .folder import infer_class_name, list_folder
from .images import image_size, load_image, load_mask
from .mvtec import list_mvtec
from .validate import validate_category
from .visa import list_visa

__all__ = [
    "IMAGE_EXTENSIONS",
    "MVTEC_CATEGORIES",
    "MVTEC_TEXTURES",
    "VISA_CATEGORIES",
    "Category",
    "DataError",
    "Sample",
    "image_size",
    "infer_class_name",
    "list_folder",
    "list_mvtec",
    "list_visa",
    "load_image",
    "load_mask",
    "validate_category",
]
