"""report.html, thresholds.json and detect's decisions from them: a small labelled folder, tiny random CLIP
at 32 px (every number meaningless: random weights), checked against scikit-learn and brute force."""

import base64
import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from fiseclip_jax import FiSeCLIPConfig, resolve_weights
from fiseclip_jax.cli import main
from fiseclip_jax.evaluate import evaluate, evaluate_category, list_categories
from fiseclip_jax.html_report import SECTIONS, image_curves, read_scores, write_table_report
from fiseclip_jax.curves import integrate

N_GOOD, N_BAD, SIZE = 5, 4, 32
ROOT = Path(__file__).resolve().parents[1]


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root, seed=0):
    """good/ and defect/ images (noise, defects a bright square) with masks in a separate folder."""
    rng = np.random.default_rng(seed)
    for i in range(N_GOOD):
        _png(root / "widget" / "good" / f"{i:03d}.png", rng.integers(60, 120, (SIZE, SIZE, 3), np.uint8))
    for i in range(N_BAD):
        img = rng.integers(60, 120, (SIZE, SIZE, 3), np.uint8)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4 + 3 * i: 12 + 3 * i, 6 + 2 * i: 14 + 2 * i] = 255
        img[mask > 0] = (250, 90, 140, 60)[i]  # some defects hard to see: scores overlap
        _png(root / "widget" / "defect" / f"{i:03d}.png", img)
        _png(root / "masks" / "defect" / f"{i:03d}.png", mask)
    return root / "widget", root / "masks"


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = resolve_weights("random:tiny", seed=0)
    return params, cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("report")
    folder, masks = make_folder(tmp / "data")
    params, cfg = tiny
    evaluate(params, cfg, "folder", folder, FiSeCLIPConfig(), masks=masks, size=SIZE, out=tmp / "out",
             weights="random:tiny", progress=False, fpr=0.2, gallery=2)
    return {"base": tmp / "out" / "fiseclip" / "folder", "folder": folder, "masks": masks, "tmp": tmp}


def _images(page):
    return re.findall(r'src="data:image/png;base64,([^"]+)"', page)


def test_report_has_every_section_and_only_embedded_images(run):
    page = (run["base"] / "report.html").read_text()
    assert "RANDOM WEIGHTS" in page and "MEANINGLESS" in page
    for anchor in ('id="mean"', 'id="cat-widget"'):
        section = page.split(anchor, 1)[1]
        for title in SECTIONS:
            assert f"<h3>{title}</h3>" in section, (anchor, title)
    assert not re.search(r"https?://", page) and "<script" not in page.lower() and "<link" not in page.lower()
    images = _images(page)
    # mean: image ROC, PR, pixel ROC, PR, PRO; category: the same + histogram; gallery: 2 good + 2 defective
    assert len(images) == 5 + 6 + 4
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 30
            assert np.asarray(im.convert("L")).std() > 5  # something drawn, not a blank square
    gallery = json.loads((run["base"] / "widget" / "report_data.json").read_text())["gallery"]
    assert [g["label"] for g in gallery] == [0, 0, 1, 1]
    scores = {r["file"]: float(r["score"]) for r in csv.DictReader(open(run["base"] / "widget" / "scores.csv"))}
    good = sorted((s for f, s in scores.items() if f.startswith("good")), reverse=True)
    bad = sorted(s for f, s in scores.items() if f.startswith("defect"))
    assert [g["score"] for g in gallery] == good[:2] + bad[:2]  # worst first
    with Image.open(run["base"] / "widget" / gallery[-1]["png"]) as im:
        assert im.size == (3 * SIZE, SIZE)  # image | mask | overlay
        mask_panel = np.asarray(im.convert("L"))[:, SIZE:2 * SIZE]
    assert set(np.unique(mask_panel)) <= {0, 255} and mask_panel.max() == 255


def test_plotted_roc_area_is_image_auroc(run):
    """One code path: the curve the report plots integrates to the metric in metrics.json (and sklearn's)."""
    metrics = json.loads((run["base"] / "widget" / "metrics.json").read_text())["metrics"]
    scores, labels = read_scores(run["base"] / "widget" / "scores.csv")
    curves = image_curves(labels, scores)
    fpr, tpr = curves["roc"]
    assert integrate(fpr, tpr) == pytest.approx(metrics["image_AUROC"], abs=1e-12)
    assert integrate(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    recall, precision = curves["pr"]
    assert np.sum(np.diff(np.r_[0.0, recall]) * precision) == pytest.approx(average_precision_score(labels, scores))
    page = (run["base"] / "report.html").read_text()
    assert f"area under the plotted curve: AUROC {100 * metrics['image_AUROC']:.1f}" in page
    assert 0.0 < metrics["image_AUROC"] < 1.0  # a curve with both kinds of steps


def _brute_threshold(labels, scores):
    """F1-optimal "score > t" over every candidate t; returns (f1, flagged set)."""
    best = (-1.0, None)
    for t in np.r_[np.unique(scores)[::-1], scores.min() - 1]:
        flag = scores > t
        tp = np.sum(flag & (labels == 1))
        f1 = 2 * tp / (labels.sum() + flag.sum())
        if f1 > best[0] + 1e-15:
            best = (f1, flag)
    return best


def test_thresholds_json_against_brute_force(run, tiny):
    th = json.loads((run["base"] / "widget" / "thresholds.json").read_text())
    assert (th["method"], th["size"], th["fpr"]) == ("fiseclip", SIZE, 0.2)
    scores, labels = read_scores(run["base"] / "widget" / "scores.csv")
    f1, flag = _brute_threshold(labels, scores)
    assert th["image"]["f1"]["f1"] == pytest.approx(f1)
    assert np.array_equal(scores > th["image"]["f1"]["threshold"], flag)
    good = scores[labels == 0]  # at most floor(0.2 * 5) = 1 good image above, and the lowest such threshold
    t = th["image"]["at_fpr"]["threshold"]
    assert np.sum(good > t) <= 1 and not any(np.sum(good > c) <= 1 for c in good[good < t])
    # pixels: the maps evaluate computed (same call), brute force over every distinct value
    params, cfg = tiny
    cat = list_categories("folder", run["folder"], masks=run["masks"])[0]
    _, _, maps, masks = evaluate_category(params, cfg, cat, FiSeCLIPConfig(), size=SIZE, progress=False)
    y, s = masks.ravel().astype(int), maps.ravel().astype(np.float64)
    f1, flag = _brute_threshold(y, s)
    assert th["pixel"]["f1"]["f1"] == pytest.approx(f1)
    assert np.array_equal(s > th["pixel"]["f1"]["threshold"], flag)
    normal = s[y == 0]
    t = th["pixel"]["at_fpr"]["threshold"]
    k = int(np.floor(0.2 * normal.size))
    assert np.sum(normal > t) <= k and np.sum(normal >= t) > k
    run["maps"] = maps


def test_detect_with_thresholds_decides_and_writes_masks(run, capsys):
    th_path = run["base"] / "widget" / "thresholds.json"
    th = json.loads(th_path.read_text())
    out = run["tmp"] / "detect"
    rc = main(["detect", str(run["folder"]), "--weights", "random:tiny", "--size", str(SIZE), "--out", str(out),
               "--thresholds", str(th_path), "--threshold-rule", "fpr", "--no-progress"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    t_img, t_px = th["image"]["at_fpr"]["threshold"], th["pixel"]["at_fpr"]["threshold"]
    assert [r["decision"] for r in rows] == ["anomalous" if float(r["score"]) > t_img else "normal" for r in rows]
    record = json.loads((out / "run.json").read_text())
    assert record["decision"]["threshold"] == t_img and record["pixel_threshold"]["threshold"] == t_px
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == \
        sorted(p.name for p in (out / "overlays").glob("*.png"))
    maps = run.get("maps")
    for i, r in enumerate(rows):
        with Image.open(out / "masks" / (r["file"].replace("/", "__"))) as im:
            mask = np.asarray(im)
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        if maps is not None:  # the same maps as evaluate's: the mask is map > threshold
            assert np.array_equal(mask == 255, maps[i] > t_px), r["file"]


def test_detect_refuses_thresholds_of_another_size_or_a_bad_file(run, capsys):
    th_path = run["base"] / "widget" / "thresholds.json"
    rc = main(["detect", str(run["folder"]), "--weights", "random:tiny", "--size", "64", "--out",
               str(run["tmp"] / "d64"), "--thresholds", str(th_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--size 32" in err and "uses 64" in err
    rc = main(["detect", str(run["folder"]), "--weights", "random:tiny", "--out", str(run["tmp"] / "dx"),
               "--thresholds", str(run["base"] / "results.json"), "--no-progress"])
    assert rc == 2 and "not a thresholds.json" in capsys.readouterr().err


def test_report_command_rebuilds_the_page(run, capsys):
    page = run["base"] / "report.html"
    before = page.read_text()
    page.unlink()
    assert main(["report", str(run["tmp"] / "out")]) == 0  # finds OUT/<method>/<dataset> under --out
    assert f"wrote {page}" in capsys.readouterr().out
    assert page.read_text() == before
    assert main(["report", str(run["tmp"] / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_table_report_for_other_callers(tmp_path):
    path = write_table_report(tmp_path / "sweep.html", "sweep", ["k", "image_AUROC"], [[1, "90.0"], [2, "91.5"]],
                              note="random weights: meaningless")
    page = path.read_text()
    assert "<td>91.5</td>" in page and "<th>image_AUROC</th>" in page and "http" not in page


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot", ROOT / "benchmarks" / "screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_headless_chromium_screenshot_is_not_blank(run, tmp_path):
    """The page as a person sees it: Chromium renders it (installed with apt-get when missing and possible)."""
    shot = _screenshot_module()
    browser = shot.ensure_chromium(install=True)
    if browser is None:
        pytest.skip("no chromium, and it could not be installed here")
    png = shot.screenshot(browser, run["base"] / "report.html", tmp_path / "page.png", 1280, 1600)
    stats = shot.blank_stats(png)
    assert stats["size"] == "1280x1600" and not stats["blank"], stats
    assert stats["inked"] > 0.05 and stats["colours"] > 50, stats
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert shot.blank_stats(shot.screenshot(browser, empty, tmp_path / "empty.png", 640, 480))["blank"]
