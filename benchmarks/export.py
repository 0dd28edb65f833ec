"""Exported detector vs the live one: export time, artifact size, load time, per-image latency (issue 16).

    PYTHONPATH=. python benchmarks/export.py                       # ViT-B/16 @ 224, AnoCLIP, random weights
    PYTHONPATH=. python benchmarks/export.py --weights random:tiny --size 32 --reps 20   # a quick smoke run

Random weights: timings and sizes only (the scores are meaningless). One process; the exported program
(`load_exported(...).run`) and the live `detect` are called alternately on the same preprocessed batch, after
one warm-up call each (its time, compilation included, is printed as "first call"); medians of --reps calls.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import fiseclip_jax as fj
from fiseclip_jax import methods
from fiseclip_jax.export import export_detector, load_exported


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clock(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="random:ViT-B/16")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--method", default="anoclip", choices=("anoclip", "anoclip+"))
    ap.add_argument("--batch", type=int, default=1, help="images per call for the latency rows")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--platforms", default="cpu,cuda,tpu")
    a = ap.parse_args()

    params, cfg, _ = fj.resolve_weights(a.weights)
    method = methods.get(a.method)
    text = fj.text_features_full(params, cfg, "bottle", method.prompts)  # encoded once, outside the timings
    tmp = Path(tempfile.mkdtemp(prefix="fiseclip-export-bench-"))
    try:
        t0 = time.perf_counter()
        record = export_detector(params, cfg, method, out=tmp / "exp", class_name="bottle", size=a.size,
                                 platforms=a.platforms, text=text)
        export_s = time.perf_counter() - t0
        program = (tmp / "exp" / "program.bin").stat().st_size
        arrays = dir_bytes(tmp / "exp" / "arrays")
        params_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
        t0 = time.perf_counter()
        detector = load_exported(tmp / "exp")
        load_s = time.perf_counter() - t0

        pixels = np.random.RandomState(0).randn(a.batch, a.size, a.size, 3).astype(np.float32)
        exported = lambda: detector.run(pixels)[0]  # noqa: E731
        live = lambda: fj.detect(params, cfg, pixels, text, method)  # noqa: E731
        first_exp, first_live = clock(exported), clock(live)
        diff = np.abs(np.asarray(exported().anomaly_maps) - np.asarray(live().anomaly_maps)).max()
        t_exp, t_live = [], []
        for _ in range(a.reps):
            t_exp.append(clock(exported))
            t_live.append(clock(live))
        m_exp, m_live = statistics.median(t_exp), statistics.median(t_live)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{a.method} {a.weights} @ {a.size}, platforms {a.platforms}, backend {jax.default_backend()}, "
          f"jax {jax.__version__} (random weights: timings only)")
    print(f"export: {export_s:.2f} s in all ({record['export_seconds']:.2f} s lowering + serializing)")
    print(f"artifact: program.bin {program / 1e6:.3f} MB, arrays/ {arrays / 1e6:.1f} MB "
          f"(the parameters in memory: {params_bytes / 1e6:.1f} MB)")
    print(f"load_exported: {load_s:.2f} s")
    print(f"first call (compilation included): exported {first_exp:.2f} s, live {first_live:.2f} s")
    print(f"per call of {a.batch} image(s), median of {a.reps}: exported {m_exp * 1e3:.1f} ms, live "
          f"{m_live * 1e3:.1f} ms, ratio exported/live {m_exp / m_live:.3f}; per image exported "
          f"{m_exp / a.batch * 1e3:.1f} ms, live {m_live / a.batch * 1e3:.1f} ms")
    print(f"max |map difference| exported vs live: {diff:.2e}")


if __name__ == "__main__":
    main()
