"""Orbax checkpoints: bit-exact round trip, sharded restore, clear errors, hub ids, random weights."""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fiseclip_jax.clip.checkpoint import (CheckpointError, hub_cache_path, load_clip, resolve_weights, save_clip,
                                          weights_dir)
from fiseclip_jax.clip.config import get_config
from fiseclip_jax.clip.modeling import param_shapes

# After a failed restore, orbax 0.12.8 leaves read coroutines and an event-loop callback that
# fail again when garbage-collected; pytest reports them (in whichever test runs next).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_orbax_leftovers():
    yield
    gc.collect()  # so they surface (and are filtered) here, not in another module's tests


def random_params(cfg, seed=0):
    """Every leaf random (init_clip's LayerNorms are ones/zeros, which would hide a swapped leaf)."""
    shapes = param_shapes(cfg)
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.standard_normal(s.shape).astype(np.float32) for s in leaves])


def assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        assert np.asarray(x).dtype == np.float32
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = get_config("tiny-gelu")
    params = random_params(cfg)
    out = save_clip(params, cfg, tmp_path_factory.mktemp("ckpt") / "tiny")
    return out, params, cfg


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_round_trip_bit_exact(saved):
    out, params, cfg = saved
    assert sorted(p.name for p in out.iterdir()) == ["checksums.json", "config.json", "params"]
    assert json.loads((out / "config.json").read_text())["format_version"] == 2
    got, got_cfg = load_clip(out)
    assert got_cfg == cfg
    assert_trees_equal(got, params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(got))


def test_load_onto_sharding(saved):
    out, params, _ = saved
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got, _ = load_clip(out, sharding=s)
    assert all(x.sharding == s for x in jax.tree.leaves(got))
    assert_trees_equal(got, params)
    tree = jax.tree.map(lambda _: s, params)  # a pytree of shardings
    got, _ = load_clip(str(out), sharding=tree)
    assert all(x.sharding == s for x in jax.tree.leaves(got))
    with pytest.raises(CheckpointError, match="pytree of them"):
        load_clip(out, sharding={"vision": s})


def test_save_refuses_to_overwrite_and_checks_shapes(saved, tmp_path):
    out, params, cfg = saved
    with pytest.raises(CheckpointError, match="already exists"):
        save_clip(params, cfg, out)
    again = save_clip(params, cfg, _copy(out, tmp_path / "c"), overwrite=True)
    assert_trees_equal(load_clip(again)[0], params)
    msg = r"do not match config ViT-B/32: text\.ln_final\.bias: given \(32,\) float32 vs expected \(512,\)"
    with pytest.raises(CheckpointError, match=msg):
        save_clip(params, get_config("ViT-B/32"), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def write_config(ckpt: Path, cfg, version: int | None) -> None:
    d = cfg.to_dict() if version is None else dict(cfg.to_dict(), format_version=version)
    (ckpt / "config.json").write_text(json.dumps(d))


def _data_files(ckpt: Path) -> list[Path]:
    """The tensor data files of the orbax (OCDBT) store, largest first."""
    files = [p for p in (ckpt / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, "orbax layout changed: no data files under params/**/d/"
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def test_truncated_checkpoint(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "trunc")
    f = _data_files(ckpt)[0]
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"trunc: checkpoint data is truncated or corrupt") as e:
        load_clip(ckpt)
    assert e.value.__cause__ is not None  # the orbax / tensorstore error is chained


def test_deleted_data_file(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "gone")
    _data_files(ckpt)[0].unlink()
    with pytest.raises(CheckpointError, match=r"gone: .*(truncated or corrupt|incomplete)"):
        load_clip(ckpt)


def test_deleted_manifest(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "nomanifest")
    (ckpt / "params" / "manifest.ocdbt").unlink()
    with pytest.raises(CheckpointError, match=r"nomanifest: .*(truncated or corrupt|incomplete)"):
        load_clip(ckpt)


def test_checksum_mismatch(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "sums")
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["vision.proj"] = "0" * 64
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match=r"differ from checksums\.json \(vision\.proj\)"):
        load_clip(ckpt)
    load_clip(ckpt, verify=False)


def test_wrong_architecture_config(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "arch")
    write_config(ckpt, get_config("ViT-B/32"), 2)
    with pytest.raises(CheckpointError, match=r"arch: config\.json describes ViT-B/32 \(format_version 2\) but the "
                                              r"stored arrays do not fit it: text\.ln_final\.bias: stored \(32,\) "
                                              r"float32 vs expected \(512,\)"):
        load_clip(ckpt)


def test_bad_config_and_not_a_checkpoint(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "cfg")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not a valid CLIPConfig"):
        load_clip(ckpt)
    hf = tmp_path / "hfdir"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unconverted weights.*fiseclip-jax convert"):
        load_clip(hf)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_clip(tmp_path / "missing" / "deeper" / "dir")


def test_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FISECLIP_WEIGHTS", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="fiseclip-jax convert") as e:
        load_clip("openai/clip-vit-base-patch16")
    assert time.perf_counter() - t < 5
    assert "HF_HUB_OFFLINE" in str(e.value) and str(tmp_path / "openai--clip-vit-base-patch16") in str(e.value)


def test_hub_id_uses_cached_conversion(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("FISECLIP_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_path("someone/tiny-clip") == tmp_path / "someone--tiny-clip"
    _copy(saved[0], tmp_path / "someone--tiny-clip")
    got, cfg = load_clip("someone/tiny-clip")
    assert cfg == saved[2]
    assert_trees_equal(got, saved[1])


def test_hub_download_is_converted_and_cached(tmp_path, monkeypatch):
    """A (simulated) hub download is converted once, cached under weights_dir(), then reused."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import huggingface_hub

    from fiseclip_jax.clip.params import from_hf_state_dict

    cfg = get_config("tiny")
    model = transformers.CLIPModel(cfg.to_hf_config())
    snap = tmp_path / "snapshot"
    model.save_pretrained(snap)
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(snap)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("FISECLIP_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got, got_cfg = load_clip("openai/tiny-test")
    assert got_cfg == cfg and len(calls) == 1
    assert "config.json" in calls[0][1]["allow_patterns"] and calls[0][1]["etag_timeout"] <= 5
    assert_trees_equal(got, from_hf_state_dict(model.state_dict(), cfg))
    src = json.loads((tmp_path / "w" / "openai--tiny-test" / "source.json").read_text())
    assert src["format"] == "hf" and src["act"] == "quick_gelu"
    load_clip("openai/tiny-test")
    assert len(calls) == 1  # second time from the cache


def test_weights_dir_default(monkeypatch):
    monkeypatch.delenv("FISECLIP_WEIGHTS", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert weights_dir() == repo / "weights"


def test_resolve_weights(saved):
    params, cfg, is_random = resolve_weights("random:tiny")
    assert is_random and cfg == get_config("tiny")
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), param_shapes(cfg))
    again, _, _ = resolve_weights("random:tiny")
    other, _, _ = resolve_weights("random:tiny", seed=1)
    assert_trees_equal(params, again)
    assert not np.array_equal(params["vision"]["proj"], other["vision"]["proj"])
    params, cfg, is_random = resolve_weights(str(saved[0]))
    assert not is_random and cfg == saved[2]
    assert_trees_equal(params, saved[1])
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        resolve_weights("random:ViT-X/99")


# ---------------------------------------------------------------- format versions
def write_v1_checkpoint(params, cfg, out: Path) -> Path:
    """What save_clip wrote before format 2: each tower's blocks stacked on a leading axis under
    `blocks`, config.json without format_version (nor dtype), checksums of the stacked leaves."""
    import orbax.checkpoint as ocp

    v1 = {"logit_scale": params["logit_scale"]}
    for tower in ("vision", "text"):
        t = {k: v for k, v in params[tower].items() if k != "transformer"}
        blocks = params[tower]["transformer"]
        t["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[f"blocks_{i}"] for i in range(len(blocks))])
        v1[tower] = t
    assert v1["vision"]["blocks"]["attn"]["q"]["kernel"].shape == (cfg.vision.layers, 32, 32)
    out.mkdir()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "params", v1)
        ckpt.wait_until_finished()
    old_config = {k: v for k, v in cfg.to_dict().items() if k != "dtype"}
    (out / "config.json").write_text(json.dumps(old_config, indent=2, sort_keys=True))
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): x
            for p, x in jax.tree_util.tree_flatten_with_path(v1)[0]}
    sums = {k: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for k, x in flat.items()}
    (out / "checksums.json").write_text(json.dumps(sums))
    return out


def test_format_1_checkpoint_is_upgraded_on_load(tmp_path):
    cfg = get_config("tiny-gelu")
    params = random_params(cfg, seed=3)
    ckpt = write_v1_checkpoint(params, cfg, tmp_path / "v1")
    got, got_cfg = load_clip(ckpt)
    assert got_cfg == cfg and got_cfg.dtype == "float32"  # an old config.json has no dtype
    assert_trees_equal(got, params)
    s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got, _ = load_clip(ckpt, sharding=jax.tree.map(lambda _: s, params))
    assert all(x.sharding == s for x in jax.tree.leaves(got))
    assert_trees_equal(got, params)
    # the checksums of the stacked leaves are still verified
    sums = json.loads((ckpt / "checksums.json").read_text())
    sums["text.blocks.mlp.fc1.kernel"] = "0" * 64
    (ckpt / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(CheckpointError, match=r"differ from checksums\.json \(text\.blocks\.mlp\.fc1\.kernel\)"):
        load_clip(ckpt)


def test_unknown_format_version_says_how_to_reconvert(saved, tmp_path):
    ckpt = _copy(saved[0], tmp_path / "future")
    write_config(ckpt, saved[2], 3)
    with pytest.raises(CheckpointError, match=r"future: checkpoint format_version 3 .*re-convert the original "
                                              r"weights with this version: `fiseclip-jax convert SRC --out DIR"):
        load_clip(ckpt)


# ---------------------------------------------------------------- random weights
def test_random_weights_follow_the_module_initialisers():
    """init_clip (numpy draws) against flax's own CLIP.init: same tree, and per leaf the same
    distribution: zeros, ones, the logit-scale constant, or N(0, 0.02²)."""
    from fiseclip_jax.clip.model import CLIP

    cfg = get_config("tiny")
    params, _, _ = resolve_weights("random:tiny", seed=7)
    init = jax.jit(CLIP(cfg).init)  # one compile, not one per op
    ref = init(jax.random.key(7, impl="rbg"), np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 5), np.int32))
    ref = ref["params"]
    assert jax.tree.structure(params) == jax.tree.structure(ref)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref)):
        x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32, name
        if np.all(y == y.flat[0]):  # a constant initialiser: zeros, ones, log(1/0.07)
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert abs(x.std() - 0.02) < 0.2 * 0.02 + 4 * 0.02 / np.sqrt(x.size), name
            assert abs(y.std() - 0.02) < 0.2 * 0.02 + 4 * 0.02 / np.sqrt(y.size), name
            assert abs(x.mean()) < 4 * 0.02 / np.sqrt(x.size), name
    big = np.asarray(params["text"]["token_embed"]).ravel()  # 1.6M draws: a sharp check of N(0, 0.02²)
    assert abs(big.std() - 0.02) < 1e-4 and abs(big.mean()) < 1e-4
    np.testing.assert_allclose(np.mean(np.abs(big) < 0.02), 0.6827, atol=2e-3)
    assert float(params["logit_scale"]) == pytest.approx(np.log(1 / 0.07))
