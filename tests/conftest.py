import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

# Parity is asserted in float32: never let XLA pick a lower matmul precision.
jax.config.update("jax_default_matmul_precision", "float32")


def pytest_configure(config):
    """Point the user cache folder at a fresh temporary folder for the whole session (and its
    subprocesses), before anything is imported or collected: tests never touch the real cache."""
    config._fiseclip_cache = tempfile.mkdtemp(prefix="fiseclip-test-cache-")
    config._fiseclip_cache_was = os.environ.get("FISECLIP_CACHE")
    os.environ["FISECLIP_CACHE"] = config._fiseclip_cache


def pytest_unconfigure(config):
    if getattr(config, "_fiseclip_cache", None):
        shutil.rmtree(config._fiseclip_cache, ignore_errors=True)
        if config._fiseclip_cache_was is None:
            os.environ.pop("FISECLIP_CACHE", None)
        else:
            os.environ["FISECLIP_CACHE"] = config._fiseclip_cache_was


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MVTEC_ROOT = Path(os.environ.get("FISECLIP_MVTEC_ROOT", SHARED / "data" / "mvtec_ad"))


@pytest.fixture(scope="session")
def mvtec_root():
    if not (MVTEC_ROOT / "bottle" / "test").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {MVTEC_ROOT}")
    return MVTEC_ROOT
