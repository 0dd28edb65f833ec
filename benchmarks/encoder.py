"""Images/s of our jitted `encode_image` vs transformers' PyTorch CLIPVisionModelWithProjection.

Same random weights, same CPU, one process, batch 8 by default:

    python benchmarks/encoder.py                       # ViT-B/16 at 224, 512; ViT-L/14@336 at 336, 518
    python benchmarks/encoder.py --cases ViT-B/16@224 --repeats 3
    python benchmarks/encoder.py --batch 2 --dtype bfloat16
    python benchmarks/encoder.py --pass-rows 0         # the whole batch in one pass (no CPU passes)

Prints one row per case: JAX images/s, PyTorch images/s, their ratio, and the max
abs difference of the image embeddings (a parity check on real-sized models). The
ratio is followed by "(cpu)", the same ratio of process CPU times (all threads),
which moves less than wall time when other jobs share the cores.

The timed runs are interleaved (JAX, PyTorch, JAX, ...) and the best of
each is kept: on a CPU shared with other jobs this compares like with like.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

DEFAULT_CASES = ("ViT-B/16@224", "ViT-B/16@512", "ViT-L/14@336@336", "ViT-L/14@336@518")


def parse_case(case: str):
    preset, _, size = case.rpartition("@")
    return preset, int(size)


def build(preset: str):
    import torch
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    from fiseclip_jax.clip.config import get_config
    from fiseclip_jax.clip.params import from_hf_state_dict

    cfg = get_config(preset)
    torch.manual_seed(0)
    full = CLIPModel(cfg.to_hf_config()).eval()
    params = jax.tree.map(jax.numpy.asarray, from_hf_state_dict(full.state_dict(), cfg))
    vision = CLIPVisionModelWithProjection(full.config.vision_config).eval()
    sd = {k: v for k, v in full.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    vision.load_state_dict(sd, strict=True)
    del full
    return cfg, params, vision


def best_times(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall and process-CPU times of each function over `repeats` interleaved rounds.

    One warm-up each first (compilation for JAX). CPU time sums all threads of the
    process; it moves less than wall time when other jobs share the cores.
    """
    for fn in fns.values():
        fn()
    wall = {name: float("inf") for name in fns}
    cpu = dict(wall)
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return wall, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="PRESET@SIZE, e.g. ViT-B/16@224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the best is kept")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX computation dtype")
    ap.add_argument("--pass-rows", type=int, default=None,
                    help="token rows per pass of the vision transformer on CPU (model.CPU_PASS_ROWS, default "
                         "the library's); 0 = the whole batch in one pass")
    args = ap.parse_args(argv)

    import torch

    from fiseclip_jax.clip import model

    if args.pass_rows is not None:
        model.CPU_PASS_ROWS = args.pass_rows or 1 << 62

    from fiseclip_jax import encode_image

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({args.dtype}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), batch {args.batch}, best of {args.repeats}, "
          f"CPU passes of <= {model.CPU_PASS_ROWS} token rows")
    header = f"{'case':<22}{'passes':>7}{'jax img/s':>11}{'torch img/s':>13}{'jax/torch':>11}{'(cpu)':>7}"
    print(header + f"{'max|Δ| embeds':>15}")
    for case in args.cases:
        preset, size = parse_case(case)
        cfg, params, vision = build(preset)
        cfg = cfg.replace(dtype=args.dtype)
        pixels = np.random.RandomState(0).randn(args.batch, size, size, 3).astype(np.float32)
        tp = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

        def run_jax():
            return encode_image(params, cfg, pixels)["image_embeds"].block_until_ready()

        def run_torch():
            with torch.inference_mode():
                return vision(pixel_values=tp, interpolate_pos_encoding=True).image_embeds

        fns = {"jax": run_jax, "torch": run_torch}
        wall, cpu = best_times(fns, args.repeats)
        tj, tt = wall["jax"], wall["torch"]
        diff = np.abs(np.asarray(run_jax()) - run_torch().numpy()).max()
        per = model.images_per_pass(args.batch, 1 + (size // cfg.vision.patch_size) ** 2)
        row = f"{case:<22}{f'{args.batch // per}x{per}':>7}{args.batch / tj:>11.2f}{args.batch / tt:>13.2f}{tt / tj:>11.2f}{cpu['torch'] / cpu['jax']:>7.2f}"
        print(row + f"{diff:>15.2e}", flush=True)
        del params, vision


if __name__ == "__main__":
    main()
