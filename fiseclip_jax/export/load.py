"""`load_exported(DIR)`: an export directory (write.py) back as a callable detector.

    detector = load_exported("export/")
    det = detector(["a.png", "b.png"])        # Detection(image_scores [N], anomaly_maps [N, S, S], num_refs [N])

Images are preprocessed exactly as `detect` does (the method's `prepare` at the exported size and resample),
scored in calls of the exported batch (padded and masked), the carried state threaded in file order. Only
jax, numpy and orbax are needed to run the program itself (see the README's snippet); this class adds the
preprocessing, batching and checks: a platform the export does not cover, or arrays of another shape than the
program takes, is one FiseclipError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from ..bank import masked_quantile, method_from_record
from ..cache import tree_fingerprint
from ..clip.config import CLIPConfig
# detect's own loader, padding and progress bar: preprocessing and batching exactly as `detect` does
from ..detect import GroupResult, _load_group, _pad, _progress, bank_groups, category_groups
from ..errors import FiseclipError
from ..methods import Detection, Method
from .program import batch_is_reference_set, current_platform
from .write import ARRAYS, FORMAT, PROGRAM, RECORD


class ExportedDetector:
    """An exported program with its arrays. `record` is export.json; `method`, `size`, `class_name`, `clip`
    (CLIPConfig) and `batch` (None: symbolic, else N) come from it."""

    def __init__(self, path: Path, record: dict, exported, args: dict, state: dict):
        self.path, self.record, self.exported = path, record, exported
        self.args, self.initial_state = args, state
        self.method: Method = method_from_record(record["config"])
        self.size: int = int(record["size"])
        self.resample: str = record["preprocessing"]["resample"]
        self.class_name: str = record["class_name"]
        self.clip = CLIPConfig.from_dict(record["clip"])
        self.batch: Optional[int] = None if record["batch"] == "dynamic" else int(record["batch"])
        self.is_bank = "bank" in record
        self._call = jax.jit(exported.call)

    def run(self, pixels, valid=None, state=None) -> tuple[Detection, dict]:
        """One call of the program: pixels [B, S, S, 3] (CLIP-normalised), valid [B] -> (Detection, next state);
        state: what the previous call returned (default: the exported initial state)."""
        pixels = jnp.asarray(pixels, jnp.float32)
        valid = jnp.ones(pixels.shape[0], bool) if valid is None else jnp.asarray(valid, bool)
        if self.batch is not None and pixels.shape[0] != self.batch:
            raise FiseclipError(f"{self.path}: exported for batches of {self.batch} images, got {pixels.shape[0]} "
                                "(pad and mask with valid, or call the detector on a list of images)")
        if tuple(pixels.shape[1:]) != (self.size, self.size, 3):
            raise FiseclipError(f"{self.path}: exported for inputs [B, {self.size}, {self.size}, 3], got "
                                f"{list(pixels.shape)}")
        scores, maps, refs, state = self._call(self.args, pixels, valid,
                                               self.initial_state if state is None else state)
        return Detection(scores, maps, refs), state

    def groups(self, n: int, encode_batch: int = 8) -> list[tuple[int, int]]:
        """[(lo, hi)] the images of each call for a category of n images (as `detect` groups them)."""
        width = self.batch or encode_batch
        if self.is_bank:
            return bank_groups(n, width)
        groups = category_groups(self.method, n, width)
        if batch_is_reference_set(self.method) and self.batch is not None and groups[0][1] - groups[0][0] > width:
            raise FiseclipError(f"{self.path}: {self.method.label} scores a whole category in one call and was "
                                f"exported for at most {width} images; got {n}: export again with --batch {n}")
        return groups

    def iter_groups(self, images: Sequence[Any], *, encode_batch: int = 8, progress: bool | Callable = True,
                    skip_groups=(), feature_store=None, skip_errors: bool = False) -> Iterator[GroupResult]:
        """`detect.iter_detect` for the exported program: one GroupResult per call, in file order, the carried
        state threaded from call to call (kept in `feature_store` so that a resumed run skips `skip_groups`)."""
        n = len(images)
        if n == 0:
            raise FiseclipError(f"no images for category {self.class_name!r}")
        groups, width = self.groups(n, encode_batch), self.batch or encode_batch
        carries = set(self.initial_state) != {"images"}
        state, skip_groups = self.initial_state, set(skip_groups)
        bar = _progress(progress, n, self.class_name)
        try:
            for g, (lo, hi) in enumerate(groups):
                key = f"state-{g:06d}"
                if g in skip_groups:
                    stored = feature_store.get(key) if (carries and feature_store is not None) else None
                    if not carries or stored is not None:
                        state = state if stored is None else {k: jnp.asarray(v) for k, v in stored["features"].items()}
                        bar.update(hi - lo)
                        continue
                xs, good, errors = _load_group(images, lo, hi, self.method, self.size, self.resample, skip_errors)
                k = len(xs)
                if k:
                    det, state = self.run(_pad(np.stack(xs), width), np.arange(width) < k, state)
                    det = Detection(*(np.asarray(a)[:k] for a in det))
                else:
                    det = Detection(np.zeros((0,), np.float32), np.zeros((0, self.size, self.size), np.float32),
                                    np.zeros((0,), np.int32))
                if carries and feature_store is not None:
                    feature_store[key] = {"features": {k_: np.asarray(v) for k_, v in state.items()},
                                          "indices": np.zeros(0, int), "errors": {}}
                yield GroupResult(g, good, det.image_scores, det.anomaly_maps, det.num_refs, errors)
                bar.update(hi - lo)
        finally:
            bar.close()

    def __call__(self, images: Sequence[Any], *, encode_batch: int = 8, progress: bool = False) -> Detection:
        """Images (paths, PIL images or uint8 HWC arrays), in order -> Detection of numpy arrays."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        parts = list(self.iter_groups(images, encode_batch=encode_batch, progress=progress))
        return Detection(*(np.concatenate([getattr(p, name) for p in parts])
                           for name in ("image_scores", "anomaly_maps", "num_refs")))

    def threshold(self, fpr: float = 0.01) -> float:
        """Bank detection: the bank's (1 − fpr) normal-score quantile, as `bank_threshold` gives it."""
        if not self.is_bank:
            raise FiseclipError(f"{self.path}: not a bank detector: pass a threshold")
        if not 0.0 <= fpr <= 1.0:
            raise FiseclipError(f"--fpr must be between 0 and 1, got {fpr}")
        bank = self.args["bank"]
        return float(masked_quantile(bank["calib"]["score"], bank["valid"], 1.0 - fpr))


def read_export_json(path) -> dict:
    """export.json of an export directory; a clear error if `path` is not one."""
    path = Path(path)
    try:
        record = json.loads((path / RECORD).read_text())
    except FileNotFoundError:
        raise FiseclipError(f"{path} is not an export (no {RECORD}): make one with `fiseclip-jax export ... "
                            "--out DIR`") from None
    except (OSError, ValueError) as err:
        raise FiseclipError(f"cannot read the export {path}: {err}") from None
    if record.get("format") != FORMAT:
        raise FiseclipError(f"{path}: export format {record.get('format')!r}, this version reads {FORMAT}; export "
                            "again")
    return record


def _keys(tree) -> dict[str, Any]:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_arrays(path, restored: dict, exported) -> None:
    """The restored {"args", "state"} must have the structure, shapes and dtypes the program takes."""
    (args, _, _, state), _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
    expected = _keys({"args": args, "state": state})
    found = _keys(restored)
    probs = [f"missing {k}" for k in expected if k not in found]
    probs += [f"unexpected {k}" for k in found if k not in expected]
    probs += [f"{k}: {tuple(np.shape(found[k]))} {np.dtype(found[k].dtype)} where the program takes "
              f"{tuple(a.shape)} {np.dtype(a.dtype)}" for k, a in expected.items()
              if k in found and (tuple(np.shape(found[k])) != tuple(a.shape) or np.dtype(found[k].dtype) != a.dtype)]
    if probs:
        more = f"; ... ({len(probs) - 4} more)" if len(probs) > 4 else ""
        raise FiseclipError(f"{path / ARRAYS} does not fit the exported program (arrays of another model or "
                            f"export): {'; '.join(probs[:4])}{more}")


def load_exported(path) -> ExportedDetector:
    """An export directory (`export_detector`, `fiseclip-jax export`) -> ExportedDetector, after checking that
    it covers this machine's platform and that its arrays fit the program."""
    import orbax.checkpoint as ocp  # 2 s to import: only when an export is written or read

    path = Path(path).expanduser()
    record = read_export_json(path)
    here = current_platform()
    if here not in record["platforms"]:
        raise FiseclipError(f"{path} was exported for {','.join(record['platforms'])}, this machine computes on "
                            f"{here}: export again with --platforms {','.join(record['platforms'] + [here])}")
    try:
        exported = jax_export.deserialize(bytearray((path / PROGRAM).read_bytes()))
    except OSError as err:
        raise FiseclipError(f"cannot read the exported program {path / PROGRAM}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- a corrupt or foreign file, whatever the parser says
        raise FiseclipError(f"{path / PROGRAM} is not a serialized jax.export program ({type(err).__name__}: "
                            f"{str(err)[:200]})") from None
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore((path / ARRAYS).resolve())
    except Exception as err:  # noqa: BLE001 -- orbax raises many types for a missing or broken tree
        raise FiseclipError(f"cannot read the arrays {path / ARRAYS}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None
    check_arrays(path, restored, exported)
    args, state = jax.tree.map(jnp.asarray, (restored["args"], restored["state"]))
    if tree_fingerprint(args["params"]) != record["weights_fingerprint"]:
        raise FiseclipError(f"{path / ARRAYS} holds other weights than {path / RECORD} records (fingerprint "
                            f"{record['weights_fingerprint'][:12]}): export again")
    return ExportedDetector(path, record, exported, args, state)
