"""The `fiseclip-jax` command end to end, with random tiny weights."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "bottle"


def read_scores(out):
    with open(out / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_detect_examples(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["detect", str(EXAMPLES), "--method", "fiseclip", "--weights", "random:tiny", "--size", "32",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS" in err and "MEANINGLESS" in err
    rows = read_scores(out)
    assert len(rows) == 10 and {r["label"] for r in rows} == {"0", "1"}
    assert all(np.isfinite(float(r["score"])) for r in rows)
    assert len(list((out / "overlays").glob("*.png"))) == 10
    run = json.loads((out / "run.json").read_text())
    assert run["random_weights"] is True and run["class_name"] == "bottle"
    assert run["config"]["method"] == "fiseclip" and run["size"] == 32


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
@pytest.mark.parametrize("method", ["musc", "anoclip"])
def test_detect_mvtec_bottle(mvtec_root, tmp_path, method):
    """Every test image of the real bottle category (83) through the CLI, random weights."""
    out = tmp_path / method
    rc = main(["detect", str(mvtec_root / "bottle" / "test"), "--class-name", "bottle", "--method", method,
               "--weights", "random:tiny", "--size", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = read_scores(out)
    assert len(rows) == 83
    assert sum(r["label"] == "0" for r in rows) == 20
    assert len(list((out / "overlays").glob("*.png"))) == 83
    with Image.open(next((out / "overlays").glob("good__*.png"))) as im:
        assert im.size == (64, 32)  # image | overlay at 32 px


def test_detect_errors_are_one_readable_line(tmp_path, capsys):
    assert main(["detect", str(tmp_path / "nope"), "--weights", "random:tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["detect", str(bad), "--weights", "random:tiny", "--method", "anoclip", "--strict",
                 "--out", str(tmp_path / "o")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["detect", str(EXAMPLES), "--weights", "random:tiny", "--size", "33",
                 "--out", str(tmp_path / "o")]) == 2
    assert "divisible" in capsys.readouterr().err


def test_convert_then_detect_with_converted_weights(tmp_path, capsys):
    """convert a Hugging Face directory, load it back bit-exact, and run detect with it."""
    torch = pytest.importorskip("torch")
    import jax
    from transformers import CLIPModel

    from fiseclip_jax import get_config, load_clip
    from fiseclip_jax.clip.params import from_hf_state_dict

    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = CLIPModel(cfg.to_hf_config())
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert "act=quick_gelu" in capsys.readouterr().out
    params, got = load_clip(tmp_path / "ckpt")
    assert got == cfg
    ref = from_hf_state_dict(model.state_dict(), cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref)
    out = tmp_path / "out"
    assert main(["detect", str(EXAMPLES), "--method", "anoclip", "--weights", str(tmp_path / "ckpt"),
                 "--out", str(out), "--no-progress"]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err
    assert len(read_scores(out)) == 10
    # converting onto an existing directory refuses without --overwrite
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 2


def test_detect_with_devices_flag_matches_plain(tmp_path):
    """--devices 1 goes through the mesh path (sharded encode, ring matching) and changes nothing."""
    args = ["detect", str(EXAMPLES), "--method", "musc", "--weights", "random:tiny", "--size", "32", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--devices", "1", "--out", str(tmp_path / "b")]) == 0
    a, b = read_scores(tmp_path / "a"), read_scores(tmp_path / "b")
    np.testing.assert_allclose([float(r["score"]) for r in a], [float(r["score"]) for r in b], atol=1e-4)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["devices"] == 1
