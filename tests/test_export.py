"""Exported detectors (fiseclip_jax.export): the serialized program gives the numbers of the live `detect` (and of
`detect_with_bank`) on real MVTec bottle images with a tiny random CLIP, for every method, at batch 1 and 5 where
the batch is symbolic; the artifact runs in a process that never imports fiseclip_jax; a platform the export does
not cover and arrays of another shape are one FiseclipError each; the CLI round trip writes live detect's scores."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fiseclip_jax as fj
from fiseclip_jax import methods
from fiseclip_jax.cache import tree_fingerprint
from fiseclip_jax.clip.config import CLIP_MEAN
from fiseclip_jax.cli import main
from fiseclip_jax.data import load_image
from fiseclip_jax.errors import FiseclipError
from fiseclip_jax.export import check_platforms, export_detector, load_exported

S = 32  # tiny CLIP's native size
# The batch-free FiSeCLIP of the bank tests: the share filter keeps 80 % of each image's patches (with random
# weights every patch's text score is above the default theta).
FISE_BANK = fj.FiSeCLIPConfig(fusion_norm="fixed", image_score="max", text_filter="share")
TOL = 1e-6


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = fj.resolve_weights("random:tiny", seed=0)
    return params, cfg


@pytest.fixture(scope="module")
def files(mvtec_root):
    """5 test images of one bottle folder each (broken, contaminated, good), in a fixed order."""
    test = mvtec_root / "bottle" / "test"
    return [sorted((test / d).glob("*.png"))[i] for d, i in
            (("broken_large", 0), ("good", 0), ("contamination", 0), ("broken_small", 0), ("good", 1))]


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory, files, mvtec_root):
    """name -> export directory: every method, and bank detection with FiSeCLIP."""
    params, cfg = tiny
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, batch in (("anoclip", "dynamic"), ("anoclip+", "dynamic"), ("musc", 5), ("fiseclip", 5)):
        out[name] = root / name.replace("+", "plus")
        export_detector(params, cfg, methods.get(name), out=out[name], class_name="bottle", batch=batch,
                        platforms=("cpu", "cuda", "tpu"), weights="random:tiny", random_weights=True)
    goods = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:4]
    text = fj.text_features_full(params, cfg, "bottle", FISE_BANK.prompts)
    bank = fj.build_bank(params, cfg, fj.preprocess([load_image(p) for p in goods], S), text, FISE_BANK,
                         capacity=6, class_name="bottle", weights="random:tiny")
    out["bank"] = root / "bank"
    export_detector(params, cfg, None, bank=bank, out=out["bank"], platforms=("cpu",))
    out["bank-object"] = bank
    return out


def live(tiny, method, pixels, bank=None):
    """The live `detect` (or `detect_with_bank`) on the same preprocessed pixels: the oracle."""
    params, cfg = tiny
    text = fj.text_features_full(params, cfg, "bottle", method.prompts) if method.prompts else \
        np.zeros((2, cfg.embed_dim), np.float32)
    if bank is not None:
        return fj.detect_with_bank(params, cfg, bank, pixels, text)
    return fj.detect(params, cfg, pixels, text, method)


def assert_same(det, ref):
    np.testing.assert_allclose(det.image_scores, np.asarray(ref.image_scores), rtol=0, atol=TOL)
    np.testing.assert_allclose(det.anomaly_maps, np.asarray(ref.anomaly_maps), rtol=0, atol=TOL)
    np.testing.assert_array_equal(det.num_refs, np.asarray(ref.num_refs))


@pytest.mark.parametrize("name,batches", [
    ("anoclip", (1, 5)), pytest.param("anoclip+", (1, 5), marks=pytest.mark.slow), ("musc", (5,)), ("fiseclip", (5,)),
    ("bank", (1, 5))])
def test_exported_equals_live_detect(tiny, exports, files, name, batches):
    detector = load_exported(exports[name])
    pixels = np.stack([detector.method.prepare(load_image(f), S) for f in files])
    ref = live(tiny, detector.method, pixels, exports["bank-object"] if name == "bank" else None)
    assert np.ptp(np.asarray(ref.image_scores)) > 0 or name.startswith("anoclip")  # the images are told apart
    for b in batches:  # symbolic batch: 5 calls of 1 image, or 1 call of 5; the carried state threads them
        assert_same(detector(files, encode_batch=b), ref)
    if detector.batch is None:
        assert detector.record["batch"] == "dynamic"
    else:
        assert detector.batch == 5 and detector.method.record().get("batch_size", 5) == 5


def test_artifact_runs_without_fiseclip(tiny, exports, files, tmp_path):
    """A fresh process with only jax, numpy and orbax: deserialize, restore, call on the saved pixels."""
    detector = load_exported(exports["anoclip+"])
    pixels = np.stack([detector.method.prepare(load_image(f), S) for f in files])
    np.save(tmp_path / "pixels.npy", pixels)
    ref = live(tiny, detector.method, pixels)
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np, orbax.checkpoint as ocp
        d = {str(exports["anoclip+"])!r}
        exp = jax.export.deserialize(bytearray(open(d + "/program.bin", "rb").read()))
        tree = ocp.StandardCheckpointer().restore(d + "/arrays")
        pixels = np.load({str(tmp_path / "pixels.npy")!r})
        scores, maps, refs, state = exp.call(tree["args"], pixels, np.ones(len(pixels), bool), tree["state"])
        np.savez({str(tmp_path / "out.npz")!r}, scores=scores, maps=maps)
        assert not any(m.startswith("fiseclip_jax") for m in sys.modules), "fiseclip_jax was imported"
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["scores"], np.asarray(ref.image_scores), rtol=0, atol=TOL)
        np.testing.assert_allclose(z["maps"], np.asarray(ref.anomaly_maps), rtol=0, atol=TOL)


def test_export_json_records_what_the_program_needs(tiny, exports):
    record = json.loads((exports["fiseclip"] / "export.json").read_text())
    assert record["method"] == "fiseclip" and record["config"]["batch_size"] == 5 and record["batch"] == 5
    assert record["class_name"] == "bottle" and record["size"] == S
    assert record["preprocessing"]["mean"] == list(CLIP_MEAN)
    assert record["preprocessing"]["resample"] == "bicubic"
    assert record["weights_fingerprint"] == tree_fingerprint(tiny[0])
    assert record["platforms"] == ["cpu", "cuda", "tpu"] and record["versions"]["jax"] == jax.__version__
    # the parameters are arguments of the program, not constants: the program is far smaller than they are
    n_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tiny[0]))
    assert record["program_bytes"] < n_bytes


def test_batch_methods_refuse_a_dynamic_batch(tiny, tmp_path):
    params, cfg = tiny
    for name in ("musc", "fiseclip"):
        with pytest.raises(FiseclipError, match="pass --batch N"):
            export_detector(params, cfg, methods.get(name), out=tmp_path / name, class_name="bottle")
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["musc", "fiseclip"])
def test_fewer_images_than_the_batch_are_padded_and_masked(tiny, exports, files, name):
    """4 images through a program of batch 5: the padding row is masked, the 4 equal live detect on 4 images."""
    detector = load_exported(exports[name])
    pixels = np.stack([detector.method.prepare(load_image(f), S) for f in files[:4]])
    assert_same(detector(files[:4]), live(tiny, detector.method, pixels))


def test_musc_category_larger_than_the_batch_is_refused(exports, files):
    with pytest.raises(FiseclipError, match="export again with --batch 6"):
        load_exported(exports["musc"])(files + files[:1])


def test_wrong_platform_is_one_error(tiny, tmp_path):
    params, cfg = tiny
    export_detector(params, cfg, methods.get("anoclip"), out=tmp_path / "tpu", class_name="bottle",
                    platforms="tpu")
    with pytest.raises(FiseclipError, match="exported for tpu, this machine computes on cpu"):
        load_exported(tmp_path / "tpu")


def test_arrays_of_another_shape_are_one_error(exports, tmp_path):
    """Arrays of another model: one leaf cut short, and a tree without text features."""
    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(exports["anoclip"] / "arrays")
    tree["args"]["text"]["features"] = tree["args"]["text"]["features"][:, :-1]
    bad = tmp_path / "bad"
    for f in ("export.json", "program.bin"):
        (bad / f).parent.mkdir(exist_ok=True)
        (bad / f).write_bytes((exports["anoclip"] / f).read_bytes())
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((bad / "arrays").resolve(), tree)
    with pytest.raises(FiseclipError, match=r"\['args'\]\['text'\]\['features'\]: \(2, 23\) float32 where the "
                                            r"program takes \(2, 24\)"):
        load_exported(bad)
    other = tmp_path / "other"
    other.mkdir()
    for f in ("export.json", "program.bin"):
        (other / f).write_bytes((exports["anoclip"] / f).read_bytes())
    os.symlink((exports["musc"] / "arrays").resolve(), other / "arrays")
    with pytest.raises(FiseclipError, match=r"missing \['args'\]\['text'\]"):
        load_exported(other)


@pytest.mark.slow
def test_cli_export_then_detect_exported_writes_live_scores(tmp_path, files, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(files[:4]):
        (folder / f"{i}_{f.parent.name}.png").write_bytes(f.read_bytes())
    common = ["--weights", "random:tiny", "--class-name", "bottle", "--no-progress"]
    assert main(["export", "--method", "anoclip+", *common, "--platforms", "cpu", "--out",
                 str(tmp_path / "exp")]) == 0
    assert main(["detect", str(folder), "--exported", str(tmp_path / "exp"), "--out", str(tmp_path / "o1"),
                 "--no-progress"]) == 0
    assert main(["detect", str(folder), "--method", "anoclip+", *common, "--out", str(tmp_path / "o2")]) == 0
    assert (tmp_path / "o1" / "scores.csv").read_text() == (tmp_path / "o2" / "scores.csv").read_text()
    assert len(list((tmp_path / "o1" / "overlays").glob("*.png"))) == 4
    run = json.loads((tmp_path / "o1" / "run.json").read_text())
    assert run["exported"]["platforms"] == ["cpu"] and run["config"]["method"] == "anoclip+"
    capsys.readouterr()
    assert main(["detect", str(folder), "--exported", str(tmp_path / "exp"), "--weights", "random:tiny",
                 "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fiseclip-jax detect: error: --weights: the export {tmp_path / 'exp'} fixes method, weights, "
                   "size, class name and bank; drop the option(s) or export again"]
    assert main(["export", "--method", "musc", *common, "--out", str(tmp_path / "m")]) == 2
    assert "pass --batch N" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_exported_bank_decides_as_detect_bank(tmp_path, exports, files):
    """`export --bank` then `detect --exported`: the scores and decisions of `detect --bank` (same threshold)."""
    fj.save_bank(tmp_path / "bank", exports["bank-object"], notes={"seed": 0})
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"{i}_{f.parent.name}.png").write_bytes(f.read_bytes())
    assert main(["export", "--bank", str(tmp_path / "bank"), "--platforms", "cpu", "--out", str(tmp_path / "exp"),
                 "--no-progress"]) == 0
    assert main(["detect", str(folder), "--exported", str(tmp_path / "exp"), "--out", str(tmp_path / "o1"),
                 "--no-progress"]) == 0
    assert main(["detect", str(folder), "--bank", str(tmp_path / "bank"), "--out", str(tmp_path / "o2"),
                 "--no-progress"]) == 0
    rows = (tmp_path / "o1" / "scores.csv").read_text()
    assert rows == (tmp_path / "o2" / "scores.csv").read_text() and rows.startswith("file,score,label,decision")
    runs = [json.loads((tmp_path / o / "run.json").read_text()) for o in ("o1", "o2")]
    assert runs[0]["decision"]["threshold"] == runs[1]["decision"]["threshold"] == fj.bank_threshold(
        exports["bank-object"], 0.01)


def test_resumed_groups_carry_the_state_of_the_skipped_ones(exports, files):
    """AnoCLIP+ in calls of 2: skipping the first call (a resumed run) restores its carried state from the store,
    so the later calls give what an uninterrupted run gives (the adapter draws are keyed by the image index)."""
    detector = load_exported(exports["anoclip+"])
    store = {}
    full = list(detector.iter_groups(files, encode_batch=2, progress=False, feature_store=store))
    assert sorted(store) == ["state-000000", "state-000001", "state-000002"]
    resumed = list(detector.iter_groups(files, encode_batch=2, progress=False, feature_store=store,
                                        skip_groups={0}))
    assert [r.group for r in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed):
        np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)
    fresh = list(detector.iter_groups(files[2:4], encode_batch=2, progress=False))  # index 0, 1: other draws
    assert np.abs(fresh[0].anomaly_maps - full[1].anomaly_maps).max() > 1e-4


def test_platforms_are_checked():
    assert check_platforms("CPU, cuda,cpu") == ("cpu", "cuda")
    with pytest.raises(FiseclipError, match="'cpu,gpu': gpu: each must be one of cpu, cuda, rocm, tpu"):
        check_platforms("cpu,gpu")
