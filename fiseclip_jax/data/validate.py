"""Check a category before a long run: every file readable, masks where needed, sizes agree."""

from __future__ import annotations

from .core import Category, DataError
from .images import image_size

_MAX_LISTED = 20


def validate_category(cat: Category, *, skip_unreadable: bool = False) -> dict[str, str]:
    """Open every image and mask header (PIL `verify`) and raise one DataError listing
    each problem with its file: unreadable file, mask size != image size, anomalous
    image without a mask (when the dataset has masks).

    skip_unreadable=True: an image that cannot be read is not a problem but is returned,
    {path: why}, for the caller to leave out (masks must still be right)."""
    if not cat.samples:
        raise DataError(f"{cat.dataset} category {cat.name!r} has no samples")
    problems, unreadable = [], {}
    for s in cat.samples:
        try:
            height, width = image_size(s.path)
        except DataError as err:
            if skip_unreadable:
                unreadable[s.path] = str(err)
            else:
                problems.append(str(err))
            continue
        if s.mask_path is None:
            if s.label == 1 and cat.has_masks:
                problems.append(f"anomalous image {s.path} has no mask")
            continue
        try:
            mask_hw = image_size(s.mask_path, "mask")
        except DataError as err:
            problems.append(f"{err} (mask of {s.path})")
            continue
        if mask_hw != (height, width):
            problems.append(
                f"mask {s.mask_path} is {mask_hw[1]}x{mask_hw[0]} but its image {s.path} "
                f"is {width}x{height}"
            )
    if problems:
        listed = problems[:_MAX_LISTED]
        more = len(problems) - len(listed)
        raise DataError(
            f"{len(problems)} problem(s) in {cat.dataset} category {cat.name!r}:\n  "
            + "\n  ".join(listed)
            + (f"\n  ... and {more} more" if more else "")
        )
    return unreadable
