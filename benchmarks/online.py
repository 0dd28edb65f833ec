"""Online inspection: per-image latency and bank memory against K and M, a 500-image stream, and the cost of
re-scoring a sliding window as a batch (what a user must do without a bank). Random weights: timings only.

    python benchmarks/online.py                      # every table (CPU: about 15 minutes)
    python benchmarks/online.py --skip-large         # no ViT-L/14@518 rows
    python benchmarks/online.py --quick              # the tiny model's stream and window tables only
    python benchmarks/online.py --ks --large-ks --skip-lnamd --vit-windows --stream 0   # coreset rows only

Tables
  1. ViT-B/16 @ 224, FiSeCLIP: one image against exact banks of K = 8, 32, 128 images and coreset banks of
     M = 256, 1024, 4096 patch features per (r, layer): ms per image (encode + match + score, B = 1, after
     compilation, median of --reps), bank memory (its arrays), compile seconds.
  2. ViT-L/14@336 at 518 (37x37 patches): the same rows. On a CPU the whole pipeline is too slow to repeat,
     so the encoder is timed once alone and the matching runs on synthetic LNAMD features of that geometry;
     their sum is the per-image figure. On a GPU (--full-large) the whole pipeline is timed.
  3. Storing LNAMD features vs applying LNAMD to the bank on the fly (why the bank stores them).
  4. A 500-image stream (tiny model, FiSeCLIP, exact bank K = 16, gated updates): latency per 100 images.
  5. Sliding window: scoring each new image by batch FiSeCLIP over it and its W predecessors, vs the bank.

Banks for the timing rows are built from 2 images and then filled to K slots (or M entries) with random
features: the computation does not depend on the values, and a leave-one-out over 128 ViT images would
take most of an hour on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import fiseclip_jax as fj
from fiseclip_jax.bank import bank_from_features
from fiseclip_jax.bank.match import exact_scores, coreset_scores, lnamd_stack

METHOD = fj.FiSeCLIPConfig()


def block(x):
    return jax.block_until_ready(x)


def timed(fn, reps):
    """(median seconds of `reps` calls, seconds of the first call: compilation included)."""
    t0 = time.perf_counter()
    block(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def nbytes(tree) -> int:
    return sum(int(np.prod(np.shape(a))) * jnp.asarray(a).dtype.itemsize for a in jax.tree.leaves(tree))


def synthetic_feats(cfg, size, n, seed=0):
    """What METHOD.encode returns for n images, random (shapes only matter)."""
    p = (size // cfg.vision.patch_size) ** 2
    rng = np.random.default_rng(seed)
    n_layers = len(fj.default_match_layers(cfg.vision.layers))
    return {"tokens": rng.normal(size=(n, n_layers, p, cfg.vision.width)).astype(np.float32),
            "local": rng.normal(size=(n, p, cfg.embed_dim)).astype(np.float32),
            "cls": rng.normal(size=(n, cfg.embed_dim)).astype(np.float32)}


_SMALL: dict = {}


def filled_bank(cfg, size, k, m=None, seed=0):
    """A bank built from 2 random images (the method's statistics, the pytree's structure), then filled to k
    slots (exact) or to m memory entries and k slots (coreset) with random unit features."""
    mode = "exact" if m is None else "coreset"
    text = jnp.asarray(np.random.default_rng(seed).normal(size=(2, cfg.embed_dim)), jnp.float32)
    if (cfg.name, size, mode) not in _SMALL:
        _SMALL[cfg.name, size, mode] = bank_from_features(synthetic_feats(cfg, size, 2, seed), text, METHOD, cfg=cfg,
                                                          size=size, fingerprint="synthetic", mode=mode, budget=1)
    small = _SMALL[cfg.name, size, mode]
    key = jax.random.key(seed)

    def unit(shape):
        x = jax.random.normal(key, shape, jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    common = dict(cls=jax.random.normal(key, (k, cfg.embed_dim)), valid=jnp.ones(k, bool),
                  ids=jnp.arange(k, dtype=jnp.int32), count=jnp.asarray(k, jnp.int32),
                  calib={name: jnp.resize(v, (k,)) for name, v in small.calib.items()})
    n_r, n_l = small.features.shape[:2]
    p, w = (size // cfg.vision.patch_size) ** 2, cfg.vision.width
    if mode == "exact":
        return small.replace(features=unit((n_r, n_l, k, p, w)), allowed=jnp.ones((k, p), bool), **common), text
    return small.replace(features=unit((n_r, n_l, m, w)), allowed=jnp.ones((n_r, n_l, m), bool),
                         source=jnp.zeros((n_r, n_l, m), jnp.int32), **common), text


def latency_table(preset, size, ks, ms, reps, encode_only=False):
    cfg = fj.get_config(preset)
    params = fj.init_clip(cfg, jax.random.key(0))
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, size, size, 3)), jnp.float32)
    p = (size // cfg.vision.patch_size) ** 2
    print(f"\n{preset} at {size} ({p} patches, width {cfg.vision.width}), FiSeCLIP, one image at a time")
    print(f"{'bank':<22}{'ms/image':>10}{'memory MiB':>12}{'compile s':>11}")
    enc = jax.jit(lambda prm, x: METHOD.encode(prm, cfg, x))
    sec, first = timed(lambda: enc(params, pixels), reps)
    print(f"{'(encoder alone)':<22}{1e3 * sec:>10.1f}{'':>12}{first - sec:>11.1f}", flush=True)
    rows = [(f"exact K={k}", dict(k=k)) for k in ks] + [(f"coreset M={m} (K=32)", dict(k=32, m=m)) for m in ms]
    for name, kw in rows:
        bank, text = filled_bank(cfg, size, **kw)
        fn = lambda: fj.detect_with_bank(params, cfg, bank, pixels, text, METHOD)  # noqa: E731
        sec, first = timed(fn, reps)
        print(f"{name:<22}{1e3 * sec:>10.1f}{nbytes(bank) / 2 ** 20:>12.1f}{first - sec:>11.1f}", flush=True)


def large_geometry(ks, ms, reps):
    """ViT-L/14@336 at 518 on a CPU: the encoder once, and the matching on synthetic LNAMD features."""
    cfg, size = fj.get_config("ViT-L/14@336"), 518
    p, w = (size // 14) ** 2, cfg.vision.width
    n_r, n_l = len(METHOD.r_list), 4
    params = fj.init_clip(cfg, jax.random.key(0))
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, size, size, 3)), jnp.float32)
    enc = jax.jit(lambda prm, x: METHOD.encode(prm, cfg, x))
    enc_s, enc_first = timed(lambda: enc(params, pixels), 1)
    print(f"\nViT-L/14@336 at 518 ({p} patches, width {w}): encoder alone {1e3 * enc_s:.0f} ms/image "
          f"(compile {enc_first - enc_s:.0f} s); matching on synthetic features of this geometry:")
    print(f"{'bank':<22}{'match ms':>10}{'match+encode':>14}{'memory MiB':>12}")
    key = jax.random.key(0)
    z = jax.random.normal(key, (1, n_r, n_l, p, w), jnp.float32)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    for k in ks:
        mem = n_r * n_l * k * p * w * 4 + k * p + k * cfg.embed_dim * 4
        bank_z = jax.random.normal(key, (n_r, n_l, k, p, w), jnp.float32)
        match = jax.jit(lambda q, b: exact_scores(q, b, jnp.ones((k, p), bool), jnp.ones(k, bool), jnp.ones(1, bool),
                                                  alpha=0.3, chunk_size=4))
        sec, _ = timed(lambda: match(z, bank_z), reps)
        print(f"{'exact K=' + str(k):<22}{1e3 * sec:>10.0f}{1e3 * (sec + enc_s):>14.0f}{mem / 2 ** 20:>12.0f}",
              flush=True)
    for m in ms:
        memory = jax.random.normal(key, (n_r, n_l, m, w), jnp.float32)
        ok, src = jnp.ones((n_r, n_l, m), bool), jnp.zeros((n_r, n_l, m), jnp.int32)
        match = jax.jit(lambda q, mm: coreset_scores(q, mm, ok, src, jnp.full((1,), -1), jnp.full((1,), 32),
                                                     jnp.ones(1, bool), chunk_size=4))
        sec, _ = timed(lambda: match(z, memory), reps)
        mem = n_r * n_l * m * (w * 4 + 5) + 32 * cfg.embed_dim * 4
        print(f"{'coreset M=' + str(m):<22}{1e3 * sec:>10.0f}{1e3 * (sec + enc_s):>14.0f}{mem / 2 ** 20:>12.0f}",
              flush=True)


def lnamd_table(reps):
    """Why the bank stores LNAMD features: LNAMD of the bank per query vs the matching itself."""
    print("\nLNAMD stored vs applied to the bank per query (synthetic features, r = 1, 3, 5, 4 layers)")
    print(f"{'geometry':<26}{'match ms':>10}{'LNAMD of bank ms':>18}{'ratio':>7}")
    for name, k, p, w in (("ViT-B/16@224, K=32", 32, 196, 768), ("ViT-L/14@518, K=8", 8, 1369, 1024)):
        key = jax.random.key(0)
        tokens = jax.random.normal(key, (k, 4, p, w), jnp.float32)
        lnamd = jax.jit(lambda t: lnamd_stack(t, (1, 3, 5)))
        bank_z = jnp.moveaxis(lnamd(tokens), 0, 2)
        z = lnamd(tokens[:1])
        match = jax.jit(lambda q, b: exact_scores(q, b, jnp.ones((k, p), bool), jnp.ones(k, bool), jnp.ones(1, bool),
                                                  alpha=0.3, chunk_size=4))
        t_match, _ = timed(lambda: match(z, bank_z), reps)
        t_lnamd, _ = timed(lambda: lnamd(tokens), reps)
        print(f"{name:<26}{1e3 * t_match:>10.0f}{1e3 * t_lnamd:>18.0f}{t_lnamd / t_match:>7.2f}", flush=True)


def stream_images(n, size=40, seed=0):
    """Noisy variants of a few base pictures: a product line of similar images."""
    rng = np.random.default_rng(seed)
    base = (rng.random((4, size, size, 3)) * 255).astype(np.float32)
    return [np.clip(base[i % 4] + rng.normal(0, 8, base.shape[1:]), 0, 255).astype(np.uint8) for i in range(n)]


def stream_table(n, k, windows):
    cfg = fj.get_config("tiny")
    params = fj.init_clip(cfg, jax.random.key(0))
    size = 32
    text = fj.text_features_full(params, cfg, "widget", METHOD.prompts)
    images = stream_images(n + k)
    bank = fj.build_bank(params, cfg, fj.preprocess(images[:k], size), text, METHOD)
    pixels = [jnp.asarray(fj.preprocess([im], size)) for im in images[k:]]
    detect_ms, step_ms, admitted = [], [], 0
    for i, px in enumerate(pixels):
        t0 = time.perf_counter()
        det, feats = fj.detect_with_bank(params, cfg, bank, px, text, METHOD, with_features=True)
        block(det)
        t1 = time.perf_counter()
        accept = fj.gate(bank, feats, 0.5)
        bank = block(fj.update_bank(bank, feats, accept))
        t2 = time.perf_counter()
        admitted += bool(accept[0])
        if i:  # the first call compiles
            detect_ms.append(1e3 * (t1 - t0))
            step_ms.append(1e3 * (t2 - t0))
    print(f"\n{n}-image stream, tiny CLIP at {size}, FiSeCLIP, exact bank K={k}, gated updates "
          f"({admitted} admitted); ms per image after the first (compiling) one")
    print(f"{'images':<12}{'score p50':>10}{'score p95':>10}{'+update p50':>12}{'+update p95':>12}")
    for lo in range(0, len(detect_ms), 100):
        d, s = np.array(detect_ms[lo:lo + 100]), np.array(step_ms[lo:lo + 100])
        print(f"{f'{lo + 2}-{lo + 1 + len(d)}':<12}{np.median(d):>10.1f}{np.percentile(d, 95):>10.1f}"
              f"{np.median(s):>12.1f}{np.percentile(s, 95):>12.1f}", flush=True)
    print(f"\nSliding window vs bank (tiny CLIP at {size}, FiSeCLIP): ms per new image")
    print(f"{'W':>4}{'window batch':>14}{'bank':>8}{'ratio':>7}")
    batch_method = fj.FiSeCLIPConfig(batch_size=0)
    for w in windows:
        wbank = fj.build_bank(params, cfg, fj.preprocess(images[:w], size), text, METHOD)
        win = jnp.asarray(fj.preprocess(images[:w + 1], size))
        t_win, _ = timed(lambda: fj.detect(params, cfg, win, text, batch_method), 5)
        t_bank, _ = timed(lambda: fj.detect_with_bank(params, cfg, wbank, win[-1:], text, METHOD), 5)
        print(f"{w:>4}{1e3 * t_win:>14.1f}{1e3 * t_bank:>8.1f}{t_win / t_bank:>7.1f}", flush=True)


def window_table_vit(windows, reps):
    """The same comparison at ViT-B/16@224: batch FiSeCLIP over W + 1 images vs one image against a K = W bank."""
    cfg = fj.get_config("ViT-B/16")
    params = fj.init_clip(cfg, jax.random.key(0))
    text = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.embed_dim)), jnp.float32)
    print("\nSliding window vs bank (ViT-B/16 at 224, FiSeCLIP): ms per new image")
    print(f"{'W':>4}{'window batch':>14}{'bank':>8}{'ratio':>7}")
    for w in windows:
        bank, _ = filled_bank(cfg, 224, w)
        win = jnp.asarray(np.random.default_rng(2).normal(size=(w + 1, 224, 224, 3)), jnp.float32)
        t_win, _ = timed(lambda: fj.detect(params, cfg, win, text, fj.FiSeCLIPConfig(batch_size=0)), 1)
        t_bank, _ = timed(lambda: fj.detect_with_bank(params, cfg, bank, win[-1:], text, METHOD), reps)
        print(f"{w:>4}{1e3 * t_win:>14.0f}{1e3 * t_bank:>8.0f}{t_win / t_bank:>7.1f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only")
    ap.add_argument("--skip-large", action="store_true", help="no ViT-L/14@518 rows")
    ap.add_argument("--full-large", action="store_true", help="ViT-L/14@518 whole pipeline (a GPU)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ks", type=int, nargs="*", default=[8, 32, 128])
    ap.add_argument("--ms", type=int, nargs="*", default=[256, 1024, 4096])
    ap.add_argument("--large-ks", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--stream", type=int, default=500, help="images in the stream (0: no stream table)")
    ap.add_argument("--windows", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--vit-windows", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--skip-lnamd", action="store_true")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "float32")
    dev = jax.devices()[0]
    print(f"device: {dev.platform} ({dev.device_kind}); {'no GPU: CPU figures' if dev.platform == 'cpu' else ''}")
    if not args.quick:
        latency_table("ViT-B/16", 224, args.ks, args.ms, args.reps)
        if not args.skip_large:
            if args.full_large:
                latency_table("ViT-L/14@336", 518, args.ks, args.ms, args.reps)
            else:
                large_geometry(args.large_ks, args.ms, max(1, args.reps - 2))
        if not args.skip_lnamd:
            lnamd_table(args.reps)
        if args.vit_windows:
            window_table_vit(args.vit_windows, args.reps)
    if args.stream:
        stream_table(args.stream, 16, args.windows)


if __name__ == "__main__":
    main()
