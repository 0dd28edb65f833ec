"""Writing results: --out checks, atomic files, run records (configuration, library versions), overlay names,
and the one write lock an interrupt waits for."""

from __future__ import annotations

import dataclasses
import os
import platform
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import FiseclipError

# One lock for every write of a run: an interrupt waits for the write in progress, then exits.
WRITE_LOCK = threading.Lock()


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on (recorded in run.json)."""
    out = {"python": platform.python_version()}
    for pkg in ("fiseclip-jax", "jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def overlay_name(rel: str) -> str:
    """An image path relative to its folder -> a flat PNG file name ("good/000.png" -> "good__000.png")."""
    return rel.replace(os.sep, "__").rsplit(".", 1)[0] + ".png"


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary sibling and rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclasses.dataclass
class Status:
    """How far a run is: items (images, or categories) finished of the total."""

    done: int = 0
    total: int = 0


def check_out(out: Path, inputs: Path, *, overwrite: bool, resume: bool) -> None:
    """--out must be (or can become) a writable folder outside the input tree, and hold no earlier
    results unless `overwrite` (they are cleared) or `resume`."""
    out, inputs = Path(out), Path(inputs)
    if out.exists() and not out.is_dir():
        raise FiseclipError(f"--out {out}: exists and is not a folder")
    resolved, source = out.resolve(), inputs.resolve()
    if resolved == source or source in resolved.parents:
        raise FiseclipError(f"--out {out} is inside the input folder {inputs}: the next run would read its outputs "
                            "as images; choose a folder outside it")
    ancestor = resolved
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FiseclipError(f"--out {out}: cannot create it, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise FiseclipError(f"--out {out}: cannot write into {ancestor} (permission denied)")
    if overwrite and resume:
        raise FiseclipError("--overwrite and --resume exclude each other: choose one")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise FiseclipError(f"--out {out} is not empty: pass --overwrite to replace what is there "
                            "or --resume to finish an interrupted run")
