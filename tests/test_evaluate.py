"""`evaluate` and `fiseclip-jax evaluate`: outputs, numbers against scikit-learn, kill and
resume, refusal to mix configurations, folder datasets, readable errors. Random tiny weights."""

import csv
import json


import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import fiseclip_jax.evaluate as ev
from fiseclip_jax import FiSeCLIPConfig, resolve_weights
from fiseclip_jax.cli import main
from fiseclip_jax.data import load_mask
from fiseclip_jax.evaluate import ResumeError, evaluate, pick_overlays

NAMES = ["image_AUROC", "image_AP", "image_F1Max", "pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO"]


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = resolve_weights("random:tiny", seed=0)
    return params, cfg


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return f1[np.isfinite(f1)].max()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec(root, categories=("alpha", "beta", "gamma"), n_good=2, n_bad=2, size=32, seed=0):
    """A tiny MVTec-layout dataset: test/good, test/crack with masks in ground_truth/crack."""
    rng = np.random.default_rng(seed)
    for cat in categories:
        for i in range(n_good):
            _png(root / cat / "test" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), np.uint8))
        for i in range(n_bad):
            _png(root / cat / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), np.uint8))
            mask = np.zeros((size, size), np.uint8)
            mask[4 + i: 12 + 2 * i, 8:20] = 255
            _png(root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


def run(tiny, root, out, **kw):
    params, cfg = tiny
    kw = {"size": 32, "weights": "random:tiny", "progress": False, "config": FiSeCLIPConfig(), **kw}
    config = kw.pop("config")
    return evaluate(params, cfg, kw.pop("dataset", "mvtec"), root, config, out=out, **kw)


# ------------------------------------------------------------------ real MVTec bottle
@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_bottle_end_to_end_against_sklearn(mvtec_root, tmp_path, tiny):
    results = run(tiny, mvtec_root, tmp_path, categories=["bottle"])
    base = tmp_path / "fiseclip" / "mvtec"
    for name in ("results.md", "results.csv", "results.json", "run.json", "bottle/metrics.json",
                 "bottle/scores.csv"):
        assert (base / name).is_file(), name
    assert json.loads((base / "results.json").read_text()) == results
    assert results["metric_names"] == NAMES

    # image metrics: recomputed from scores.csv with scikit-learn
    rows = read_csv(base / "bottle" / "scores.csv")
    assert len(rows) == 83 and rows[0]["file"] == "bottle/test/broken_large/000.png"
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    got = results["categories"]["bottle"]["metrics"]
    assert got["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["image_AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["image_F1Max"] == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)

    # pixel AUROC / AP: the same maps again, masks at 32x32, scikit-learn on every pixel
    from fiseclip_jax.detect import detect_category

    cat = ev.list_categories("mvtec", mvtec_root, ["bottle"])[0]
    maps = detect_category(*tiny, [s.path for s in cat.samples], "bottle", FiSeCLIPConfig(), size=32,
                           progress=False).anomaly_maps
    masks = np.stack([np.zeros((32, 32), bool) if s.mask_path is None else load_mask(s.mask_path, 32)
                      for s in cat.samples])
    assert got["pixel_AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert got["pixel_AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)

    # tables: anomalib names, percent with 1 decimal, a mean row
    table = read_csv(base / "results.csv")
    assert list(table[0]) == ["category", "N"] + NAMES
    assert [r["category"] for r in table] == ["bottle", "mean"]
    for m in NAMES:
        assert table[0][m] == f"{100 * got[m]:.1f}" == table[1][m]
    md = (base / "results.md").read_text()
    assert "| category | N | " + " | ".join(NAMES) + " |" in md
    assert "MEANINGLESS" in md and "32x32" in md
    record = json.loads((base / "bottle" / "metrics.json").read_text())
    assert record["percent"]["image_AUROC"] == round(100 * got["image_AUROC"], 1)
    runrec = json.loads((base / "run.json").read_text())
    rc = runrec["run_config"]
    assert runrec["status"] == "complete" and runrec["categories"] == ["bottle"]
    assert (rc["method"], rc["weights"], rc["size"], rc["mask_rule"], rc["aupro"], rc["seed"]) == \
        ("fiseclip", "random:tiny", 32, "resize>0.5", "exact", 0)
    assert rc["clip"]["name"] == "tiny" and rc["method_config"]["batch_size"] == 16 and "jax" in runrec["versions"]
    overlays = sorted(p.name.split("__")[0] for p in (base / "bottle" / "overlays").glob("*.png"))
    assert overlays == ["defect_high1", "defect_low1", "normal_high1", "normal_low1"]
    with Image.open(next((base / "bottle" / "overlays").glob("*.png"))) as im:
        assert im.size == (96, 32)  # image | heat map | mask


# ------------------------------------------------------------------ kill and resume
def test_killed_run_resumes_to_the_same_tables(tmp_path, tiny, monkeypatch):
    root = make_mvtec(tmp_path / "data")
    run(tiny, root, tmp_path / "whole")

    real, calls = ev.detect_category, []

    def flaky(*args, **kwargs):
        calls.append(args[3])  # class name
        if args[3] == "beta" and len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second category runs
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "detect_category", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, root, tmp_path / "killed")
    base, whole = tmp_path / "killed" / "fiseclip" / "mvtec", tmp_path / "whole" / "fiseclip" / "mvtec"
    assert (base / "alpha" / "metrics.json").is_file() and not (base / "beta").exists()
    assert [r["category"] for r in read_csv(base / "results.csv")] == ["alpha", "mean"]  # table of what finished
    runrec = json.loads((base / "run.json").read_text())  # agrees with the tables: what finished, and how to finish
    assert runrec["status"] == "incomplete" and runrec["finished"] == ["alpha"] and "--resume" in runrec["resume"]
    assert list(json.loads((base / "results.json").read_text())["categories"]) == runrec["finished"]

    calls.clear()
    run(tiny, root, tmp_path / "killed", resume=True)
    assert calls == ["beta", "gamma"]  # alpha was not recomputed
    for name in ("results.csv", "results.json", "results.md", "alpha/scores.csv", "gamma/scores.csv"):
        assert (base / name).read_bytes() == (whole / name).read_bytes(), name
    assert not list(base.glob(".*"))  # no temporary folders left
    calls.clear()
    run(tiny, root, tmp_path / "killed", resume=True)
    assert calls == []


def test_resume_with_another_config_refuses(tmp_path, tiny, monkeypatch):
    root = make_mvtec(tmp_path / "data", categories=("alpha",))
    run(tiny, root, tmp_path / "out")
    monkeypatch.setattr(ev, "detect_category", lambda *a, **k: pytest.fail("must not compute"))
    with pytest.raises(ResumeError, match=r"different configuration.*aupro: 'exact' -> 'legacy'"):
        run(tiny, root, tmp_path / "out", resume=True, aupro="legacy")
    with pytest.raises(ResumeError, match="theta"):
        run(tiny, root, tmp_path / "out", resume=True, config=FiSeCLIPConfig(theta=0.4))


def test_resume_refusal_reaches_the_cli(tmp_path, tiny, capsys):
    root = make_mvtec(tmp_path / "data", categories=("alpha",))
    run(tiny, root, tmp_path / "out")
    args = ["evaluate", "--dataset", "mvtec", "--root", str(root), "--weights", "random:tiny", "--size", "32",
            "--out", str(tmp_path / "out"), "--no-progress", "--resume", "--mask-rule", "strict"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "mask_rule" in err and "Traceback" not in err


# ------------------------------------------------------------------ folders and errors
def test_folder_without_labels_writes_scores_only(tmp_path, tiny, capsys):
    rng = np.random.default_rng(1)
    for i in range(3):
        _png(tmp_path / "imgs" / f"p{i}.png", rng.integers(0, 256, (40, 48, 3), np.uint8))
    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "folder", "--root", str(tmp_path / "imgs"), "--category", "widget",
                 "--method", "anoclip", "--weights", "random:tiny", "--size", "32", "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "scores only" in captured.out and "RANDOM WEIGHTS" in captured.err
    base = out / "anoclip" / "folder"
    rows = read_csv(base / "widget" / "scores.csv")
    assert [r["file"] for r in rows] == ["p0.png", "p1.png", "p2.png"] and {r["label"] for r in rows} == {""}
    assert all(np.isfinite(float(r["score"])) for r in rows)
    assert json.loads((base / "widget" / "metrics.json").read_text())["metrics"] == {}
    assert list(read_csv(base / "results.csv")[0]) == ["category", "N"]
    assert len(list((base / "widget" / "overlays").glob("image_*.png"))) == 3


def test_folder_with_labels_but_no_masks_gives_image_metrics(tmp_path, tiny):
    root = make_mvtec(tmp_path / "data", categories=("alpha",))
    results = run(tiny, root / "alpha" / "test", tmp_path / "out", dataset="folder")
    assert results["metric_names"] == NAMES[:3]
    rows = read_csv(tmp_path / "out" / "fiseclip" / "folder" / "test" / "scores.csv")
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert results["categories"]["test"]["metrics"]["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores))


def test_bad_inputs_fail_naming_the_file(tmp_path, capsys):
    root = make_mvtec(tmp_path / "data", categories=("alpha",))
    bad_mask = root / "alpha" / "ground_truth" / "crack" / "001_mask.png"
    _png(bad_mask, np.zeros((16, 16), np.uint8))
    args = ["evaluate", "--dataset", "mvtec", "--root", str(root), "--weights", "random:tiny", "--size", "32",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(bad_mask) in err and "16x16" in err and "Traceback" not in err

    bad_mask.unlink()  # a defect image without its mask
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(root / "alpha" / "test" / "crack" / "001.png") in err and "no mask" in err
    assert not (tmp_path / "out" / "fiseclip" / "mvtec" / "alpha").exists()

    assert main(args[:4] + [str(tmp_path / "nowhere")] + args[5:]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(args + ["--masks", str(tmp_path)]) == 2
    assert "only for --dataset folder" in capsys.readouterr().err


def test_pick_overlays_takes_the_extremes_of_each_group():
    labels = [0, 0, 0, 1, 1, None]
    scores = [0.1, 0.5, 0.3, 0.9, 0.2, 0.4]
    assert pick_overlays(labels, scores, 4) == [(3, "defect_high1"), (1, "normal_high1"), (5, "image_high1"),
                                                (4, "defect_low1")]
    assert len(pick_overlays(labels, scores, 99)) == 6
    assert pick_overlays([1], [0.0], 4) == [(0, "defect_high1")]
