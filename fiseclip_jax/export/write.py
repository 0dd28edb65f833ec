"""`export_detector`: one method (or bank detection) for one class as a serialized `jax.export` program.

An export directory holds

    export.json   what the program computes and how to call it: method and its resolved config, class name,
                  size, batch ("dynamic" or N), preprocessing constants, weights spec and fingerprint,
                  platforms, the calling convention, library and jax versions
    program.bin   `Exported.serialize()` of program(args, pixels, valid, state) (program.py)
    arrays/       orbax StandardCheckpointer tree {"args": ..., "state": ...}: the CLIP parameters, text
                  features and bank are arguments of the program, not constants baked into it

The directory is written to a temporary sibling and renamed: an interrupted export leaves nothing half-made.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from ..bank import Bank, bank_digest
from ..cache import tree_fingerprint
from ..clip.config import CLIP_MEAN, CLIP_STD, CLIPConfig
from ..clip.preprocess import RESAMPLE
from ..errors import FiseclipError
from ..methods import Method
from ..outputs import library_versions
from ..prompts import text_features_full
from .program import batch_is_reference_set, build_program, check_platforms

FORMAT = 1
RECORD, PROGRAM, ARRAYS = "export.json", "program.bin", "arrays"
DYNAMIC = "dynamic"
CALL = ("program(args, pixels [B, S, S, 3] float32 CLIP-normalised NHWC, valid [B] bool, state) -> "
        "(image_scores [B], anomaly_maps [B, S, S], num_refs [B], next state); args and the first state are "
        "arrays/ {'args', 'state'}; pass each call's returned state to the next call (file order)")


def resolve_batch(method: Method, batch: Union[int, str, None], *, bank: bool) -> Optional[int]:
    """None (a symbolic batch dimension) or the fixed batch N; the batch-as-reference-set methods need N."""
    if batch in (None, DYNAMIC):
        if batch_is_reference_set(method) and not bank:
            raise FiseclipError(f"--batch dynamic: {method.label} matches the images of one call against each other "
                                "(top-k over the batch), so its program depends on the batch size; pass --batch N "
                                "(N images per call; a category of up to N images is scored in one call), or "
                                "export bank detection (--bank), which scores any number of images")
        return None
    try:
        n = int(batch)
    except (TypeError, ValueError):
        raise FiseclipError(f"--batch {batch!r}: a number of images per call, or {DYNAMIC!r}") from None
    if n < 1:
        raise FiseclipError(f"--batch {n}: must be at least 1")
    if batch_is_reference_set(method) and not bank and n < method.min_images:
        raise FiseclipError(f"--batch {n}: {method.label} needs at least {method.min_images} images per call")
    return n


def export_detector(params, cfg: CLIPConfig, method: Optional[Method], *, out, class_name: str = "",
                    size: Optional[int] = None, bank: Optional[Bank] = None, platforms=("cpu", "cuda", "tpu"),
                    batch: Union[int, str, None] = DYNAMIC, weights: str = "", random_weights: bool = False,
                    resample: str = "bicubic", overwrite: bool = False, text=None,
                    say: Callable[[str], None] = lambda msg: None) -> dict:
    """Export `method` for `class_name` at `size` (or, with a `bank`, detection against it: method, size and
    class name are the bank's) into the directory `out`; returns the record written as export.json.

    batch: "dynamic" (symbolic: any number of images per call; AnoCLIP(+), bank detection) or N (fixed; MuSc
    and FiSeCLIP, whose scores depend on the batch, get their batch size set to N). platforms: any of cpu,
    cuda, rocm, tpu (lowered for each, whatever this machine has).
    """
    platforms = check_platforms(platforms)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FiseclipError(f"--out {out}: exists and is not empty (pass --overwrite to replace an export)")
        if not (out / RECORD).is_file():
            raise FiseclipError(f"--out {out}: holds something other than an export (no {RECORD}); not replaced")
    if resample not in RESAMPLE:
        raise FiseclipError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if bank is not None:
        if method is not None and method != bank.meta.method:
            raise FiseclipError(f"--method {method.label}: the bank was built with {bank.meta.method.label}")
        if size is not None and size != bank.meta.size:
            raise FiseclipError(f"--size {size}: the bank was built at {bank.meta.size}")
        method, size, class_name = bank.meta.method, bank.meta.size, bank.meta.class_name
    if method is None:
        raise FiseclipError("export needs a method (or a bank)")
    size = int(size or cfg.vision.image_size)
    if size < 1 or size % cfg.vision.patch_size:
        raise FiseclipError(f"--size {size} is not divisible by the patch size {cfg.vision.patch_size} of {cfg.name}")
    if getattr(method, "tiles", 1) != 1:
        raise FiseclipError(f"{method.label} with tiles gives non-square inputs; export supports S×S inputs only")
    if method.prompts is not None and not class_name:
        raise FiseclipError(f"--class-name is required: {method.label} encodes prompts for the class")
    n = resolve_batch(method, batch, bank=bank is not None)
    if n is not None and bank is None and batch_is_reference_set(method):
        method = method.with_run_options(batch_size=n)
    if method.prompts is not None and text is None:
        say(f"encoding the {method.prompts} prompts for {class_name!r}")
        text = text_features_full(params, cfg, class_name, method.prompts)
    program, args, state = build_program(params, cfg, method, size, text, bank)

    say(f"exporting {method.label}{' bank detection' if bank is not None else ''} at {size}px, batch "
        f"{n or DYNAMIC}, for {','.join(platforms)}")
    t0 = time.perf_counter()
    b = jax_export.symbolic_shape("b")[0] if n is None else n
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype)  # noqa: E731
    exported = jax_export.export(jax.jit(program), platforms=platforms)(
        jax.tree.map(spec, args), jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((b,), jnp.bool_), jax.tree.map(spec, state))
    blob = exported.serialize()
    export_s = time.perf_counter() - t0

    record = {
        "format": FORMAT, "method": method.label, "config": method.record(), "class_name": class_name,
        "size": size, "batch": DYNAMIC if n is None else n, "clip": cfg.to_dict(),
        "preprocessing": {"size": [size, size], "resample": resample, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                          "layout": "NHWC float32, (uint8 / 255 - mean) / std, the whole image resized to S×S "
                                    "with PIL (antialiased)"},
        "weights": weights, "weights_fingerprint": tree_fingerprint(params), "random_weights": bool(random_weights),
        "platforms": list(platforms), "call": CALL,
        "program_bytes": len(blob), "export_seconds": round(export_s, 3),
        "matmul_precision": jax.config.jax_default_matmul_precision,  # baked into the program when lowered
        "versions": library_versions(),
    }
    if bank is not None:
        record["bank"] = {"mode": bank.meta.mode, "images": int(np.sum(np.asarray(bank.valid))),
                          "fingerprint": bank.meta.fingerprint, "digest": bank_digest(bank),
                          "weights": bank.meta.weights}
    if random_weights:
        record["warning"] = "random weights: scores and maps are meaningless"
    _write(out, blob, {"args": args, "state": state}, record, overwrite)
    return record


def _write(out: Path, blob, arrays: dict, record: dict, overwrite: bool) -> None:
    import orbax.checkpoint as ocp  # 2 s to import: only when an export is written or read

    out = out.resolve()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / PROGRAM).write_bytes(bytes(blob))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / ARRAYS, jax.tree.map(jnp.asarray, arrays))
            ckpt.wait_until_finished()
        (tmp / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if out.exists():
            if not overwrite:
                raise FiseclipError(f"--out {out}: appeared while exporting; not replaced")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
