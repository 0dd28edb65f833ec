import os
from pathlib import Path

import jax
import pytest

# Parity is asserted in float32: never let XLA pick a lower matmul precision.
jax.config.update("jax_default_matmul_precision", "float32")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MVTEC_ROOT = Path(os.environ.get("FISECLIP_MVTEC_ROOT", SHARED / "data" / "mvtec_ad"))


@pytest.fixture(scope="session")
def mvtec_root():
    if not (MVTEC_ROOT / "bottle" / "test").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {MVTEC_ROOT}")
    return MVTEC_ROOT
