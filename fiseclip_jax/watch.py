"""`Watch`: score each new image of a folder as it appears (the `watch` command, online inspection).

    OUT/scores.csv  one row per file, appended (and synced) as soon as it is scored:
                    file, score, label, decision, admitted, error
    OUT/overlays/   image | heat map of each file, written at once, one colour scale for the whole stream
    OUT/bank/       the bank as updated so far (--update gated), saved whenever it changes
    OUT/run.json    the run's options, written at the start; what it did, added when it stops

Files are the images directly in DIR and in its direct sub-folders (as for `detect`), oldest first. A
file that cannot be decoded is tried again at every poll while it changes (it is being written); once it
has stayed unchanged for `settle` seconds it gets an error row and a warning, and the stream goes on.

A restart with the same options continues where the last run stopped: a file with a score is never
scored again, the bank is read back from OUT/bank, and decisions keep the threshold of the first run.
Each admitted image is saved into OUT/bank before its row is appended, and the bank records that row,
so a run killed between the two writes loses nothing (the row is appended on restart).

Gated updates (`update="gated"`): an image joins the bank only if it looks confidently normal, i.e.
each of the method's gate statistics (its score; for FiSeCLIP also its CLS text score: the text branch
must agree) is at most the `gate_quantile` of the bank's normal values (`bank.gate`). The decision
threshold stays the one the run started with.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

from .bank import Bank, bank_digest, detect_with_bank, gate, load_bank, read_bank_json, save_bank, update_bank
from .clip.preprocess import preprocess
from .data import IMAGE_EXTENSIONS, load_image
from .detect import detect
from .errors import FiseclipError
from .outputs import WRITE_LOCK, atomic_write_text, check_out, library_versions, overlay_name
from .overlay import side_by_side
from .prompts import text_features_full
from .runner import decide, resolve_threshold

COLUMNS = ("file", "score", "label", "decision", "admitted", "error")
OUTPUTS = ("scores.csv", "run.json", "overlays", "bank")
UPDATES = ("none", "gated")


@dataclasses.dataclass
class WatchPlan:
    folder: Path
    out: Path
    resume: bool  # OUT holds an earlier watch run: continue it


def plan_watch(folder, out, *, overwrite: bool = False) -> WatchPlan:
    """Check the watched folder and --out before any weights load; `overwrite` clears an earlier run."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FiseclipError(f"watch folder not found: {folder}")
    check_out(out, folder, overwrite=False, resume=True)
    earlier = out.is_dir() and any(out.iterdir())
    if earlier and not overwrite and _read_json(out / "run.json").get("command") != "watch":
        raise FiseclipError(f"--out {out} is not empty and holds no watch run: choose another folder or pass "
                            "--overwrite")
    if earlier and overwrite:
        for name in OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return WatchPlan(folder, out, earlier and not overwrite)


def check_watch(method, has_bank: bool, update: str) -> None:
    """A method that compares images needs a bank; gated updates need one too (checked before weights load)."""
    if update not in UPDATES:
        raise FiseclipError(f"--update must be one of {UPDATES}, got {update!r}")
    if update == "gated" and not has_bank:
        raise FiseclipError("--update gated needs a reference bank (--bank)")
    if not has_bank and method.min_images > 1:
        raise FiseclipError(f"{method.label} compares images with each other: build a reference bank first "
                            "(`fiseclip-jax bank build`) and pass --bank")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _files(folder: Path) -> list[tuple[str, Path, str]]:
    """(relative name, path, label) of the images in folder and its direct sub-folders (good -> 0, other -> 1)."""
    out = []
    for sub in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = "" if sub == folder else str(int(sub.name != "good"))
        try:
            entries = list(sub.iterdir())
        except OSError:
            continue
        for p in entries:
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file():
                out.append((str(p.relative_to(folder)), p, label))
    return out


def _signature(path: Path):
    try:
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


@dataclasses.dataclass
class WatchCounts:
    scored: int = 0  # in this run
    failed: int = 0
    admitted: int = 0
    last_file: str = ""


class Watch:
    """One watch run over `plan.folder` (module docstring). `run()` loops until `max_files` files were handled,
    nothing new came for `until_idle` seconds, or forever; `finish(reason)` writes the closing run.json."""

    def __init__(self, params, cfg, plan: WatchPlan, *, method=None, bank: Bank | None = None, class_name=None,
                 size=None, update="none", poll=1.0, settle=5.0, threshold=None, fpr=0.01, gate_quantile=0.5,
                 max_files=None, until_idle=None, weights="", random_weights=False, seed=0,
                 say: Callable[[str], None] = lambda msg: None):
        check_watch(method if bank is None else bank.meta.method, bank is not None, update)
        self.params, self.cfg, self.plan, self.say = params, cfg, plan, say
        self.poll, self.settle, self.max_files, self.until_idle = poll, settle, max_files, until_idle
        self.update, self.gate_quantile = update, gate_quantile
        if bank is not None:
            method, size, class_name = bank.meta.method, bank.meta.size, bank.meta.class_name
        self.method, self.size, self.class_name = method, size or cfg.vision.image_size, class_name
        out = plan.out
        earlier = _read_json(out / "run.json") if plan.resume else {}
        decision = resolve_threshold(bank, threshold, fpr)
        scale = _overlay_scale(bank)
        self.config = json.loads(json.dumps({
            "folder": str(plan.folder.resolve()), "bank": None if bank is None else bank_digest(bank),
            "weights": weights, "seed": seed, "clip": cfg.to_dict(), "config": method.record(), "size": self.size,
            "class_name": class_name, "update": update, "gate_quantile": gate_quantile if update == "gated" else None,
            "threshold": threshold}, default=str))
        if plan.resume and earlier.get("run_config") != self.config:
            raise FiseclipError(f"--out {out} holds a watch run with other options (folder, bank, weights, method, "
                                "update or threshold): use the same options, another --out, or --overwrite")
        if plan.resume:  # decisions and colours stay those of the first run
            decision, scale = earlier.get("decision"), earlier.get("overlay_scale", scale)
        self.decision, self.scale = decision, scale
        self.bank = bank
        if plan.resume and (out / "bank" / "bank.json").exists():
            self.bank = load_bank(out / "bank", params=params, cfg=cfg)
        self.text = text_features_full(params, cfg, class_name, method.prompts) if method.prompts else None
        self.rows = self._open_csv()
        self.given_up: dict[str, tuple] = {}  # unreadable files with an error row -> signature then
        self.pending: dict[str, tuple] = {}  # unreadable files still changing -> (signature, since)
        self.counts = WatchCounts()
        self.record = {"command": "watch", "folder": str(plan.folder), "out": str(out), "class_name": class_name,
                       "method": method.label, "size": self.size, "weights": weights, "random_weights": random_weights,
                       "update": update, "decision": decision, "overlay_scale": scale, "run_config": self.config,
                       "versions": library_versions(), "state": "running"}
        out.mkdir(parents=True, exist_ok=True)
        (out / "overlays").mkdir(exist_ok=True)
        atomic_write_text(out / "run.json", json.dumps(self.record, indent=2, default=str))

    # -- files ---------------------------------------------------------------------------------------
    def _open_csv(self) -> dict[str, dict]:
        """Rows of an earlier run (a torn last line is dropped; a row the bank recorded is restored)."""
        path = self.plan.out / "scores.csv"
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        if not text:
            text = ",".join(COLUMNS) + "\n"
        self.plan.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        rows = {r["file"]: r for r in csv.DictReader(io.StringIO(text))}
        if self.bank is not None and (self.plan.out / "bank" / "bank.json").exists():
            last = read_bank_json(self.plan.out / "bank").get("notes", {}).get("last_row")
            if last and not rows.get(last["file"], {}).get("score"):
                self._append(last)
                rows[last["file"]] = last
        return rows

    def _append(self, row: dict) -> None:
        with open(self.plan.out / "scores.csv", "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, lineterminator="\n", extrasaction="ignore").writerow(row)
            f.flush()
            os.fsync(f.fileno())

    def new_files(self) -> list[tuple[str, Path, str]]:
        """Files without a score, oldest first; unreadable ones only when they changed since their error row."""
        out = []
        for rel, path, label in _files(self.plan.folder):
            row = self.rows.get(rel)
            if row is not None and row.get("score"):
                continue
            sig = _signature(path)
            if sig is None or (rel in self.given_up and self.given_up[rel] == sig):
                continue
            out.append((sig[1], rel, path, label))
        return [(rel, path, label) for _, rel, path, label in sorted(out)]

    # -- one file --------------------------------------------------------------------------------------
    def handle(self, rel: str, path: Path, label: str) -> bool:
        """Score one file and write its row and overlay; False if it is not readable (yet)."""
        sig = _signature(path)
        try:
            image = load_image(path)
        except FiseclipError as err:
            now = time.monotonic()
            seen = self.pending.get(rel)
            if seen is None or seen[0] != sig:
                if seen is None:
                    self.say(f"{rel}: not readable yet, waiting until it is complete")
                self.pending[rel] = (sig, now)
                return False
            if now - seen[1] < self.settle:
                return False
            self.say(f"warning: skipped {err} (unchanged for {self.settle:g} s)")
            row = {"file": rel, "label": label, "error": str(err)}
            with WRITE_LOCK:
                self._append(row)
                self.rows[rel] = row
                self.given_up[rel] = sig
                self.pending.pop(rel, None)
                self.counts.failed += 1
            return True
        self.pending.pop(rel, None)
        start = time.perf_counter()
        score, amap, admitted = self._score(image)
        ms = 1e3 * (time.perf_counter() - start)
        written = f"{score:.6f}"  # decided on the score as written: the CSV agrees with itself
        row = {"file": rel, "score": written, "label": label, "decision": decide(float(written), self.decision),
               "admitted": admitted, "error": ""}
        picture = side_by_side(image, amap, vmin=self.scale[0], vmax=self.scale[1])
        with WRITE_LOCK:
            tmp = self.plan.out / "overlays" / (".tmp-" + overlay_name(rel))
            picture.save(tmp, format="PNG")
            os.replace(tmp, self.plan.out / "overlays" / overlay_name(rel))
            if admitted == "yes":
                save_bank(self.plan.out / "bank", self.bank, overwrite=True, notes={"last_row": row})
            self._append(row)
            self.rows[rel] = row
            self.counts.scored += 1
            self.counts.admitted += admitted == "yes"
            self.counts.last_file = rel
        self.say(f"{rel}: score {score:.4f}{' ' + row['decision'] if row['decision'] else ''}"
                 f"{' (joined the bank)' if admitted == 'yes' else ''} in {ms:.0f} ms")
        return True

    def _score(self, image) -> tuple[float, np.ndarray, str]:
        pixels = preprocess([image], self.size)
        if self.bank is None:
            det = detect(self.params, self.cfg, pixels, self.text if self.text is not None else
                         jnp.zeros((2, self.cfg.embed_dim)), self.method)
            return float(det.image_scores[0]), np.asarray(det.anomaly_maps[0]), ""
        gated = self.update == "gated"
        out = detect_with_bank(self.params, self.cfg, self.bank, pixels, self.text, None, with_features=gated)
        det, feats = out if gated else (out, None)
        admitted = ""
        if gated:
            accept = gate(self.bank, feats, self.gate_quantile)
            admitted = "yes" if bool(accept[0]) else "no"
            if admitted == "yes":
                self.bank = update_bank(self.bank, feats, accept)
        return float(det.image_scores[0]), np.asarray(det.anomaly_maps[0]), admitted

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        handled, last = 0, time.monotonic()
        self.say(f"watching {self.plan.folder} (every {self.poll:g} s) with {self.method.label} at {self.size}px"
                 f"{'; the first image compiles' if not self.rows else ''}")
        while True:
            for rel, path, label in self.new_files():
                if self.handle(rel, path, label):
                    handled += 1
                    last = time.monotonic()
                    if self.max_files is not None and handled >= self.max_files:
                        return self.finish(f"--max-files {self.max_files} reached")
            if self.until_idle is not None and time.monotonic() - last >= self.until_idle:
                return self.finish(f"no new file for {self.until_idle:g} s (--until-idle)")
            time.sleep(self.poll)

    def finish(self, reason: str) -> dict:
        """Write the closing run.json (call with the write lock held or no write in flight)."""
        scored = sum(1 for r in self.rows.values() if r.get("score"))
        self.record.update(state="stopped", stopped=reason, this_run=dataclasses.asdict(self.counts),
                           num_scored=scored, num_errors=len(self.rows) - scored,
                           bank_images=None if self.bank is None else int(np.sum(np.asarray(self.bank.valid))))
        atomic_write_text(self.plan.out / "run.json", json.dumps(self.record, indent=2, default=str))
        return self.record


def _overlay_scale(bank: Bank | None) -> list[float]:
    """[vmin, vmax] of the overlays: the range of the bank's normal maps (red = beyond any known-good map), or
    [0, 1] without a bank (the maps of methods without references are probabilities)."""
    if bank is None:
        return [0.0, 1.0]
    ok = np.asarray(bank.valid)
    return [float(np.asarray(bank.calib["map_min"])[ok].min()), float(np.asarray(bank.calib["map_max"])[ok].max())]
