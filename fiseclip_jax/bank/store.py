"""Saving and loading reference banks, and the weights fingerprint a bank records.

A bank directory holds

    bank.json     format, mode, method record, CLIP config, image size, class name, weights spec and
                  fingerprint, array shapes, the name of the arrays folder, and free-form "notes"
    arrays-N/     orbax StandardCheckpointer tree of the bank's arrays

Saving over an existing bank writes arrays-(N+1) first and then replaces bank.json atomically, so the
directory always names a complete bank, even if the save is cut short (the `watch` checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .. import methods
from ..clip.config import CLIPConfig
from ..errors import FiseclipError
from ..methods import Method
from .core import Bank, BankMeta
from .fingerprint import weights_fingerprint

FORMAT = 1
_ARRAYS = ("features", "allowed", "source", "cls", "valid", "ids", "count")


def _like(template, value):
    """A JSON value back into the form of a config field (lists -> tuples, dicts -> nested configs)."""
    if isinstance(value, list):
        return tuple(_like(None, v) for v in value)
    if isinstance(value, dict) and dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **{k: _like(getattr(template, k), v) for k, v in value.items()})
    return value


def method_from_record(record: dict) -> Method:
    """The method config a `Method.record()` describes, through the registry."""
    record = dict(record)
    base = methods.get(record.pop("method"))
    fields = {f.name: _like(getattr(base, f.name), record[f.name]) for f in dataclasses.fields(base)
              if f.name in record}
    return dataclasses.replace(base, **fields)


def _arrays(bank: Bank) -> dict:
    return {**{name: getattr(bank, name) for name in _ARRAYS}, "calib": dict(bank.calib)}


def bank_info(bank: Bank) -> dict:
    """What bank.json records about a bank (JSON-able)."""
    m = bank.meta
    shapes = jax.tree.map(lambda a: {"shape": list(np.shape(a)), "dtype": str(jnp.asarray(a).dtype)}, _arrays(bank))
    return {"format": FORMAT, "mode": m.mode, "method": m.method.record(), "clip": m.clip.to_dict(), "size": m.size,
            "class_name": m.class_name, "weights": m.weights, "fingerprint": m.fingerprint, "budget": m.budget,
            "coreset_dim": m.coreset_dim, "capacity": bank.capacity, "images": int(np.sum(np.asarray(bank.valid))),
            "count": int(bank.count), "arrays": shapes}


def bank_digest(bank: Bank) -> str:
    """A hash of what decides a bank's results: its record and its normal statistics (a run's identity)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in bank_info(bank).items() if k != "arrays"},
                                  sort_keys=True).encode())
    for leaf in jax.tree.leaves((bank.calib, bank.ids, bank.valid)):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()[:20]


def save_bank(path, bank: Bank, *, overwrite: bool = False, notes: dict | None = None) -> Path:
    """Write a bank to the directory `path` (orbax arrays + bank.json with `notes`); atomic (module docstring)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    old = read_bank_json(path) if (path / "bank.json").exists() else None
    if path.exists() and not overwrite:
        raise FiseclipError(f"{path} already exists: pass --overwrite (overwrite=True) to replace it")
    if path.exists() and old is None:
        if not path.is_dir() or any(path.iterdir()):
            raise FiseclipError(f"{path} exists and is not a reference bank: choose another path")
    n = int(old["arrays_dir"].rsplit("-", 1)[1]) + 1 if old else 0
    build = path if old else path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(build / f"arrays-{n}", ignore_errors=True) if old else shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True, exist_ok=True)
    stored = jax.tree.map(lambda a: a if np.size(a) else None, _arrays(bank))  # orbax refuses empty arrays
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(build / f"arrays-{n}", stored)
        ckpt.wait_until_finished()
    record = {**bank_info(bank), "arrays_dir": f"arrays-{n}", "notes": notes or {}}
    tmp = build / "bank.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, build / "bank.json")
    if old:
        shutil.rmtree(path / old["arrays_dir"], ignore_errors=True)
    else:
        if path.exists():
            path.rmdir()  # an empty folder
        os.replace(build, path)
    return path


def read_bank_json(path) -> dict:
    """bank.json of a bank directory; a clear error if `path` is not one."""
    path = Path(path)
    try:
        record = json.loads((path / "bank.json").read_text())
    except FileNotFoundError:
        raise FiseclipError(f"{path} is not a reference bank (no bank.json): build one with "
                            "`fiseclip-jax bank build GOOD_DIR ... --out BANK`") from None
    except (OSError, ValueError) as err:
        raise FiseclipError(f"cannot read the reference bank {path}: {err}") from None
    if record.get("format") != FORMAT:
        raise FiseclipError(f"{path}: bank format {record.get('format')!r}, this version reads {FORMAT}; "
                            "build the bank again")
    return record


def meta_from_record(record: dict) -> BankMeta:
    return BankMeta(record["mode"], method_from_record(record["method"]), CLIPConfig.from_dict(record["clip"]),
                    int(record["size"]), record["fingerprint"], record["class_name"], record["weights"],
                    int(record["budget"]), int(record["coreset_dim"]))


def check_compatible(record: dict, path, *, params=None, cfg: CLIPConfig | None = None, size: int | None = None):
    """Raise a clear error when the bank at `path` was built with other weights, CLIP config or image size."""
    if cfg is not None and CLIPConfig.from_dict(record["clip"]) != cfg:
        raise FiseclipError(f"the bank {path} was built with CLIP {record['clip']['name']}, not {cfg.name}: load "
                            f"its weights ({record['weights']}) or build another bank")
    if params is not None and weights_fingerprint(params) != record["fingerprint"]:
        raise FiseclipError(f"the bank {path} was built with other weights ({record['weights'] or 'unnamed'}, "
                            f"fingerprint {record['fingerprint']}): load those weights or build another bank")
    if size is not None and int(size) != int(record["size"]):
        raise FiseclipError(f"the bank {path} was built at size {record['size']}, not {size}: use its size or "
                            "build another bank")


def load_bank(path, *, params=None, cfg: CLIPConfig | None = None, size: int | None = None) -> Bank:
    """The bank saved at `path`. With params / cfg / size, a bank built with other weights, another CLIP
    config or another image size is refused with a clear error (before its arrays are read)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    record = read_bank_json(path)
    check_compatible(record, path, params=params, cfg=cfg, size=size)
    is_spec = lambda x: isinstance(x, dict) and "shape" in x  # noqa: E731
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"])),
                            record["arrays"], is_leaf=is_spec)
    stored = jax.tree.map(lambda a: a if np.prod(a.shape) else None, abstract)
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path / record["arrays_dir"], stored)
    tree = jax.tree.map(lambda a, like: jnp.zeros(like.shape, like.dtype) if a is None else a, tree, abstract,
                        is_leaf=lambda x: x is None)
    return Bank(**{name: jnp.asarray(tree[name]) for name in _ARRAYS},
                calib={k: jnp.asarray(v) for k, v in tree["calib"].items()}, meta=meta_from_record(record))
