"""Attention alone: `clip.attention.attend` vs the plain formula vs PyTorch's SDPA.

    python benchmarks/attention.py                       # the token counts of the encoder cases
    python benchmarks/attention.py --shapes 2x1025x12 --repeats 8
    python benchmarks/attention.py --shapes 2x1025x12 --knobs block_bytes=2097152 key_chunk=128

Shapes are BATCHxTOKENSxHEADS (head_dim 64): 8x197x12 is ViT-B/16@224, 2x1025x12
ViT-B/16@512, 2x577x16 ViT-L/14@336, 2x1370x16 ViT-L/14@518. Rows:

  attend   `attend(q, k, v, scale=...)` with the given --knobs
  plain    softmax(q kᵀ s) v over [B, H, T, d] as modeling.py wrote it before `attend`
  torch    torch.nn.functional.scaled_dot_product_attention (a fused CPU kernel)

Runs are interleaved and the best of each kept; besides wall time, the process CPU
time (all threads) is reported, which moves less when other jobs share the CPU.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from encoder import best_times  # interleaved best-of timing, shared with the encoder benchmark

jax.config.update("jax_default_matmul_precision", "float32")

DEFAULT_SHAPES = ("8x197x12", "8x257x16", "2x577x16", "2x1025x12", "2x1370x16")


def plain(a, b, v, scale):
    """The formula as written: [B, T, H, d] -> heads first, softmax, back."""
    a, b, v = (x.transpose(0, 2, 1, 3) for x in (a, b, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", a, b) * scale
    return (jax.nn.softmax(logits, axis=-1) @ v).transpose(0, 2, 1, 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="BATCHxTOKENSxHEADS")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--knobs", nargs="*", default=[], help="attend keyword=int, e.g. block_bytes=2097152")
    args = ap.parse_args(argv)

    import torch

    from fiseclip_jax.clip.attention import attend

    torch.set_num_threads(os.cpu_count())
    knobs = {k: int(v) for k, v in (kv.split("=") for kv in args.knobs)}
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"head_dim 64, best of {args.repeats}, knobs {knobs or 'default'}")
    print(f"{'shape':<12}{'row':<8}{'wall ms':>9}{'cpu ms':>9}{'torch/row wall':>16}{'torch/row cpu':>15}{'max|Δ|':>10}")
    for shape in args.shapes:
        batch, tokens, heads = map(int, shape.split("x"))
        rng = np.random.RandomState(0)
        q, k, v = (rng.randn(batch, tokens, heads, 64).astype(np.float32) for _ in range(3))
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
        qj, kj, vj = (jnp.asarray(x) for x in (q, k, v))
        ours = jax.jit(functools.partial(attend, scale=0.125, **knobs))
        base = jax.jit(functools.partial(plain, scale=0.125))

        def run_torch():
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

        fns = {"attend": lambda: ours(qj, kj, vj).block_until_ready(),
               "plain": lambda: base(qj, kj, vj).block_until_ready(),
               "torch": run_torch}
        wall, cpu = best_times(fns, args.repeats)
        ref = run_torch().numpy()
        for name in fns:
            diff = np.abs(np.asarray(fns[name]()) - ref).max()
            print(f"{shape:<12}{name:<8}{wall[name] * 1e3:>9.1f}{cpu[name] * 1e3:>9.1f}"
                  f"{wall['torch'] / wall[name]:>16.2f}{cpu['torch'] / cpu[name]:>15.2f}{diff:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
