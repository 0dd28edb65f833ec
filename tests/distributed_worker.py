"""Checks of `fiseclip_jax.distributed` that need several (forced host) devices.

Run by tests/test_distributed.py in a fresh interpreter, because XLA_FLAGS must be set
before jax is imported:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/distributed_worker.py spmd
    python tests/distributed_worker.py process PORT PROCESS_ID OUT_DIR   # one of two processes

`spmd` compares every sharded result on meshes of 4 and 8 devices (and a 2×2 mesh) with
the single-device functions. `process` joins a 2-process run on 127.0.0.1 and writes the
ring scores over the global 4-device mesh to OUT_DIR (process 0).
"""

from __future__ import annotations

import sys
import warnings

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

TOL = 1e-5


def ring_case(seed, n, p=9, c=6, masks=True):
    """Features with a fully filtered reference, sparse allowed patches and padding rows."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, p, c)).astype(np.float32)
    if not masks:
        return z, None, None
    allowed = rng.random((n, p)) < 0.4
    allowed[1] = False  # a reference whose every patch is filtered: skipped
    valid = np.ones(n, bool)
    valid[-2:] = False  # padding rows
    return z, allowed, valid


def random_params(cfg, seed):
    """Every leaf N(0, 0.1²) in numpy: far quicker than init_clip's eager ops, same on every process."""
    from fiseclip_jax.clip.modeling import param_shapes

    leaves, tree = jax.tree.flatten(param_shapes(cfg))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [(0.1 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves])


def encoder_case():
    """Tiny random CLIP and 6 images (a multiple of neither 4 nor 8 devices)."""
    from fiseclip_jax.clip.config import get_config

    cfg = get_config("tiny")
    pixels = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
    return cfg, random_params(cfg, 0), pixels


def assert_close(got, want, what, tol=TOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= tol, f"{what}: max |Δ| {err:.3g} > {tol}"


def check_ring(meshes):
    from fiseclip_jax.distributed import ring_mutual_scores_jit
    from fiseclip_jax.matching import mutual_scores_jit

    cases = ((7, True, 0.3), (8, True, 0.5), (13, False, 0.3))
    for mesh in meshes:
        for n, masks, alpha in cases if len(mesh.axis_names) == 1 else cases[:1]:  # 2-D mesh: one case
            z, allowed, valid = ring_case(n, n, masks=masks)
            want = mutual_scores_jit(z, allowed, valid, alpha=alpha, chunk_size=3)
            got = ring_mutual_scores_jit(z, allowed, valid, mesh=mesh, alpha=alpha, chunk_size=2)
            what = f"ring mesh={dict(mesh.shape)} n={n} masks={masks}"
            np.testing.assert_array_equal(np.asarray(got.num_refs), np.asarray(want.num_refs), what)
            assert_close(got.scores, want.scores, what)
    # Inputs committed to one device are moved onto the mesh (jit alone would refuse them).
    z, allowed, valid = jax.device_put(ring_case(8, 8), jax.devices()[0])
    got = ring_mutual_scores_jit(z, allowed, valid, mesh=meshes[0], chunk_size=2)
    assert_close(got.scores, mutual_scores_jit(z, allowed, valid).scores, "ring, committed inputs")


def check_encoder(mesh4, mesh8):
    from fiseclip_jax.detect import _encode_jit
    from fiseclip_jax.distributed import replicate, sharded_encode_features
    from fiseclip_jax.methods import AnoCLIPConfig, FiSeCLIPConfig

    cfg, params, pixels = encoder_case()
    fiseclip, anoclip = FiSeCLIPConfig(), AnoCLIPConfig(views=True)
    want = {c: _encode_jit(params, cfg, pixels, c) for c in (fiseclip, anoclip)}
    # FiSeCLIP (tokens, local, cls) on both meshes; AnoCLIP's per-view CLS [B, V, D] on one.
    for config, mesh in ((fiseclip, mesh4), (fiseclip, mesh8), (anoclip, mesh4)):
        what = f"encode {config.name} mesh={dict(mesh.shape)}"
        got = sharded_encode_features(replicate(params, mesh), cfg, pixels, config, mesh)
        assert set(got) == set(want[config]), what
        for k in got:
            assert_close(got[k], want[config][k], f"{what} {k}")
    # Padded output: 6 images -> 8 rows still split over the mesh, the last two marked invalid.
    committed = jax.device_put(params, jax.devices()[0])  # not replicated: copied onto the mesh
    padded, valid = sharded_encode_features(committed, cfg, pixels, fiseclip, mesh8, return_valid=True)
    np.testing.assert_array_equal(np.asarray(valid), np.arange(8) < 6)
    assert padded["tokens"].shape[0] == 8 and padded["tokens"].sharding.spec[0] is not None
    assert_close(np.asarray(padded["tokens"])[:6], want[fiseclip]["tokens"], "encode padded")


def check_detect_category(mesh):
    from fiseclip_jax.clip.config import get_config
    from fiseclip_jax.detect import detect_category
    from fiseclip_jax.methods import FiSeCLIPConfig, MuScConfig

    cfg = get_config("tiny")
    params = jax.device_put(random_params(cfg, 1), jax.devices()[0])  # committed, as from load_clip
    rng = np.random.default_rng(1)  # six noisy copies of one texture, image 2 with a foreign square
    images = np.clip(rng.integers(0, 256, size=(40, 40, 3)) + rng.integers(-20, 21, size=(6, 40, 40, 3)), 0, 255)
    images[2, 8:24, 8:24] = rng.integers(0, 256, size=(16, 16, 3))
    images = list(images.astype(np.uint8))
    text = jax.device_put(np.random.default_rng(2).normal(size=(2, cfg.embed_dim)).astype(np.float32),
                          jax.devices()[0])
    # MuSc: whole category on the ring; FiSeCLIP batch 4 of 6: two ring batches, one padded, with
    # text-filtered references (some images keep none). tau = 1: at CLIP's 100 the tiny random
    # model's CLS softmax saturates and the batch min-max would amplify float rounding.
    # MuSc with k_list=(1,): RsCIN over six copies of one texture would rank near-identical CLS
    # embeddings by float rounding (a top-k near-tie flips a neighbour and moves a score by ~6e-3);
    # RsCIN runs on gathered scores, the same function with or without a mesh.
    for config in (MuScConfig(layers=(2, 4), r_list=(1, 3), k_list=(1,)),
                   FiSeCLIPConfig(layers=(4,), r_list=(1,), batch_size=4, tau=1.0)):
        kw = dict(size=32, encode_batch=4, text=text, progress=False)
        with warnings.catch_warnings():  # "no reference image" is expected here
            warnings.simplefilter("ignore", UserWarning)
            want = detect_category(params, cfg, images, "thing", config, **kw)
            got = detect_category(params, cfg, images, "thing", config, mesh=mesh, **kw)
        what = f"detect_category {config.name} mesh={dict(mesh.shape)}"
        np.testing.assert_array_equal(got.num_refs, want.num_refs, what)
        # FiSeCLIP's fused map min-max normalises the matching scores over the batch: the ring's other
        # summation order (~1e-7) is divided by their spread, which lands near 1e-5 (1.2e-5 seen).
        assert_close(got.anomaly_maps, want.anomaly_maps, what, tol=TOL if config.name == "musc" else 5e-5)
        # Image scores are min-max normalised over the category/batch (RsCIN, FiSeCLIP step 7):
        # dividing by a raw-score spread of ~0.1 magnifies the maps' 1e-7 rounding tenfold or more;
        # FiSeCLIP normalises twice (fused map, then image score): 1.2e-4 seen.
        assert_close(got.image_scores, want.image_scores, what, tol=1e-4 if config.name == "musc" else 5e-4)


def check_detect(mesh):
    """`detect(..., mesh=)` on a batch that does not divide the mesh equals plain `detect`."""
    from fiseclip_jax.clip.config import get_config
    from fiseclip_jax.detect import detect
    from fiseclip_jax.methods import AnoCLIPConfig, FiSeCLIPConfig

    cfg = get_config("tiny")
    params = random_params(cfg, 3)
    pixels = np.random.default_rng(3).normal(size=(6, 32, 32, 3)).astype(np.float32)
    text = np.random.default_rng(4).normal(size=(2, cfg.embed_dim)).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 1, 0], bool)
    for config in (FiSeCLIPConfig(layers=(2, 4), r_list=(1, 3), tau=1.0), AnoCLIPConfig()):
        want = detect(params, cfg, pixels, text, config, valid)
        got = detect(params, cfg, pixels, text, config, valid, mesh=mesh)
        what = f"detect {config.name} mesh={dict(mesh.shape)}"
        np.testing.assert_array_equal(np.asarray(got.num_refs), np.asarray(want.num_refs), what)
        assert_close(np.asarray(got.anomaly_maps), np.asarray(want.anomaly_maps), what)
        assert_close(np.asarray(got.image_scores), np.asarray(want.image_scores), what, tol=1e-4)


def spmd():
    from jax.sharding import Mesh

    from fiseclip_jax.distributed import make_mesh

    assert jax.device_count() >= 8, f"need 8 forced host devices, got {jax.device_count()}"
    meshes = [make_mesh(4), make_mesh(8), Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("host", "local"))]
    check_ring(meshes)
    check_encoder(*meshes[:2])
    check_detect_category(meshes[0])
    check_detect(meshes[0])
    print("SPMD-OK")


def process(port: int, process_id: int, out_dir: str):
    from pathlib import Path

    from fiseclip_jax.distributed import (initialize_distributed, make_mesh, pad_batch, replicate,
                                          ring_mutual_scores_jit, shard_batch, sharded_encode_features, to_host)
    from fiseclip_jax.methods import FiSeCLIPConfig

    initialize_distributed(f"127.0.0.1:{port}", 2, process_id, initialization_timeout=30,
                           heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh()
    z, allowed, valid = ring_case(7, 7)  # the same global inputs on every process
    # Global arrays need a multiple of the devices: pad by hand (padded rows invalid).
    z, allowed, valid = (pad_batch(x, mesh.size)[0] for x in (z, allowed, valid))
    got = ring_mutual_scores_jit(*shard_batch((z, allowed, valid), mesh), mesh=mesh, chunk_size=2)
    scores, num_refs = to_host((got.scores, got.num_refs))
    # Sharded encoding across the two processes: parameters replicated from host copies.
    cfg, params, pixels = encoder_case()
    tokens = to_host(sharded_encode_features(replicate(params, mesh), cfg, pixels, FiSeCLIPConfig(), mesh)["tokens"])
    if process_id == 0:
        np.savez(Path(out_dir) / "process0.npz", scores=scores, num_refs=num_refs, tokens=tokens)
    jax.distributed.shutdown()
    print(f"PROCESS-{process_id}-OK")


if __name__ == "__main__":
    if sys.argv[1] == "spmd":
        spmd()
    else:
        process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
