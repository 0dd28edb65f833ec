"""Methods are plug-ins: a toy method defined here is one class and one `register` line, and
then runs through `detect_category`, `evaluate` and the CLI like the built-in ones."""

import csv
import dataclasses
import importlib
import json
import re
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fiseclip_jax as fj
from fiseclip_jax import methods
from fiseclip_jax.cli import main
from fiseclip_jax.methods import Detection, Method


@dataclasses.dataclass(frozen=True)
class ToyConfig(Method):
    """Score = distance of each projected patch embedding to the mean over the image's patches
    (no text, per-batch groups of `encode_batch`)."""

    power: float = 1.0

    name = "toy"
    prompts = None

    def encode(self, params, cfg, pixels):
        return {"patches": fj.encode_image(params, cfg, pixels)["patch_embeds"]}

    def score(self, feats, text, valid, *, size, mesh=None):
        z = feats["patches"]  # [B, P, D]
        d = jnp.linalg.norm(z - z.mean(1, keepdims=True), axis=-1) ** self.power  # [B, P]
        g = int(round(d.shape[1] ** 0.5))
        maps = jax.image.resize(d.reshape(-1, g, g), (d.shape[0], size, size), "nearest") * valid[:, None, None]
        return Detection(d.max(1) * valid, maps, jnp.full(valid.shape, -1, jnp.int32))


def toy_oracle(params, cfg, pixels, power=1.0):
    """numpy: the same scores from encode_image's patch embeddings, one image at a time."""
    out = []
    for x in pixels:
        z = np.asarray(fj.encode_image(params, cfg, x[None])["patch_embeds"][0], np.float64)
        out.append((np.linalg.norm(z - z.mean(0), axis=-1) ** power).max())
    return np.array(out)


@pytest.fixture()
def toy():
    methods.register("toy", ToyConfig)
    yield
    methods.unregister("toy")


@pytest.fixture(scope="module")
def tiny():
    params, cfg, _ = fj.resolve_weights("random:tiny", seed=0)
    return params, cfg


def images(n, seed=0, size=40):
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def labelled_folder(root, n_good=3, n_bad=3):
    for i, im in enumerate(images(n_good + n_bad, seed=5)):
        sub = "good" if i < n_good else "crack"
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / sub / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------ registry
def test_registry_lists_builtin_methods_and_names_unknown_ones():
    assert methods.names()[:4] == ("musc", "fiseclip", "anoclip", "anoclip+")
    assert isinstance(methods.get("musc"), fj.MuScConfig)
    plus = methods.get("anoclip+")
    assert isinstance(plus, fj.AnoCLIPConfig) and plus.tta == fj.TTAConfig() and plus.label == "anoclip+"
    assert methods.get("anoclip").label == "anoclip" and methods.get("fiseclip", theta=0.3).theta == 0.3
    with pytest.raises(ValueError, match="unknown method 'patchcore'.*musc, fiseclip, anoclip"):
        methods.get("patchcore")
    with pytest.raises(ValueError, match="already registered"):
        methods.register("musc", fj.MuScConfig)


def test_run_options_map_onto_each_methods_own_fields():
    """--batch-size is FiSeCLIP's matching batch, --act MuSc's activation, --seed the adapter's seed."""
    opts = dict(batch_size=5, act="gelu", seed=3)
    assert methods.get("fiseclip").with_run_options(**opts) == fj.FiSeCLIPConfig(batch_size=5)
    assert methods.get("musc").with_run_options(**opts) == fj.MuScConfig(act="gelu")
    assert methods.get("anoclip+").with_run_options(**opts).tta == fj.TTAConfig(seed=3)
    assert methods.get("anoclip").with_run_options(**opts) == fj.AnoCLIPConfig()  # no adapter: nothing to seed
    assert methods.get("fiseclip").with_run_options(batch_size=None) == fj.FiSeCLIPConfig()


def test_groups_say_how_a_category_is_scored():
    assert fj.MuScConfig().group(83, 8) is None  # whole category
    assert fj.FiSeCLIPConfig(batch_size=16).group(83, 8) == 16
    assert fj.FiSeCLIPConfig(batch_size=16).group(10, 8) is None  # one batch holds them all
    assert fj.FiSeCLIPConfig(batch_size=0).group(83, 8) is None
    assert fj.AnoCLIPConfig().group(83, 8) == 8


def test_no_method_branches_outside_methods():
    """detect, evaluate, the runner and the CLI find methods through the registry only."""
    pkg = Path(fj.__file__).parent
    pattern = re.compile(r"isinstance\([^)]*(MuSc|FiSeCLIP|AnoCLIP|TTA)Config|==\s*[\"'](musc|fiseclip|anoclip\+?)[\"']")
    offenders = [f"{p.relative_to(pkg)}:{i}" for p in pkg.rglob("*.py") if "methods" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


# ------------------------------------------------------------------ a toy method end to end
def test_toy_method_through_detect_category(tiny, toy):
    params, cfg = tiny
    ims = images(7)
    res = fj.detect_category(params, cfg, ims, "widget", methods.get("toy", power=2.0), size=32, encode_batch=3,
                             progress=False)
    np.testing.assert_allclose(res.image_scores, toy_oracle(params, cfg, fj.preprocess(ims, 32), 2.0), rtol=1e-5)
    assert res.anomaly_maps.shape == (7, 32, 32) and (res.num_refs == -1).all()


def test_toy_method_through_evaluate(tiny, toy, tmp_path):
    from sklearn.metrics import roc_auc_score

    params, cfg = tiny
    root = labelled_folder(tmp_path / "widget")
    out = tmp_path / "out"
    results = fj.evaluate.evaluate(params, cfg, "folder", root, methods.get("toy"), size=32, out=out, progress=False,
                                   weights="random:tiny")
    assert results["method"] == "toy"
    rows = list(csv.DictReader(open(out / "toy" / "folder" / "widget" / "scores.csv")))
    labels = [int(r["label"]) for r in rows]
    scores = np.array([float(r["score"]) for r in rows])
    paths = [root / r["file"] for r in rows]
    want = toy_oracle(params, cfg, fj.preprocess([np.asarray(Image.open(p)) for p in paths], 32))
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    metrics = json.loads((out / "toy" / "folder" / "widget" / "metrics.json").read_text())["metrics"]
    assert metrics["image_AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    run = json.loads((out / "toy" / "folder" / "run.json").read_text())
    assert run["run_config"]["method_config"] == {"power": 1.0, "method": "toy"}


def test_toy_method_from_the_command_line(toy, tmp_path, capsys):
    folder = labelled_folder(tmp_path / "widget")
    assert main(["detect", str(folder), "--method", "toy", "--weights", "random:tiny", "--size", "32",
                 "--no-progress", "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert len(rows) == 6 and json.loads((tmp_path / "out" / "run.json").read_text())["config"]["method"] == "toy"


# ------------------------------------------------------------------ compiled once per shape
def test_detect_category_traces_once_for_padded_batches(tiny, monkeypatch):
    """7 images in batches of 3: two full batches and a padded one share one compilation."""
    detect_module = importlib.import_module("fiseclip_jax.detect")  # fj.detect is the function
    params, cfg = tiny
    counted = jax.jit(chex.assert_max_traces(detect_module._detect.__wrapped__, n=1),
                      static_argnames=("cfg", "method"))
    monkeypatch.setattr(detect_module, "_detect", counted)
    text = np.eye(2, cfg.embed_dim, dtype=np.float32)
    res = fj.detect_category(params, cfg, images(7, seed=2), "x", fj.AnoCLIPConfig(), size=32, encode_batch=3,
                             text=text, progress=False)
    assert res.image_scores.shape == (7,)
