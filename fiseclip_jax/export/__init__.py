"""Export a detector as one serialized `jax.export` program that runs without the model code.

    export_detector(params, cfg, method, class_name="bottle", out="export/")   # or fiseclip-jax export
    detector = load_exported("export/")
    det = detector(["a.png", "b.png"])                                       # Detection

See program.py (the function and its calling convention), write.py (the directory), load.py.
"""

from .load import ExportedDetector, check_arrays, load_exported, read_export_json
from .program import PLATFORMS, batch_is_reference_set, build_program, check_platforms, current_platform
from .write import CALL, DYNAMIC, export_detector, resolve_batch

__all__ = ["CALL", "DYNAMIC", "PLATFORMS", "ExportedDetector", "batch_is_reference_set", "build_program",
           "check_arrays", "check_platforms", "current_platform", "export_detector", "load_exported",
           "read_export_json", "resolve_batch"]
