"""The online-inspection commands: `bank build`, `detect --bank`, `watch` (tiny random CLIP, real bottle images):
numbers equal the Python API, decisions follow the recorded threshold, a stream is scored file by file with
half-written and broken files, a restart scores nothing twice, Ctrl-C leaves a complete CSV."""

import csv
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import fiseclip_jax as fj
from fiseclip_jax.cli import main
from fiseclip_jax.data import load_image

bank_run = importlib.import_module("fiseclip_jax.bank_run")
TINY = ["--weights", "random:tiny", "--size", "32", "--no-progress"]


def rows(out):
    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folders(mvtec_root, tmp_path_factory):
    """good/: 5 training images; test/: two good test images and a broken one."""
    root = tmp_path_factory.mktemp("online")
    bottle = mvtec_root / "bottle"
    (root / "good").mkdir()
    for p in sorted((bottle / "train" / "good").glob("*.png"))[:5]:
        shutil.copy(p, root / "good" / p.name)
    for sub, src, names in (("good", "good", ("000.png", "001.png")), ("broken", "broken_large", ("000.png",))):
        (root / "test" / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(bottle / "test" / src / name, root / "test" / sub / name)
    return root


@pytest.fixture(scope="module")
def bank_dir(folders):
    out = folders / "bank"
    assert main(["bank", "build", str(folders / "good"), "--class-name", "bottle", "--method", "fiseclip", *TINY,
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def api(bank_dir):
    """Scores of single images against the bank by the Python API (padded to the batch shape the CLI uses)."""
    params, cfg, _ = fj.resolve_weights("random:tiny")
    bank = fj.load_bank(bank_dir, params=params, cfg=cfg)
    text = fj.text_features_full(params, cfg, "bottle", "winclip")

    def score(path, against=bank):
        px = fj.preprocess([load_image(path)] * 3, 32)
        return float(fj.detect_with_bank(params, cfg, against, px, text, None, [True, False, False]).image_scores[0])

    return params, cfg, bank, score


# ------------------------------------------------------------------ bank build, detect --bank
def test_detect_with_a_bank_writes_decisions_at_the_recorded_threshold(folders, bank_dir, api, tmp_path, capsys):
    params, cfg, bank, score = api
    info = json.loads((bank_dir / "bank.json").read_text())
    assert info["mode"] == "exact" and info["images"] == 5 and info["method"]["method"] == "fiseclip"
    assert info["notes"]["files"] == [f"{i:03d}.png" for i in range(5)] and info["weights"] == "random:tiny"
    out = tmp_path / "out"
    assert main(["detect", str(folders / "test"), "--bank", str(bank_dir), "--batch-size", "3", "--no-progress",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    threshold = fj.bank_threshold(bank, 0.01)
    assert run["decision"]["threshold"] == pytest.approx(threshold, abs=0) and run["decision"]["fpr"] == 0.01
    assert run["config"]["method"] == "fiseclip" and run["class_name"] == "bottle" and run["size"] == 32
    table = rows(out)
    assert [r["file"] for r in table] == ["broken/000.png", "good/000.png", "good/001.png"]
    for r in table:
        assert float(r["score"]) == pytest.approx(score(folders / "test" / r["file"]), abs=1e-6)
        assert r["decision"] == ("anomalous" if float(r["score"]) > threshold else "normal")
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["broken__000.png", "good__000.png", "good__001.png"]
    # --threshold overrides the bank's
    assert main(["detect", str(folders / "test"), "--bank", str(bank_dir), "--batch-size", "3", "--no-progress",
                 "--threshold", "1e9", "--out", str(tmp_path / "high")]) == 0
    assert {r["decision"] for r in rows(tmp_path / "high")} == {"normal"}
    assert json.loads((tmp_path / "high" / "run.json").read_text())["decision"]["source"] == "--threshold"
    capsys.readouterr()
    assert main(["bank", "info", str(bank_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 5


def test_bad_input_is_one_line_exit_2_before_any_weights_load(folders, bank_dir, tmp_path, capsys, monkeypatch):
    common = importlib.import_module("fiseclip_jax.cli.common")
    monkeypatch.setattr(common, "resolve_weights", lambda *a, **k: pytest.fail("weights loaded"))
    good, test = str(folders / "good"), str(folders / "test")
    cases = [
        (["bank", "build", good, "--method", "anoclip", *TINY, "--out", str(tmp_path / "b1")],
         "anoclip does not use a reference bank"),
        (["bank", "build", good, "--method", "musc", *TINY, "--out", str(bank_dir)], "already exists"),
        (["bank", "build", str(tmp_path / "nope"), *TINY, "--out", str(tmp_path / "b2")], "nope"),
        (["bank", "build", good, *TINY, "--out", str(folders / "good" / "bank")], "inside the input folder"),
        (["detect", test, "--bank", str(bank_dir), "--method", "musc", "--out", str(tmp_path / "o1")],
         "built with fiseclip"),
        (["detect", test, "--bank", str(bank_dir), "--size", "64", "--out", str(tmp_path / "o2")], "built at 32"),
        (["detect", test, "--bank", str(tmp_path), "--out", str(tmp_path / "o3")], "not a reference bank"),
        (["detect", test, "--out", str(tmp_path / "o4")], "--weights is required"),
        (["watch", test, "--method", "fiseclip", *TINY, "--out", str(tmp_path / "o5")], "build a reference bank"),
        (["watch", test, "--method", "anoclip", "--update", "gated", *TINY, "--out", str(tmp_path / "o6")],
         "needs a reference bank"),
        (["watch", str(tmp_path / "nope"), "--bank", str(bank_dir), "--out", str(tmp_path / "o7")], "not found"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[")]
        assert len(err) == 1 and needle in err[0], (argv, err)
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "o1", "o2", "o3", "o4", "o5", "o6", "o7"))


class Stop(KeyboardInterrupt):
    """Stands for Ctrl-C after a chosen number of encoded batches."""


def test_interrupted_bank_build_resumes_without_encoding_again(folders, tmp_path, monkeypatch):
    argv = ["bank", "build", str(folders / "good"), "--class-name", "bottle", "--method", "musc", *TINY,
            "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    real, calls = bank_run._encode_batch, []

    def encode_then_stop(*a, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise Stop()
        return real(*a, **kw)

    monkeypatch.setattr(bank_run, "_encode_batch", encode_then_stop)
    assert main([*argv, "--out", str(tmp_path / "part")]) == 130
    assert len(list((tmp_path / ".part.partial" / "features").glob("*.npz"))) == 2 and not (tmp_path / "part").exists()
    assert main([*argv, "--out", str(tmp_path / "part")]) == 2  # says --resume or --overwrite
    calls.clear()
    monkeypatch.setattr(bank_run, "_encode_batch", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    assert main([*argv, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert len(calls) == 1  # 3 batches of 2 for 5 images: only the last is encoded again
    full, part = fj.load_bank(tmp_path / "full"), fj.load_bank(tmp_path / "part")
    np.testing.assert_array_equal(full.features, part.features)
    np.testing.assert_array_equal(full.calib["score"], part.calib["score"])
    assert not (tmp_path / ".part.partial").exists()


# ------------------------------------------------------------------ watch
def _drop_files(inbox: Path, out: Path, sources: list[Path], done: threading.Event):
    """Wait until the watcher has scored its first file, then: a half-written PNG that is completed 1.5 s later,
    a broken image, and a file that never becomes an image."""
    first, half, broken = sources
    shutil.copy(first, inbox / "a.png")
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "scores.csv").exists() and rows(out)):
        time.sleep(0.1)
    data = half.read_bytes()
    (inbox / "b.png").write_bytes(data[: len(data) // 3])
    time.sleep(1.5)  # the watcher polls every 0.2 s meanwhile and sees an unreadable file
    with open(inbox / "b.png", "ab") as f:
        f.write(data[len(data) // 3:])
    shutil.copy(broken, inbox / "c.png")
    (inbox / "d.png").write_bytes(b"not an image at all")
    done.set()


def test_watch_scores_each_new_file_once_skips_broken_ones_and_resumes(folders, bank_dir, api, tmp_path, capsys):
    params, cfg, bank, score = api
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    sources = [folders / "test" / "good" / "000.png", folders / "test" / "good" / "001.png",
               folders / "test" / "broken" / "000.png"]
    done = threading.Event()
    writer = threading.Thread(target=_drop_files, args=(inbox, out, sources, done), daemon=True)
    writer.start()
    argv = ["watch", str(inbox), "--bank", str(bank_dir), "--update", "gated", "--poll", "0.2", "--settle", "2",
            "--out", str(out)]
    assert main([*argv, "--max-files", "4"]) == 0
    writer.join(5)
    assert done.is_set()
    err = capsys.readouterr().err
    assert "b.png: not readable yet" in err and "warning: skipped cannot read image" in err  # seen half-written
    table = {r["file"]: r for r in rows(out)}
    assert list(table) == ["a.png", "b.png", "c.png", "d.png"] and len(rows(out)) == 4  # each file once
    assert table["d.png"]["score"] == "" and "d.png" in table["d.png"]["error"]
    # scores are those of the complete files against the bank as it stood when each arrived
    current = bank
    for name, src in zip("abc", sources):
        assert float(table[f"{name}.png"]["score"]) == pytest.approx(score(src, current), abs=1e-6), name
        if table[f"{name}.png"]["admitted"] == "yes":  # replay the gated update
            px = fj.preprocess([load_image(src)], 32)
            text = fj.text_features_full(params, cfg, "bottle", "winclip")
            _, feats = fj.detect_with_bank(params, cfg, current, px, text, None, with_features=True)
            current = fj.update_bank(current, feats, jnp.array([True]))
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["a.png", "b.png", "c.png"]
    run = json.loads((out / "run.json").read_text())
    # random weights: which image is flagged means nothing; that each decision follows the recorded threshold
    # (the bank's quantile when the run started) and that a flagged image never joins the bank does
    threshold = fj.bank_threshold(bank, 0.01)
    assert run["decision"]["threshold"] == pytest.approx(threshold)
    for name in "abc":
        row = table[f"{name}.png"]
        assert row["decision"] == ("anomalous" if float(row["score"]) > threshold else "normal"), name
        assert not (row["decision"] == "anomalous" and row["admitted"] == "yes"), name
    assert run["state"] == "stopped" and run["this_run"]["scored"] == 3 and run["this_run"]["failed"] == 1
    admitted = sum(r["admitted"] == "yes" for r in table.values())
    assert (out / "bank" / "bank.json").exists() == (admitted > 0)
    if admitted:
        assert int(fj.load_bank(out / "bank").count) == 5 + admitted
    # a restart continues: nothing scored twice, only the new file is added
    before = (out / "scores.csv").read_bytes()
    shutil.copy(folders / "good" / "004.png", inbox / "e.png")
    assert main([*argv, "--max-files", "1"]) == 0
    after = (out / "scores.csv").read_bytes()
    assert after.startswith(before) and [r["file"] for r in rows(out)][4:] == ["e.png"]
    assert float(rows(out)[4]["score"]) == pytest.approx(score(folders / "good" / "004.png", current), abs=1e-6)
    # other options are refused rather than mixed into the same results
    assert main([*argv[:-2], "--update", "none", "--max-files", "1", "--out", str(out)]) == 2


def test_watch_without_a_bank_scores_with_anoclip(folders, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i, src in enumerate(sorted((folders / "test" / "good").glob("*.png"))):
        shutil.copy(src, inbox / f"{i}.png")
    assert main(["watch", str(inbox), "--method", "anoclip", *TINY, "--class-name", "bottle", "--threshold", "0.5",
                 "--poll", "0.2", "--until-idle", "1", "--out", str(out)]) == 0
    params, cfg, _ = fj.resolve_weights("random:tiny")
    text = fj.text_features_full(params, cfg, "bottle", "anoclip")
    for r in rows(out):
        det = fj.detect(params, cfg, fj.preprocess([load_image(inbox / r["file"])], 32), text, fj.AnoCLIPConfig())
        assert float(r["score"]) == pytest.approx(float(det.image_scores[0]), abs=1e-6)
        assert r["decision"] == ("anomalous" if float(r["score"]) > 0.5 else "normal") and r["admitted"] == ""
    assert len(rows(out)) == 2


@pytest.mark.slow
def test_watch_stops_on_ctrl_c_with_a_complete_csv(folders, bank_dir, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    shutil.copy(folders / "test" / "good" / "000.png", inbox / "a.png")
    cmd = [sys.executable, "-c", "import sys; from fiseclip_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "watch", str(inbox), "--bank", str(bank_dir), "--poll", "0.2", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((out / "scores.csv").exists() and rows(out)):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        time.sleep(0.5)
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert time.time() - sent < 3.0
    last = [line for line in rest.strip().splitlines() if line.strip()][-1]
    assert "stopped" in last and "run the same command again" in last and "Traceback" not in rest
    assert (out / "scores.csv").read_text().endswith("\n") and [r["file"] for r in rows(out)] == ["a.png"]
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "stopped" and "Ctrl-C" in run["stopped"]
