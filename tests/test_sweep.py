"""The feature cache (`--cache`) and `sweep`: a hit skips the forward pass, a corrupt or foreign entry is
recomputed, a sweep equals separate `evaluate` runs metric by metric, resumes without redoing rows, and a
row's run.json reruns to the same scores. Random tiny weights, a folder dataset of 32×32 images."""

import csv
import importlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import fiseclip_jax.sweep as S
from fiseclip_jax import methods, resolve_weights
from fiseclip_jax.cache import MemoryLRU
from fiseclip_jax.cli import main
from fiseclip_jax.detect import detect_category
from fiseclip_jax.evaluate import evaluate
from fiseclip_jax.features import FeatureCache
from fiseclip_jax.sweep import grid_points, parse_grid, sweep

E = importlib.import_module("fiseclip_jax.evaluate")
D = importlib.import_module("fiseclip_jax.detect")  # the module (the package exports a function of that name)
SIZE = 32


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = resolve_weights("random:tiny", seed=0)
    return params, cfg


def make_folder(root, n_good=3, n_bad=3, seed=0):
    """good/ and crack/ images, crack masks in masks/crack/<stem>_mask.png."""
    rng = np.random.default_rng(seed)
    for sub, n in (("good", n_good), ("crack", n_bad)):
        (root / "widget" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(root / "widget" / sub / f"{i}.png")
    (root / "masks" / "crack").mkdir(parents=True, exist_ok=True)
    for i in range(n_bad):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[4 + i: 14 + 2 * i, 6:20] = 255
        Image.fromarray(mask).save(root / "masks" / "crack" / f"{i}_mask.png")
    return root / "widget", root / "masks"


@pytest.fixture
def counted(monkeypatch):
    """Counts the images `detect` encodes (through the feature cache or the batch path)."""
    calls = {"images": 0, "calls": 0}
    encode_jit, detect_jit = D._encode_jit, D._detect

    def encode(params, cfg, pixels, method):
        calls["calls"] += 1
        calls["images"] += pixels.shape[0]
        return encode_jit(params, cfg, pixels, method)

    def fused(params, cfg, pixels, *a, **kw):
        calls["calls"] += 1
        calls["images"] += pixels.shape[0]
        return detect_jit(params, cfg, pixels, *a, **kw)

    monkeypatch.setattr(D, "_encode_jit", encode)
    monkeypatch.setattr(D, "_detect", fused)
    return calls


# ------------------------------------------------------------------ feature cache
@pytest.mark.parametrize("name", ["fiseclip", "musc"])
def test_cache_hit_skips_encode_and_corrupt_entry_is_recomputed(tmp_path, tiny, counted, name):
    params, cfg = tiny
    folder, _ = make_folder(tmp_path / "data")
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    method = methods.get(name, **({"batch_size": 4} if name == "fiseclip" else {}))
    ref = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=4, progress=False)
    counted["calls"] = 0
    fc = FeatureCache(tmp_path / "cache")
    cold = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=4, progress=False,
                           feature_cache=fc)
    assert counted["calls"] == 2 and (fc.misses, fc.hits, fc.writes) == (6, 0, 6)
    entries = sorted((tmp_path / "cache" / "features").glob("*.npz"))
    assert len(entries) == 6
    warm = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=4, progress=False,
                           feature_cache=fc)
    assert counted["calls"] == 2 and fc.hits == 6  # a hit: no forward pass
    for out in (cold, warm):  # features from the cache score as the fused forward pass does
        np.testing.assert_allclose(out.image_scores, ref.image_scores, atol=1e-6)
        np.testing.assert_allclose(out.anomaly_maps, ref.anomaly_maps, atol=1e-5)
    np.testing.assert_array_equal(warm.anomaly_maps, cold.anomaly_maps)

    entries[0].write_bytes(b"not an npz")  # corrupt
    shutil.copy(entries[2], entries[1])  # foreign: another image's entry under this key
    fc = FeatureCache(tmp_path / "cache")  # a new run: nothing in memory, every entry read from disk
    again = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=4, progress=False,
                            feature_cache=fc)
    assert (fc.misses, fc.hits, fc.writes) == (2, 4, 2)
    assert counted["images"] > 0 and counted["calls"] in (3, 4)  # one or two batches held the two bad entries
    np.testing.assert_array_equal(again.anomaly_maps, cold.anomaly_maps)
    np.testing.assert_array_equal(again.image_scores, cold.image_scores)


def test_matching_stage_is_kept_on_disk_for_the_next_run(tmp_path, tiny, monkeypatch):
    """A warm rerun (a new FeatureCache on the same folder) reads FiSeCLIP's matching back instead of
    matching again; a corrupt stage file is matched again, to the same numbers."""
    params, cfg = tiny
    folder, _ = make_folder(tmp_path / "data", n_good=3, n_bad=2)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    stages = []
    stage_jit = D._stage_jit
    monkeypatch.setattr(D, "_stage_jit", lambda *a, **k: stages.append(1) or stage_jit(*a, **k))
    run = lambda m, fc=None: detect_category(params, cfg, paths, "widget", m, size=SIZE, encode_batch=3,  # noqa
                                             progress=False, feature_cache=fc)
    run(methods.get("fiseclip", batch_size=3, theta=1.1), FeatureCache(tmp_path / "cache"))
    files = sorted((tmp_path / "cache" / "stages").glob("*.npz"))
    assert len(stages) == 2 and len(files) == 2  # two groups (3 + 2 images), one stage file each
    later = methods.get("fiseclip", batch_size=3, theta=1.1, fusion_weight=0.9, image_score="max")
    plain = run(later)  # no cache: the fused forward pass
    fc = FeatureCache(tmp_path / "cache")
    warm = run(later, fc)
    assert len(stages) == 2 and fc.stage_hits == 2  # nothing matched: both stages read from disk
    np.testing.assert_allclose(warm.image_scores, plain.image_scores, atol=1e-6)
    np.testing.assert_allclose(warm.anomaly_maps, plain.anomaly_maps, atol=1e-5)
    assert (warm.num_refs > 0).all()

    files[0].write_bytes(b"not an npz")
    fc = FeatureCache(tmp_path / "cache")
    again = run(later, fc)
    assert len(stages) == 3 and fc.stage_hits == 1  # the corrupt one matched again
    np.testing.assert_array_equal(again.anomaly_maps, warm.anomaly_maps)
    np.testing.assert_array_equal(again.image_scores, warm.image_scores)


def test_feature_cache_memory_is_bounded(tmp_path):
    """Entries are also kept in memory, at most `memory_bytes`, least recently used dropped first."""
    fc = FeatureCache(tmp_path, memory_bytes=300)  # two entries of 128 bytes
    ctx = {"weights": "w"}
    for i in range(3):
        fc.put(ctx, f"img{i}", {"tokens": np.full((4, 8), i, np.float32)}, (3, 8, 8))
    assert fc.get(ctx, "img1") is not None  # img1 used: img2 is now the older of the two kept
    for f in (tmp_path / "features").glob("*.npz"):
        f.unlink()
    assert fc.get(ctx, "img0") is None  # dropped from memory, gone from disk
    feats, shape = fc.get(ctx, "img2")
    assert shape == (3, 8, 8) and (feats["tokens"] == 2).all()
    assert fc.get(ctx, "img1") is not None and (fc.hits, fc.misses) == (3, 1)


def test_mask_memo_loads_masks_once_and_is_bounded(tmp_path, monkeypatch):
    root, masks = make_folder(tmp_path / "data")
    cat = E.list_categories("folder", root, None, masks)[0]
    loads = []
    real = E.load_mask
    monkeypatch.setattr(E, "load_mask", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    sizes = [(SIZE, SIZE)] * len(cat)
    expected = E.load_masks(cat, sizes)
    assert len(loads) == 3 and expected.sum() > 0
    memo = MemoryLRU(256 << 20)
    for _ in range(3):
        np.testing.assert_array_equal(E._masks(cat, sizes, "resize>0.5", memo), expected)
    assert len(loads) == 3 + 3  # loaded once for the three calls
    np.testing.assert_array_equal(E._masks(cat, [(16, 16)] * len(cat), "resize>0.5", memo),
                                  E.load_masks(cat, [(16, 16)] * len(cat)))  # other sizes: loaded again
    small = MemoryLRU(expected.nbytes - 1)  # too big to keep: loaded every time
    for _ in range(2):
        E._masks(cat, sizes, "resize>0.5", small)
    assert len(loads) == 6 + 6 + 6


@pytest.mark.slow  # one compilation per configuration: ~30 s on 2 shared cores
def test_cache_key_follows_encoding_fields_only(tmp_path, tiny, counted):
    params, cfg = tiny
    folder, _ = make_folder(tmp_path / "data", n_good=2, n_bad=1)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    fc = FeatureCache(tmp_path / "cache")
    run = lambda m, size=SIZE: detect_category(params, cfg, paths, "widget", m, size=size, progress=False,  # noqa
                                               feature_cache=fc)
    run(methods.get("fiseclip"))
    run(methods.get("fiseclip", theta=0.2, fusion_weight=0.9, sigma=1.0))  # scoring fields: hits
    assert (fc.misses, fc.hits) == (3, 3)
    run(methods.get("fiseclip", local="vv"))  # an encoding field: misses
    assert (fc.misses, fc.hits) == (6, 3)
    run(methods.get("fiseclip"), size=48)  # another size: misses
    assert (fc.misses, fc.hits) == (9, 3)
    other, _, _ = resolve_weights("random:tiny", seed=1)
    detect_category(other, cfg, paths, "widget", methods.get("fiseclip"), size=SIZE, progress=False,
                    feature_cache=fc)  # other weights: misses
    assert (fc.misses, fc.hits) == (12, 3)


@pytest.mark.slow  # ten detect runs, each compiling
def test_first_scoring_stage_is_reused_across_later_fields(tmp_path, tiny, monkeypatch):
    """FiSeCLIP and MuSc split their scoring (`stage_fields`): configurations that differ only in later
    fields reuse the matching, and score exactly as a plain run does."""
    params, cfg = tiny
    folder, _ = make_folder(tmp_path / "data", n_good=3, n_bad=2)
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    stages = []
    stage_jit = D._stage_jit
    monkeypatch.setattr(D, "_stage_jit", lambda *a, **k: stages.append(a[3]) or stage_jit(*a, **k))
    fc = FeatureCache(tmp_path / "cache")
    configs = [methods.get("fiseclip", batch_size=3, theta=1.1, **kw)
               for kw in ({}, {"fusion_weight": 0.9, "sigma": 1.0}, {"image_score": "max", "fusion_norm": "fixed"})]
    configs += [methods.get("musc", **kw) for kw in ({}, {"k_list": (1, 2), "sigma": 2.0})]
    for method in configs:
        plain = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=3, progress=False)
        cached = detect_category(params, cfg, paths, "widget", method, size=SIZE, encode_batch=3, progress=False,
                                 feature_cache=fc)
        np.testing.assert_allclose(cached.image_scores, plain.image_scores, atol=1e-6)
        np.testing.assert_allclose(cached.anomaly_maps, plain.anomaly_maps, atol=1e-5)
    # FiSeCLIP: 2 groups (3 + 2 images) matched once for its three configurations; MuSc: the category once
    assert [m.name for m in stages] == ["fiseclip", "fiseclip", "musc"]
    assert fc.stage_hits == 2 * 2 + 1
    detect_category(params, cfg, paths, "widget", methods.get("fiseclip", batch_size=3, theta=0.2), size=SIZE,
                    encode_batch=3, progress=False, feature_cache=fc)  # a stage field: matched again
    assert len(stages) == 5


# ------------------------------------------------------------------ sweep
GRID = ["local=qq,vv", "theta=0.7,1.1"]  # theta 1.1: every patch may serve as a reference


def _evaluate(tiny, root, masks, method, out):
    params, cfg = tiny
    return evaluate(params, cfg, "folder", root, method, out=out, masks=masks, size=SIZE, progress=False,
                    weights="random:tiny", overlays_per_category=0)


@pytest.mark.slow  # one compilation per configuration: ~30 s on 2 shared cores
def test_sweep_equals_separate_evaluate_runs(tmp_path, tiny, counted):
    params, cfg = tiny
    root, masks = make_folder(tmp_path / "data")
    base = methods.get("fiseclip", batch_size=0, sigma=1.0)
    grid = parse_grid(GRID)
    fc = FeatureCache(tmp_path / "cache")
    rows = sweep(params, cfg, "folder", root, base, grid, out=tmp_path / "sw", masks=masks, size=SIZE,
                 cache=fc, progress=False, weights="random:tiny")
    assert len(rows) == 4
    # each image encoded once per distinct encoding (local=qq, local=vv), every other point from the cache
    assert counted["images"] == 2 * 6  # two encodings of the 6 images (one batch: no padding)
    assert (fc.writes, fc.hits) == (2 * 6, 2 * 6)
    table = list(csv.DictReader(open(tmp_path / "sw" / "ablation.csv")))
    assert [r["row"] for r in table] == [r["row"] for r in rows]
    pixel = [r["mean"]["metrics"]["pixel_AUROC"] for r in rows]
    assert pixel == sorted(pixel, reverse=True)  # sorted by pixel_AUROC, best first
    for row, line in zip(rows, table):
        values = row["values"]
        method = methods.get("fiseclip", batch_size=0, sigma=1.0, local=values["local"],
                             theta=float(values["theta"]))
        assert row["run_config"]["method_config"] == json.loads(json.dumps(method.record()))
        alone = _evaluate(tiny, root, masks, method, tmp_path / "ev" / row["row"])["mean"]["metrics"]
        assert set(alone) == set(row["mean"]["metrics"]) and len(alone) == 7
        for name, value in alone.items():
            assert row["mean"]["metrics"][name] == pytest.approx(value, abs=1e-6), name
            assert float(line[name]) == pytest.approx(100 * value, abs=6e-4)
        assert [line[k] for k in ("local", "theta")] == [values["local"], values["theta"]]
    md = (tmp_path / "sw" / "ablation.md").read_text()
    assert "Random weights" in md and md.count("\n| ") == 1 + 4


@pytest.mark.slow  # one compilation per configuration: ~30 s on 2 shared cores
def test_sweep_resumes_without_redoing_rows(tmp_path, tiny, monkeypatch):
    params, cfg = tiny
    root, masks = make_folder(tmp_path / "data", n_good=2, n_bad=2)
    base = methods.get("fiseclip", batch_size=0)
    grid = parse_grid(["theta=0.3,0.5,0.7", "image_score=sum,max"])
    kw = dict(out=tmp_path / "sw", masks=masks, size=SIZE, progress=False, weights="random:tiny")
    done = []
    real = S.evaluate_category

    def killed_after_four(*a, **k):
        if len(done) == 4:
            raise KeyboardInterrupt
        done.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(S, "evaluate_category", killed_after_four)
    with pytest.raises(KeyboardInterrupt):
        sweep(params, cfg, "folder", root, base, grid, **kw)
    assert len(list((tmp_path / "sw" / "rows").glob("*/run.json"))) == 4
    assert len(list(csv.DictReader(open(tmp_path / "sw" / "ablation.csv")))) == 4  # what finished is tabled

    calls = []
    monkeypatch.setattr(S, "evaluate_category", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    rows = sweep(params, cfg, "folder", root, base, grid, **kw)
    assert len(calls) == 2 and len(rows) == 6  # only the two unfinished rows
    assert {m.record()["theta"] for m in calls} | {m.record()["theta"] for m in done} == {0.3, 0.5, 0.7}
    first = (tmp_path / "sw" / "ablation.csv").read_text()
    calls.clear()
    sweep(params, cfg, "folder", root, base, grid, **kw)  # complete: nothing to do
    assert calls == [] and (tmp_path / "sw" / "ablation.csv").read_text() == first
    assert not (tmp_path / "sw" / ".features").exists()  # the temporary cache is gone once complete
    # a row made with other settings is not taken for this one
    sweep(params, cfg, "folder", root, base, {"theta": ["0.3"], "image_score": ["sum"]},
          **{**kw, "aupro": "legacy"})
    assert len(calls) == 1


@pytest.mark.slow  # one compilation per configuration: ~30 s on 2 shared cores
def test_row_run_json_reruns_to_the_same_scores(tmp_path, tiny, capsys):
    root, masks = make_folder(tmp_path / "data")
    common = ["--dataset", "folder", "--root", str(root), "--masks", str(masks), "--weights", "random:tiny",
              "--size", str(SIZE), "--no-progress"]
    assert main(["sweep", *common, "--method", "fiseclip", "--set", "batch_size=0", "--set", "sigma=2",
                 "--grid", "rho=0.1,0.5", "--grid", "text_filter=share", "--grid", "r_list=1;1,3",
                 "--sort", "image_AUROC", "--out", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert "| rho | text_filter | r_list | image_AUROC |" in out
    rows = list(csv.DictReader(open(tmp_path / "sw" / "ablation.csv")))
    assert len(rows) == 4 and {r["r_list"] for r in rows} == {"1", "1,3"}
    auroc = [float(r["image_AUROC"]) for r in rows]
    assert auroc == sorted(auroc, reverse=True)
    for row in rows[:2]:
        run_json = tmp_path / "sw" / "rows" / row["row"] / "run.json"
        rec = json.loads(run_json.read_text())
        assert rec["run_config"]["method_config"]["rho"] == float(row["rho"])
        out_dir = tmp_path / "re" / row["row"]
        assert main(["evaluate", *common, "--config", str(run_json), "--out", str(out_dir)]) == 0
        again = json.loads((out_dir / "fiseclip" / "folder" / "run.json").read_text())
        assert again["run_config"] == rec["run_config"]  # the very same configuration
        results = json.loads((out_dir / "fiseclip" / "folder" / "results.json").read_text())
        for name, value in results["mean"]["metrics"].items():
            assert rec["mean"]["metrics"][name] == pytest.approx(value, abs=1e-6)
            assert float(row[name]) == pytest.approx(100 * value, abs=6e-4)


def test_detect_run_json_reruns_exactly_with_cache(tmp_path, capsys):
    root, _ = make_folder(tmp_path / "data", n_good=2, n_bad=2)
    args = ["detect", str(root), "--weights", "random:tiny", "--size", str(SIZE), "--no-progress",
            "--cache", str(tmp_path / "cache")]
    assert main([*args, "--method", "musc", "--set", "r_list=1,3", "--set", "k_list=1,2",
                 "--out", str(tmp_path / "a")]) == 0
    first = json.loads((tmp_path / "a" / "run.json").read_text())
    assert first["config"]["r_list"] == [1, 3] and first["config"]["k_list"] == [1, 2]
    assert main([*args, "--config", str(tmp_path / "a" / "run.json"), "--out", str(tmp_path / "b")]) == 0
    second = json.loads((tmp_path / "b" / "run.json").read_text())
    assert second["config"] == first["config"]
    assert (tmp_path / "a" / "scores.csv").read_text() == (tmp_path / "b" / "scores.csv").read_text()
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 4


def test_grid_errors_are_one_line(tmp_path, capsys):
    base = methods.get("fiseclip")
    with pytest.raises(Exception, match="--grid thetaa=0.1: unknown key|unknown key 'thetaa'"):
        grid_points(base, parse_grid(["thetaa=0.1,0.2"]))
    with pytest.raises(Exception, match="allowed values: sum, max"):
        grid_points(base, parse_grid(["image_score=sum,mean"]))
    with pytest.raises(Exception, match="expected KEY=V1,V2"):
        parse_grid(["theta"])
    root, masks = make_folder(tmp_path / "data", n_good=1, n_bad=1)
    assert main(["sweep", "--dataset", "folder", "--root", str(root), "--weights", "random:tiny",
                 "--grid", "theta=x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "theta=x: expected a number" in err[0]
