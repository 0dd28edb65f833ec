"""Images/s of our jitted `encode_image` vs transformers' PyTorch CLIPVisionModelWithProjection.

Same random weights, same CPU, one process, batch 8 by default:

    python benchmarks/encoder.py                       # ViT-B/16@224, ViT-L/14@336 at 336 and 518
    python benchmarks/encoder.py --cases ViT-B/16@224 --repeats 3

Prints one row per case: JAX images/s, PyTorch images/s, their ratio, and the max
abs difference of the image embeddings (a parity check on real-sized models).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

DEFAULT_CASES = ("ViT-B/16@224", "ViT-L/14@336@336", "ViT-L/14@336@518")


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


def time_it(fn, repeats):
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), help="PRESET@SIZE, e.g. ViT-B/16@224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up; the best is kept")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="JAX computation dtype")
    args = ap.parse_args(argv)

    import torch

    from fiseclip_jax import encode_image

    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({args.dtype}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), batch {args.batch}, best of {args.repeats}")
    print(f"{'case':<22}{'jax img/s':>11}{'torch img/s':>13}{'jax/torch':>11}{'max|Δ| embeds':>15}")
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

        tj = time_it(run_jax, args.repeats)
        tt = time_it(run_torch, args.repeats)
        diff = np.abs(np.asarray(run_jax()) - run_torch().numpy()).max()
        print(f"{case:<22}{args.batch / tj:>11.2f}{args.batch / tt:>13.2f}{tt / tj:>11.2f}{diff:>15.2e}", flush=True)
        del params, vision


if __name__ == "__main__":
    main()
