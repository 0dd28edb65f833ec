"""GFLOP/s of the encoder's dense layers: a jitted float32 matmul in JAX vs PyTorch, same shapes, same process.

    python benchmarks/gemm.py                       # ViT-B/16 at 512 (T=1025) and ViT-L/14 at 518 (T=1370), batch 8
    python benchmarks/gemm.py --batch 2 --repeats 5

Rows are the projections of one residual block, [B*T, in] @ [in, out]: q/k/v/out (in = out = W),
fc1 (W -> 4W) and fc2 (4W -> W). At these sequence lengths they are ~80 % of the encoder's
floating-point work, so their speed bounds `benchmarks/encoder.py`'s ratio from above whatever the
attention does. JAX runs the product as `x @ w` under `jax.jit` (XLA:CPU picks the kernel: YNNPACK
by default in jaxlib 0.10); PyTorch as `torch.nn.functional.linear` with the weight stored [out, in],
as transformers' `nn.Linear` holds it. Timed runs are interleaved (JAX, PyTorch, JAX, ...), best of
`--repeats` each.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import best_times  # noqa: E402  (the interleaved best-of timer)

CASES = {"ViT-B/16@512": (1025, 768), "ViT-L/14@518": (1370, 1024)}  # tokens, width


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, batch {args.batch}, best of {args.repeats}")
    print(f"{'case':<14}{'layer':<8}{'shape':<22}{'jax GFLOP/s':>12}{'torch GFLOP/s':>15}{'jax/torch':>11}")
    rng = np.random.default_rng(0)
    matmul = jax.jit(lambda x, w: x @ w)
    for case in args.cases:
        tokens, width = CASES[case]
        rows = args.batch * tokens
        for layer, (k, n) in (("q/k/v", (width, width)), ("fc1", (width, 4 * width)), ("fc2", (4 * width, width))):
            x = rng.standard_normal((rows, k), np.float32)
            w = rng.standard_normal((k, n), np.float32)
            jx, jw = jnp.asarray(x), jnp.asarray(w)
            tx, tw = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(w.T))
            wall, _ = best_times({"jax": lambda: matmul(jx, jw).block_until_ready(),
                                  "torch": lambda: torch.nn.functional.linear(tx, tw)}, args.repeats)
            gflop = 2 * rows * k * n / 1e9
            print(f"{case:<14}{layer:<8}{f'{rows}x{k} @ {k}x{n}':<22}{gflop / wall['jax']:>12.0f}"
                  f"{gflop / wall['torch']:>15.0f}{wall['torch'] / wall['jax']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
