"""ms/image of each method, and the matching core's time and memory against N (random weights, CPU).

    python benchmarks/methods.py                        # both tables, default cases
    python benchmarks/methods.py --skip-core --cases ViT-B/16@224 --n-images 16
    python benchmarks/methods.py --skip-methods --core-n 8 16 32 83
    python benchmarks/methods.py --skip-methods --skip-core --tta   # AnoCLIP vs AnoCLIP+, batch 1 vs 16

Method rows: `detect_category` over N synthetic images after one warm-up run of the
same shapes (so compilation is excluded), ms per image. Core rows: one jitted
`mutual_scores` call on [N, P, C] features (P, C as ViT-B/16 at 224 by default),
its wall time and XLA's compiled memory (arguments + outputs + temporaries).
TTA rows (`--tta`): AnoCLIP and AnoCLIP+ through `detect_category` with `encode_batch` 1
and 16 (AnoCLIP+ adapts every image of a batch in parallel under `vmap`), then the adapter
alone (`tta.adapt` on [B, P, D] local tokens); best of two runs after a warm-up.
Scores from random weights mean nothing; only the timings do.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fiseclip_jax import AnoCLIPConfig, FiSeCLIPConfig, MuScConfig, detect_category, get_config, init_clip
from fiseclip_jax.matching import mutual_scores
from fiseclip_jax.methods.tta import TTAConfig, adapt

METHODS = {
    "fiseclip(B=16)": lambda: FiSeCLIPConfig(batch_size=16),
    "fiseclip(B=all)": lambda: FiSeCLIPConfig(batch_size=0),
    "musc": lambda: MuScConfig(),
    "anoclip": lambda: AnoCLIPConfig(),
    "anoclip+": lambda: AnoCLIPConfig(tta=TTAConfig()),
}


def synthetic_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((256, 256, 3)) * 255).astype(np.uint8) for _ in range(n)]


def bench_methods(cases, methods, n_images):
    print(f"\n{'method':<18}{'model@size':<20}{'N':>4}{'s total':>10}{'ms/image':>11}")
    for case in cases:
        preset, _, size = case.rpartition("@")
        cfg = get_config(preset)
        params = init_clip(cfg, jax.random.key(0))
        images = synthetic_images(n_images)
        for name in methods:
            config = METHODS[name]()
            run = lambda: detect_category(params, cfg, images, "bottle", config, size=int(size),  # noqa: E731
                                          progress=False)
            run()  # compile
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            print(f"{name:<18}{case:<20}{n_images:>4}{dt:>10.2f}{1000 * dt / n_images:>11.0f}", flush=True)


def _timed(run, repeats=2):
    """Best of `repeats` runs after a warm-up (compilation excluded; the CPU may be shared)."""
    jax.block_until_ready(run())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - t0)
    return best


def bench_tta(case, batches, n_images):
    """AnoCLIP vs AnoCLIP+ (SPEC §4.5), ms/image at each batch size, and the adapter alone."""
    from fiseclip_jax import text_features_full

    preset, _, size = case.rpartition("@")
    cfg = get_config(preset)
    params = init_clip(cfg, jax.random.key(0))
    images = synthetic_images(n_images)
    print(f"\n{'method':<12}{'model@size':<24}{'N':>4}{'batch':>6}{'s total':>10}{'ms/image':>11}")
    for name in ("anoclip", "anoclip+"):
        config = METHODS[name]()
        for b in batches:
            dt = _timed(lambda: detect_category(params, cfg, images, "bottle", config, size=int(size),  # noqa: B023
                                                encode_batch=b, progress=False))
            print(f"{name:<12}{case:<24}{n_images:>4}{b:>6}{dt:>10.2f}{1000 * dt / n_images:>11.0f}", flush=True)
    text = text_features_full(params, cfg, "bottle", "anoclip")
    p = (int(size) // cfg.vision.patch_size) ** 2
    print(f"\nadapter alone (tta.adapt, text adapter, {text.normal_sentences.shape[0]} sentences per side, "
          f"P={p}, D={cfg.embed_dim}, 5 AdamW steps)")
    print(f"{'batch':>6}{'ms/batch':>10}{'ms/image':>10}")
    for b in batches:
        local = jnp.asarray(np.random.default_rng(b).normal(size=(b, p, cfg.embed_dim)), jnp.float32)
        dt = _timed(lambda: adapt(local, text, TTAConfig(), jax.random.key(0))[0])  # noqa: B023
        print(f"{b:>6}{1000 * dt:>10.0f}{1000 * dt / b:>10.1f}", flush=True)


def bench_core(ns, p, c, chunk):
    print(f"\nmutual_scores, P={p}, C={c}, chunk_size={chunk}")
    print(f"{'N':>5}{'s':>9}{'ms/image':>10}{'XLA memory MiB':>16}{'all-pairs N²P² MiB':>21}")
    f = jax.jit(lambda z: mutual_scores(z, chunk_size=chunk).scores)
    for n in ns:
        z = jnp.asarray(np.random.default_rng(n).normal(size=(n, p, c)).astype(np.float32))
        compiled = f.lower(z).compile()
        mem = compiled.memory_analysis()
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) / 2**20 \
            if mem is not None else float("nan")
        compiled(z).block_until_ready()
        t0 = time.perf_counter()
        compiled(z).block_until_ready()
        dt = time.perf_counter() - t0
        dense = n * n * p * p * 4 / 2**20  # a naive all-pairs distance tensor, for scale
        print(f"{n:>5}{dt:>9.2f}{1000 * dt / n:>10.1f}{total:>16.1f}{dense:>21.0f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["ViT-B/16@224", "ViT-L/14@336@336"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--n-images", type=int, default=16)
    ap.add_argument("--core-n", type=int, nargs="+", default=[8, 16, 32, 83])
    ap.add_argument("--core-p", type=int, default=196, help="patches (196: ViT-B/16@224; 1369: ViT-L/14@518)")
    ap.add_argument("--core-c", type=int, default=768)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--skip-methods", action="store_true")
    ap.add_argument("--skip-core", action="store_true")
    ap.add_argument("--tta", action="store_true", help="AnoCLIP vs AnoCLIP+ at batch sizes --tta-batch")
    ap.add_argument("--tta-case", default="ViT-B-16-plus-240@240")
    ap.add_argument("--tta-batch", type=int, nargs="+", default=[1, 16])
    args = ap.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; random weights")
    if not args.skip_methods:
        bench_methods(args.cases, args.methods, args.n_images)
    if not args.skip_core:
        bench_core(args.core_n, args.core_p, args.core_c, args.chunk)
    if args.tta:
        bench_tta(args.tta_case, args.tta_batch, args.n_images)


if __name__ == "__main__":
    main()
