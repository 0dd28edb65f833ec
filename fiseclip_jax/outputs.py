"""Writing results: atomic files, run records (configuration, library versions), overlay names."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


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
