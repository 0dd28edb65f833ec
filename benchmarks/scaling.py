"""Scaling of the ring matching core and of the sharded pipeline over 1, 2, 4, 8 devices.

    python benchmarks/scaling.py                                  # CPU: 8 forced host devices
    python benchmarks/scaling.py --images 32 --pipeline-images 16 --devices 1 2 4 8
    python benchmarks/scaling.py --skip-pipeline

On CPU the script sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before importing
jax unless XLA_FLAGS is already set. Forced host devices share the machine's cores, so on
CPU the table shows the ring's overhead, not a speed-up; on a machine with several GPUs
the same command times real devices.

Rows:
  core      `ring_mutual_scores` on random unit features [N, P, C] (ViT-B/16@224: P 196,
            C 768), whole set, against `matching.mutual_scores` on one device.
  pipeline  `sharded_encode_features` + `score_features` with the ring, for MuSc (whole set)
            and FiSeCLIP (batch = the whole set), random ViT-B/16 weights at 224.
"""

from __future__ import annotations

import os

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def random_params(cfg, seed: int = 0):
    """N(0, 0.02²) leaves, LayerNorm scales 1: sane activations, no eager init_clip."""
    from fiseclip_jax.clip.modeling import param_shapes

    rng = np.random.default_rng(seed)

    def leaf(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(x.shape, np.float32)
        return (0.02 * rng.standard_normal(x.shape, np.float32)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg))


def core_rows(args, counts):
    from fiseclip_jax.distributed import make_mesh, ring_mutual_scores_jit
    from fiseclip_jax.matching import mutual_scores_jit

    rng = np.random.default_rng(0)
    z = rng.standard_normal((args.images, args.patches, args.dim), np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    z = jax.device_put(z, jax.devices()[0])
    base = best_time(lambda: mutual_scores_jit(z, chunk_size=args.chunk), args.repeats)
    yield "core", "mutual_scores", 1, base, base
    want = np.asarray(mutual_scores_jit(z, chunk_size=args.chunk).scores)
    for d in counts:
        mesh = make_mesh(d)
        fn = lambda: ring_mutual_scores_jit(z, mesh=mesh, chunk_size=args.chunk)  # noqa: E731
        t = best_time(fn, args.repeats)
        err = np.abs(np.asarray(fn().scores) - want).max()
        assert err < 1e-4, f"ring on {d} devices differs from mutual_scores by {err}"
        yield "core", "ring", d, t, base


def pipeline_rows(args, counts):
    from fiseclip_jax.clip.config import get_config
    from fiseclip_jax.detect import _score_jit
    from fiseclip_jax.distributed import make_mesh, replicate, sharded_encode_features
    from fiseclip_jax.methods import FiSeCLIPConfig, MuScConfig
    from fiseclip_jax.prompts import TextFeatures

    cfg = get_config(args.preset)
    params = random_params(cfg)
    n, size = args.pipeline_images, args.size
    pixels = np.random.default_rng(1).standard_normal((n, size, size, 3), np.float32)
    text = np.random.default_rng(2).standard_normal((2, cfg.embed_dim), np.float32)
    empty = np.zeros((0, cfg.embed_dim), np.float32)
    for config in (MuScConfig(chunk_size=args.chunk), FiSeCLIPConfig(batch_size=0, chunk_size=args.chunk)):
        base = None
        for d in counts:
            mesh = make_mesh(d)
            rep, txt = replicate((params, TextFeatures(text, empty, empty)), mesh)

            def run():
                feats, valid = sharded_encode_features(rep, cfg, pixels, config, mesh, return_valid=True)
                return _score_jit(feats, txt, valid, config, size, mesh)

            t = best_time(run, args.pipeline_repeats)
            base = t if base is None else base
            yield "pipeline", config.name, d, t, base
            del rep, txt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--images", type=int, default=32, help="N for the matching core")
    ap.add_argument("--patches", type=int, default=196)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=4, help="reference images per matching step")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the best is kept")
    ap.add_argument("--preset", default="ViT-B/16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pipeline-images", type=int, default=8)
    ap.add_argument("--pipeline-repeats", type=int, default=1)
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args(argv)

    available = jax.device_count()
    counts = [d for d in args.devices if d <= available]
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {available} {dev.platform} device(s) ({dev.device_kind}), "
          f"{os.cpu_count()} CPU cores; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if dev.platform == "cpu":
        print("note: forced host devices share the CPU cores: the rows measure overhead, not speed-up")
    print(f"core: N {args.images}, P {args.patches}, C {args.dim}, chunk {args.chunk}, best of {args.repeats}; "
          f"pipeline: {args.preset}@{args.size} random weights, N {args.pipeline_images}, "
          f"best of {args.pipeline_repeats}")
    print(f"{'stage':<10}{'method':<15}{'devices':>8}{'seconds':>10}{'img/s':>9}{'vs 1 dev':>10}")
    rows = core_rows(args, counts)
    if not args.skip_pipeline:
        rows = itertools.chain(rows, pipeline_rows(args, counts))
    for stage, method, d, t, base in rows:
        n = args.images if stage == "core" else args.pipeline_images
        print(f"{stage:<10}{method:<15}{d:>8}{t:>10.3f}{n / t:>9.2f}{base / t:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
