"""Text features in the user cache folder (SPEC §3: they depend only on weights, class name
and prompt set): a second run reads them, a bad or foreign entry is recomputed, --no-cache
bypasses the folder. Every test points $FISECLIP_CACHE at its own temporary folder."""

from pathlib import Path

import jax
import numpy as np
import pytest

from fiseclip_jax import cache, get_config, init_clip, prompts, tokenize
from fiseclip_jax.cli import main
from fiseclip_jax.clip.modeling import encode_text
from fiseclip_jax.prompts import PromptSet, text_features_full

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "bottle"
PSET = PromptSet("mine", ("{}", "good {}"), ("bad {}",), ("a photo of a {}.", "the {}."))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh cache folder, an empty in-memory cache, and caching on (restored afterwards)."""
    monkeypatch.setenv("FISECLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prompts, "_CACHE", {})
    monkeypatch.setattr(cache, "_enabled", True)
    return tmp_path / "cache"


@pytest.fixture
def encoded(monkeypatch):
    """Rows (sentences and padding) run through the text tower, one number per call."""
    rows = []

    def counting(params, cfg, ids):
        rows.append(len(ids))
        return encode_text(params, cfg, ids)

    monkeypatch.setattr(prompts, "encode_text", counting)
    return rows


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    return init_clip(cfg, jax.random.key(0)), cfg


def direct_embeddings(params, cfg, sentences):
    """The oracle: every sentence at the full 77-token context, one call."""
    return np.asarray(encode_text(params, cfg, tokenize(sentences)))


def entries(folder):
    return sorted((folder / "text").glob("*.npz"))


def assert_same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_call_reads_the_cache_folder(folder, encoded, tiny):
    params, cfg = tiny
    first = text_features_full(params, cfg, "bottle", PSET)
    assert len(entries(folder)) == 1 and encoded
    normal, abnormal = PSET.sentences("bottle")
    stored = cache.load_arrays("text", prompts._text_cache_key(params, cfg, "bottle", PSET, normal + abnormal))
    np.testing.assert_allclose(stored["embeddings"], direct_embeddings(params, cfg, normal + abnormal), atol=1e-6)

    prompts._CACHE.clear()  # as in a new process
    n = len(encoded)
    second = text_features_full(params, cfg, "bottle", PSET)
    assert len(encoded) == n  # nothing encoded
    assert_same(first, second)
    text_features_full(params, cfg, "cable", PSET)  # another class: another entry
    assert len(entries(folder)) == 2 and len(encoded) > n


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_entry_is_recomputed(folder, encoded, tiny, damage):
    params, cfg = tiny
    first = text_features_full(params, cfg, "bottle", PSET)
    [path] = entries(folder)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x93NUMPY not an npz at all", "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    prompts._CACHE.clear()
    n = len(encoded)
    again = text_features_full(params, cfg, "bottle", PSET)
    assert len(encoded) > n
    assert_same(first, again)
    assert entries(folder) == [path] and path.read_bytes() == data  # rewritten whole


def test_foreign_or_invalid_entry_is_recomputed(folder, encoded, tiny):
    """Same file name, but another key inside, or the right key with arrays that cannot be ours."""
    params, cfg = tiny
    first = text_features_full(params, cfg, "bottle", PSET)
    [path] = entries(folder)
    normal, abnormal = PSET.sentences("bottle")
    key = prompts._text_cache_key(params, cfg, "bottle", PSET, normal + abnormal)
    good = cache.load_arrays("text", key)["embeddings"]
    foreign = dict(key, weights="0" * 64)
    bad = [(foreign, good * 3),                                  # another key's entry under this name
           (key, good[:-1] * 3),                                 # too few sentences
           (key, np.full_like(good, np.nan)),                    # not finite
           (key, (good * 3).astype(np.float64))]                 # not what we write
    for stored_key, emb in bad:
        written = cache.save_arrays("text", stored_key, {"embeddings": emb})
        if written != path:
            written.replace(path)
        prompts._CACHE.clear()
        n = len(encoded)
        again = text_features_full(params, cfg, "bottle", PSET)
        assert len(encoded) > n
        assert_same(first, again)


def test_no_cache_neither_reads_nor_writes(folder, encoded, tiny):
    params, cfg = tiny
    text_features_full(params, cfg, "bottle", PSET, disk_cache=False)
    assert not entries(folder)
    # A valid entry holding other numbers: read when caching is on, ignored when it is off.
    normal, abnormal = PSET.sentences("bottle")
    key = prompts._text_cache_key(params, cfg, "bottle", PSET, normal + abnormal)
    truth = direct_embeddings(params, cfg, normal + abnormal)
    cache.save_arrays("text", key, {"embeddings": -truth})
    cache.set_enabled(False)
    prompts._CACHE.clear()
    off = text_features_full(params, cfg, "bottle", PSET)
    cache.set_enabled(True)
    prompts._CACHE.clear()
    on = text_features_full(params, cfg, "bottle", PSET)
    np.testing.assert_allclose(np.asarray(on.features), -np.asarray(off.features), atol=1e-6)


def test_key_follows_weights_and_architecture(folder, tiny):
    params, cfg = tiny
    fp = cache.tree_fingerprint(params)
    assert cache.tree_fingerprint(jax.tree.map(np.array, params)) == fp  # values, not array objects
    assert cache.tree_fingerprint(init_clip(cfg, jax.random.key(1))) != fp
    for i, leaf in enumerate(jax.tree.leaves(params)):  # one changed value in any leaf, at a sampled place
        flat = np.array(leaf).reshape(-1)
        flat[0] += 1.0
        leaves = jax.tree.leaves(params)
        leaves[i] = flat.reshape(np.shape(leaf))
        assert cache.tree_fingerprint(jax.tree.unflatten(jax.tree.structure(params), leaves)) != fp, i
    assert cache.tree_fingerprint(jax.tree.leaves(params)) != fp  # same leaves, other structure
    sentences = ["a photo of a bottle."]
    key = prompts._text_cache_key(params, cfg, "bottle", PSET, sentences)
    assert prompts._text_cache_key(params, get_config("tiny-gelu"), "bottle", PSET, sentences) != key
    assert prompts._text_cache_key(params, cfg, "bottle", PSET, ["a photo of a bottle"]) != key


def test_fingerprint_samples_large_leaves(tiny):
    big = np.arange(3 * cache.FINGERPRINT_SAMPLES, dtype=np.float32)
    fp = cache.tree_fingerprint({"w": big})
    for place, differs in ((0, True), (big.size - 1, True), (1, False)):  # 1 is between two samples
        changed = big.copy()
        changed[place] = -1
        assert (cache.tree_fingerprint({"w": changed}) != fp) == differs, place


def test_unwritable_cache_warns_once_and_still_answers(folder, tiny, monkeypatch):
    params, cfg = tiny
    folder.parent.mkdir(exist_ok=True)
    folder.write_text("a file where the folder should be")
    monkeypatch.setattr(cache, "_warned", False)
    with pytest.warns(UserWarning, match="cannot write to the cache folder"):
        feats = text_features_full(params, cfg, "bottle", PSET)
    normal, abnormal = PSET.sentences("bottle")
    emb = direct_embeddings(params, cfg, normal + abnormal)
    want = np.stack([emb[: len(normal)].mean(0), emb[len(normal):].mean(0)])
    np.testing.assert_allclose(np.asarray(feats.features), want / np.linalg.norm(want, axis=-1, keepdims=True),
                               atol=1e-5)


@pytest.mark.parametrize("no_cache", [False, True])
def test_cli_second_run_encodes_no_prompt(folder, encoded, tmp_path, monkeypatch, no_cache):
    xla = []
    monkeypatch.setattr(cache, "enable_compilation_cache", lambda: xla.append(1))
    argv = ["detect", str(EXAMPLES), "--method", "fiseclip", "--weights", "random:tiny", "--size", "32",
            "--out", str(tmp_path / "out"), "--no-progress"] + (["--no-cache"] if no_cache else [])
    assert main(argv) == 0
    n = sum(encoded)
    assert n >= 264 and len(entries(folder)) == (0 if no_cache else 1)  # WinCLIP: 264 sentences
    prompts._CACHE.clear()  # as in a new process
    assert main(argv + ["--overwrite"]) == 0
    assert sum(encoded) == (2 * n if no_cache else n)
    assert xla == ([] if no_cache else [1, 1])
