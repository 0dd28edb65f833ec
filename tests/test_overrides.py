"""--set / --config parsing (`fiseclip_jax.overrides`) and `fiseclip-jax methods`: a table of good and bad
keys and values, nested keys, tuples, TOML files, --set winning, run records read back exactly."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax import methods
from fiseclip_jax.cli import main
from fiseclip_jax.errors import FiseclipError
from fiseclip_jax.methods import AnoCLIPConfig, FiSeCLIPConfig, MuScConfig, TTAConfig
from fiseclip_jax.overrides import apply_overrides, describe, load_config, parse_assignments, resolve_method


def _get(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


GOOD = [  # (method, KEY=VALUE, dotted field, expected value)
    ("fiseclip", "alpha=0.2", "alpha", 0.2),
    ("fiseclip", "alpha=1", "alpha", 1.0),
    ("fiseclip", "layers=6,12,18,24", "layers", (6, 12, 18, 24)),
    ("fiseclip", "layers=none", "layers", None),
    ("fiseclip", "layers= 3 , 6 ", "layers", (3, 6)),
    ("fiseclip", "r_list=1", "r_list", (1,)),
    ("fiseclip", "local=qq+kk", "local", "qq+kk"),
    ("fiseclip", "align_corners=false", "align_corners", False),
    ("fiseclip", "align_corners=YES", "align_corners", True),
    ("fiseclip", "batch_size=0", "batch_size", 0),
    ("fiseclip", "prompts=anoclip", "prompts", "anoclip"),
    ("musc", "act=gelu", "act", "gelu"),
    ("musc", "act=None", "act", None),
    ("musc", "k_list=1,8,9", "k_list", (1, 8, 9)),
    ("anoclip", "local_blocks=none", "local_blocks", None),
    ("anoclip", "local_blocks=4", "local_blocks", 4),
    ("anoclip", "tiles=2", "tiles", 2),
    ("anoclip", "tta=default", "tta", TTAConfig()),
    ("anoclip+", "tta.steps=10", "tta.steps", 10),
    ("anoclip+", "tta.betas=0.8,0.99", "tta.betas", (0.8, 0.99)),
    ("anoclip+", "tta.adapter=linear", "tta.adapter", "linear"),
    ("anoclip+", "tta=none", "tta", None),
]


@pytest.mark.parametrize("name,item,field,expected", GOOD)
def test_good_values_are_parsed_to_the_fields_type(name, item, field, expected):
    method = apply_overrides(methods.get(name), parse_assignments([item]))
    value = _get(method, field)
    assert value == expected and type(value) is type(expected)
    # every other field keeps its default
    base = methods.get(name)
    top = field.split(".")[0]
    assert {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.name != top} == \
        {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.name != top}


BAD = [  # (method, KEY=VALUE, fragments the one-line error must hold)
    ("fiseclip", "alpah=0.2", ["unknown key 'alpah'", "valid keys: layers, r_list, alpha,", "chunk_size"]),
    ("fiseclip", "local=kv", ["local=kv", "allowed values: qq, qq+kk, vv, identity"]),
    ("fiseclip", "text_filter=both", ["allowed values: threshold, share"]),
    ("fiseclip", "alpha=abc", ["alpha=abc", "expected a number"]),
    ("fiseclip", "batch_size=1.5", ["expected an integer"]),
    ("fiseclip", "layers=6,x", ["layers=6,x", "tuple[int, ...]"]),
    ("fiseclip", "align_corners=maybe", ["allowed values: true, false"]),
    ("fiseclip", "theta.x=1", ["unknown key 'theta.x'"]),
    ("fiseclip", "r_list=none", ["expected tuple[int, ...], not none"]),
    ("fiseclip", "prompts=mine", ["allowed values: winclip, anoclip"]),
    ("musc", "act=relu", ["allowed values: none, quick_gelu, gelu"]),
    ("musc", "tau=1", ["unknown key 'tau' for musc"]),
    ("anoclip", "tta.steps=3", ["tta is none for anoclip", "anoclip+"]),
    ("anoclip", "tiles=3", ["allowed values: 1, 2"]),
    ("anoclip+", "tta.betas=0.9", ["expected 2 comma-separated values"]),
    ("anoclip+", "tta.stepz=3", ["unknown key 'tta.stepz'", "tta.steps", "tta.carry_moments"]),
    ("anoclip+", "tta.init_fn=x", ["unknown key 'tta.init_fn'"]),  # functions: Python only
    ("anoclip+", "tta.steps=-1", ["steps must be >= 0"]),  # the config's own check
    ("fiseclip", "alpha", ["expected KEY=VALUE"]),
]


@pytest.mark.parametrize("name,item,fragments", BAD)
def test_bad_keys_and_values_fail_in_one_line(name, item, fragments):
    with pytest.raises(FiseclipError) as err:
        apply_overrides(methods.get(name), parse_assignments([item]))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_later_set_wins_and_nested_mappings_equal_dotted_keys():
    assert parse_assignments(["alpha=0.1", "alpha=0.4"]) == {"alpha": "0.4"}
    a = apply_overrides(methods.get("anoclip+"), {"tta": {"steps": 7, "betas": [0.5, 0.6]}, "views": True})
    b = apply_overrides(methods.get("anoclip+"), parse_assignments(["tta.steps=7", "tta.betas=0.5,0.6",
                                                                     "views=true"]))
    assert a == b == AnoCLIPConfig(views=True, tta=TTAConfig(steps=7, betas=(0.5, 0.6)))


def test_toml_config_and_set_wins(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[method]\nmethod = "anoclip+"\nviews = true\nmean_filter = 5\n'
                    '[method.tta]\nsteps = 9\nlr = 0.01\nbetas = [0.8, 0.9]\n')
    name, values = load_config(path)
    assert name == "anoclip+"
    m = resolve_method(config=path, sets={"tta.steps": "2", "mean_filter": "1"})
    assert m == AnoCLIPConfig(views=True, mean_filter=1, tta=TTAConfig(steps=2, lr=0.01, betas=(0.8, 0.9)))
    assert m.label == "anoclip+"
    # a TOML value of the wrong type, a missing table, a conflicting --method: one line each
    bad = tmp_path / "bad.toml"
    bad.write_text('[method]\nalpha = "high"\n')
    with pytest.raises(FiseclipError, match=r"--config .*bad.toml alpha=high: expected a number"):
        resolve_method("fiseclip", config=bad)
    bad.write_text('[model]\nalpha = 0.1\n')
    with pytest.raises(FiseclipError, match="no \\[method\\] table"):
        resolve_method("fiseclip", config=bad)
    with pytest.raises(FiseclipError, match="is for method anoclip\\+, but --method says musc"):
        resolve_method("musc", config=path)
    bad.write_text("[method\n")
    with pytest.raises(FiseclipError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("method", [
    FiSeCLIPConfig(layers=(2, 4), r_list=(1, 3), alpha=0.25, local="vv", text_filter="share", rho=0.3,
                   fusion_norm="fixed", match_scale=2.5, image_score="max", align_corners=False),
    MuScConfig(act="gelu", k_list=(1, 8, 9), sigma=1.5),
    AnoCLIPConfig(local_blocks=3, views=True, tiles=2),
    AnoCLIPConfig(tta=TTAConfig(steps=3, adapter="linear", carry_moments=True, seed=7, betas=(0.8, 0.95))),
])
def test_a_recorded_config_reads_back_exactly(tmp_path, method):
    """run.json records method.record(); --config run.json rebuilds the very same config."""
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"run_config": {"method_config": method.record()}}))
    assert resolve_method(config=run) == method
    run.write_text(json.dumps({"config": method.record()}))  # detect's run.json
    assert resolve_method(config=run) == method


def test_methods_command_lists_every_field(capsys):
    assert main(["methods", "fiseclip"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    for f in dataclasses.fields(FiSeCLIPConfig):
        assert f.name in lines, f.name
        assert f.metadata["meaning"] in lines[f.name]  # the one-line meaning, from the field's metadata
    assert lines["alpha"].split()[1:3] == ["float", "0.3"]
    assert lines["layers"].split()[1:6] == ["tuple[int,", "...]", "|", "none", "none"]
    assert lines["local"].rstrip().endswith("[qq, qq+kk, vv, identity] [enc]")
    assert lines["theta"].rstrip().endswith("[stage]")  # changes the matching, not the encoding
    assert not lines["fusion_weight"].rstrip().endswith("]")  # only the cheap rest of the scoring
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(f"{n}: " in out for n in methods.names())
    assert "  tta.steps " in out and out.count("\n  tta.steps ") == 2  # anoclip and anoclip+


def test_describe_is_the_library_face_of_methods(capsys):
    main(["methods", "musc"])
    assert capsys.readouterr().out == describe("musc")


def test_cli_rejects_bad_set_before_loading_weights(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    args = ["detect", str(tmp_path / "imgs"), "--weights", "random:tiny", "--out", str(tmp_path / "o"),
            "--set", "fusion_wieght=0.2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'fusion_wieght'" in err[0] and "fusion_weight" in err[0]
    assert main(["evaluate", "--dataset", "folder", "--root", str(tmp_path / "imgs"), "--weights", "random:tiny",
                 "--out", str(tmp_path / "o"), "--method", "musc", "--set", "act=relu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "allowed values: none, quick_gelu, gelu" in err[0]
    assert main(["evaluate", "--dataset", "folder", "--root", str(tmp_path / "imgs"), "--weights", "random:tiny",
                 "--out", str(tmp_path / "o"), "--config", str(tmp_path / "nope.toml")]) == 2
    assert "--config" in capsys.readouterr().err
