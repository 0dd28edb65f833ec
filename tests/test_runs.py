"""Runs that never lose work (`fiseclip-jax detect`): checks before computing, one-line errors,
output folders, write-as-you-go and resume, bad files, Ctrl-C. Random tiny weights."""

import csv
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax.cli import main
from fiseclip_jax.data import infer_class_name

runner = importlib.import_module("fiseclip_jax.runner")
runner_detect = importlib.import_module("fiseclip_jax.detect")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "bottle"
TINY = ["--weights", "random:tiny", "--size", "32", "--no-progress"]


def rows(out):
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def folder_of(tmp_path, n=6, name="widget", size=40, seed=0):
    root = tmp_path / name
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = root / ("good" if i % 2 == 0 else "crack")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(sub / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------ bad input: one line, exit 2, before computing
def _cases(tmp):
    good = folder_of(tmp)
    empty = tmp / "empty"
    empty.mkdir()
    afile = tmp / "afile.txt"
    afile.write_text("x")
    full = tmp / "full"
    full.mkdir()
    (full / "scores.csv").write_text("file,score\n")
    one = folder_of(tmp, n=1, name="one")
    return [
        ("missing folder", [str(tmp / "nope"), "--out", str(tmp / "o1")], "nope"),
        ("empty folder", [str(empty), "--out", str(tmp / "o2")], "no images"),
        ("--out is a file", [str(good), "--out", str(afile)], "is not a folder"),
        ("--out under a file", [str(good), "--out", "/dev/null/out"], "/dev/null is not a folder"),
        ("--out inside the input", [str(good), "--out", str(good / "results")], "inside the input folder"),
        ("--out not empty", [str(good), "--out", str(full)], "--overwrite"),
        ("negative batch size", [str(good), "--batch-size", "-3", "--out", str(tmp / "o3")], "--batch-size"),
        ("zero size", [str(good), "--size", "0", "--out", str(tmp / "o4")], "--size"),
        ("negative size", [str(good), "--size", "-16", "--out", str(tmp / "o5")], "--size"),
        ("size not a multiple of the patch", [str(good), "--size", "20", "--out", str(tmp / "o6")], "divisible"),
        ("one image for a batch method", [str(one), "--out", str(tmp / "o7")], "needs at least 2"),
        ("overwrite and resume", [str(good), "--overwrite", "--resume", "--out", str(tmp / "o8")], "exclude"),
        ("unknown method", [str(good), "--method", "patchcore", "--out", str(tmp / "o9")], "--method"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    for what, argv, needle in _cases(tmp_path):
        # --size given twice for some cases: argparse keeps the last, which is the case's own value
        code = None
        try:
            code = main(["detect", *argv[:1], *TINY, *argv[1:]])
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        err = [line for line in err if not line.startswith("[") and not line.startswith("!!!")]
        assert code == 2, (what, code, err)
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], (what, err)
    for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9"):  # nothing computed, nothing created
        assert not (tmp_path / o).exists(), o


def test_class_name_inferred_with_dataset_layouts():
    assert infer_class_name("/data/mvtec_ad/bottle/test") == ("bottle", "the folder path (bottle/test)")
    assert infer_class_name("/data/mvtec_ad/metal_nut/test/scratch")[0] == "metal nut"
    assert infer_class_name("/data/visa/candle/Data/Images/Anomaly")[0] == "candle"
    assert infer_class_name("/data/widgets") == ("widgets", "the folder name")


# ------------------------------------------------------------------ output folders
def test_overwrite_clears_stale_outputs_and_resume_of_a_finished_run_changes_nothing(tmp_path):
    src = folder_of(tmp_path, n=4)
    out = tmp_path / "out"
    assert main(["detect", str(src), *TINY, "--method", "anoclip", "--out", str(out)]) == 0
    (out / "overlays" / "stale__old.png").write_bytes(b"stale")
    first = (out / "scores.csv").read_bytes()
    assert main(["detect", str(src), *TINY, "--method", "anoclip", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "overlays" / "stale__old.png").exists() and (out / "scores.csv").read_bytes() == first
    assert main(["detect", str(src), *TINY, "--method", "anoclip", "--out", str(out), "--resume"]) == 0
    assert (out / "scores.csv").read_bytes() == first
    # resuming with other options is refused, naming the problem
    assert main(["detect", str(src), *TINY, "--method", "musc", "--out", str(out), "--resume"]) == 2


# ------------------------------------------------------------------ write as you go, resume equals uninterrupted
class Stop(KeyboardInterrupt):
    """Stands for Ctrl-C at a chosen point of the run."""


def _interrupt_after(monkeypatch, groups=0, encodes=None):
    """Make the run stop after `groups` scored groups (or after `encodes` encode batches)."""
    real_iter, real_encode = runner.iter_detect, None

    def iter_then_stop(*a, **kw):
        for k, res in enumerate(real_iter(*a, **kw)):
            yield res
            if k + 1 >= groups:
                raise Stop()

    if encodes is None:
        monkeypatch.setattr(runner, "iter_detect", iter_then_stop)
        return
    detect_module = importlib.import_module("fiseclip_jax.detect")
    real_encode, calls = detect_module._encode_jit, []

    def encode_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) > encodes:
            raise Stop()
        return real_encode(*a, **kw)

    monkeypatch.setattr(detect_module, "_encode_jit", encode_then_stop)
    return calls


@pytest.mark.parametrize("method,batch", [("fiseclip", "2"), ("anoclip", "2")])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, method, batch):
    src = folder_of(tmp_path, n=7)
    full, part = tmp_path / "full", tmp_path / "part"
    argv = [str(src), *TINY, "--method", method, "--batch-size", batch]
    assert main(["detect", *argv, "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, groups=2)
        assert main(["detect", *argv, "--out", str(part)]) == 130
    done = rows(part)
    assert len(done) == 4 and not (part / "run.json").exists()  # two batches of 2 kept, run.json only at the end
    assert [r["score"] for r in done] == [r["score"] for r in rows(full)][:4]
    assert main(["detect", *argv, "--out", str(part), "--resume"]) == 0
    assert (part / "scores.csv").read_bytes() == (full / "scores.csv").read_bytes()
    for png in (full / "overlays").iterdir():
        assert (part / "overlays" / png.name).read_bytes() == png.read_bytes(), png.name
    assert not (part / ".partial").exists()


def test_whole_category_method_resumes_without_encoding_again(tmp_path, monkeypatch):
    """MuSc needs every image before it scores: its encoded batches are kept on disk as they finish."""
    src = folder_of(tmp_path, n=7)
    full, part = tmp_path / "full", tmp_path / "part"
    argv = [str(src), *TINY, "--method", "musc", "--batch-size", "2"]
    assert main(["detect", *argv, "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, encodes=3)
        assert main(["detect", *argv, "--out", str(part)]) == 130
    assert len(list((part / ".partial" / "features").glob("*.npz"))) == 3
    with monkeypatch.context() as m:
        calls = _interrupt_after(m, encodes=100)
        assert main(["detect", *argv, "--out", str(part), "--resume"]) == 0
    assert len(calls) == 1  # 4 encode batches of 2 for 7 images: only the last is encoded again
    assert (part / "scores.csv").read_bytes() == (full / "scores.csv").read_bytes()


# ------------------------------------------------------------------ bad files
def test_unreadable_image_gets_an_error_row_and_the_rest_is_scored(tmp_path, capsys):
    src = folder_of(tmp_path, n=5)
    (src / "good" / "zz_truncated.png").write_bytes((src / "good" / "000.png").read_bytes()[:60])
    out = tmp_path / "out"
    assert main(["detect", str(src), *TINY, "--method", "anoclip", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err and "Traceback" not in err
    table = {r["file"]: r for r in rows(out)}
    assert len(table) == 6 and table["good/zz_truncated.png"]["score"] == ""
    assert "zz_truncated.png" in table["good/zz_truncated.png"]["error"]
    assert all(r["score"] and not r["error"] for f, r in table.items() if "truncated" not in f)
    run = json.loads((out / "run.json").read_text())
    assert run["num_scored"] == 5 and list(run["errors"]) == ["good/zz_truncated.png"]
    assert main(["detect", str(src), *TINY, "--method", "anoclip", "--out", str(tmp_path / "o2"), "--strict"]) == 2
    assert "zz_truncated.png" in capsys.readouterr().err


# ------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_exits_quickly_with_one_line_and_consistent_files(tmp_path):
    src = folder_of(tmp_path, n=120, size=64)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", "import sys; from fiseclip_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "detect", str(src), "--weights", "random:tiny", "--size", "64", "--method", "anoclip", "--batch-size", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=0)
    # Signal as soon as the progress bar shows scored images (tqdm redraws with "\r", so read characters, not
    # lines): whatever the machine's speed, some batches are done and most are not.
    seen, deadline = "", time.time() + 180
    while time.time() < deadline:
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
        if re.search(r"\b([2-9]|[1-9][0-9])/120 ", seen):
            break
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[1]
    elapsed = time.time() - sent
    assert proc.returncode == 130, rest
    assert elapsed < 3.0, elapsed
    last = [line for line in rest.strip().splitlines() if line.strip()][-1]
    assert "interrupted after" in last and "--resume" in last and "Traceback" not in rest
    table = rows(out) if (out / "scores.csv").exists() else []
    assert all(r["score"] for r in table) and len(table) % 2 == 0  # whole batches only
    assert not (out / "run.json").exists()
    shutil.rmtree(out / "overlays", ignore_errors=True)


def test_probability_scores_stay_in_unit_interval():
    """FiSeCLIP's "sum" image score (a mean of two min-max normalised terms) never leaves [0, 1] by float
    noise. (MuSc's RsCIN weights are cosines, which may be negative, so its scores may: not clipped.)"""
    import jax.numpy as jnp

    import fiseclip_jax as fj

    rng = np.random.default_rng(0)
    b, g, w, d = 6, 4, 8, 6
    feats = {"tokens": rng.normal(size=(b, 2, g * g, w)).astype(np.float32),
             "local": rng.normal(size=(b, g * g, d)).astype(np.float32),
             "cls": rng.normal(size=(b, d)).astype(np.float32)}
    text = rng.normal(size=(2, d)).astype(np.float32)
    for method in (fj.FiSeCLIPConfig(r_list=(1,), tau=5.0, text_filter="share"),):
        scores = np.asarray(method.score(feats, text, jnp.ones(b, bool), size=8).image_scores)
        assert scores.min() >= 0.0 and scores.max() <= 1.0


def test_convert_of_a_corrupt_safetensors_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"garbage that is not a safetensors header")
    assert main(["convert", str(bad), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors" in err[0] and "Traceback" not in err[0]


# ------------------------------------------------------------------ evaluate: --out, unreadable images, Ctrl-C
def _mvtec(tmp_path, categories=("alpha", "beta")):
    from test_evaluate import make_mvtec
    return make_mvtec(tmp_path / "data", categories=categories)


def _evaluate_argv(root, out, *extra):
    return ["evaluate", "--dataset", "mvtec", "--root", str(root), *TINY, "--out", str(out), *extra]


def test_evaluate_refuses_a_non_empty_out_and_overwrite_clears_it(tmp_path, capsys, monkeypatch):
    root, out = _mvtec(tmp_path), tmp_path / "out"
    assert main(_evaluate_argv(root, out)) == 0
    base = out / "fiseclip" / "mvtec"
    (base / "stale_category").mkdir()  # left by an earlier run on another dataset version
    capsys.readouterr()
    # refused before any weights load
    monkeypatch.setattr("fiseclip_jax.cli.evaluate.load_weights", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(_evaluate_argv(root, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0] and "--resume" in err[0]
    assert main(_evaluate_argv(root, root / "alpha" / "results")) == 2  # inside the dataset
    assert "inside the input folder" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(_evaluate_argv(root, out, "--overwrite")) == 0
    assert not (base / "stale_category").exists() and (base / "alpha" / "metrics.json").exists()
    assert main(_evaluate_argv(root, out, "--resume")) == 0  # finished categories are kept, not recomputed


def test_evaluate_leaves_unreadable_images_out_of_the_metrics_and_counts_them(tmp_path, capsys, monkeypatch):
    root = _mvtec(tmp_path, categories=("alpha",))
    clean = tmp_path / "clean"  # the oracle: the same dataset without the broken images
    shutil.copytree(root, clean)
    broken = root / "alpha" / "test" / "good" / "zz_broken.png"
    broken.write_bytes((root / "alpha" / "test" / "good" / "000.png").read_bytes()[:60])  # header check fails
    # and one image whose header is fine but whose decoding fails during the run
    real_load, late = runner_detect.load_image, root / "alpha" / "test" / "crack" / "001.png"
    (clean / "alpha" / "test" / "crack" / "001.png").unlink()
    (clean / "alpha" / "ground_truth" / "crack" / "001_mask.png").unlink()

    def load(path, *a, **k):
        if Path(path) == late:
            raise runner_detect.FiseclipError(f"cannot read image {path}: decoding failed")
        return real_load(path, *a, **k)

    monkeypatch.setattr(runner_detect, "load_image", load)
    assert main(_evaluate_argv(root, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "2 image(s) could not be read" in err and "Traceback" not in err
    assert main(_evaluate_argv(clean, tmp_path / "oracle")) == 0
    got = json.loads((tmp_path / "out" / "fiseclip" / "mvtec" / "results.json").read_text())
    want = json.loads((tmp_path / "oracle" / "fiseclip" / "mvtec" / "results.json").read_text())
    assert got["categories"]["alpha"]["n_unreadable"] == 2 and got["categories"]["alpha"]["n_images"] == 3
    assert got["categories"]["alpha"]["metrics"] == want["categories"]["alpha"]["metrics"]
    metrics = json.loads((tmp_path / "out" / "fiseclip" / "mvtec" / "alpha" / "metrics.json").read_text())
    assert sorted(metrics["unreadable"]) == ["alpha/test/crack/001.png", "alpha/test/good/zz_broken.png"]
    assert main(_evaluate_argv(root, tmp_path / "strict", "--strict")) == 2
    assert "zz_broken.png" in capsys.readouterr().err


def test_evaluate_ctrl_c_is_one_line_and_run_json_agrees_with_the_tables(tmp_path):
    names = tuple(f"c{i:02d}" for i in range(12))
    root, out = _mvtec(tmp_path, categories=names), tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-c", "import sys; from fiseclip_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           *[a for a in _evaluate_argv(root, out) if a != "--no-progress"]]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=0)
    seen, deadline = "", time.time() + 180
    while time.time() < deadline:  # signal as the second category starts: the first is written
        ch = proc.stderr.read(1)
        if not ch:
            break
        seen += ch
        if "[2/12] mvtec/c01" in seen:
            break
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130, seen + rest
    assert time.time() - sent < 3.0
    last = [line for line in rest.strip().splitlines() if line.strip()][-1]
    assert "interrupted after" in last and "of 12 categories" in last and "--resume" in last
    assert "Traceback" not in rest
    base = out / "fiseclip" / "mvtec"
    run = json.loads((base / "run.json").read_text())
    results = json.loads((base / "results.json").read_text())
    assert run["status"] == "incomplete" and run["finished"] == list(results["categories"]) and run["finished"]
    assert all((base / name / "metrics.json").exists() for name in run["finished"])
    assert main(_evaluate_argv(root, out, "--resume")) == 0
    run = json.loads((base / "run.json").read_text())
    assert run["status"] == "complete" and run["finished"] == list(names)
