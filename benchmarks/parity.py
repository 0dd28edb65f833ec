"""Print the max |JAX - PyTorch| of every CLIP stage, same random weights (float32).

    python benchmarks/parity.py                    # tiny, tiny-gelu, ViT-B/16 (224 and 384)
    python benchmarks/parity.py --cases ViT-L/14@336@518
    python benchmarks/parity.py --dtype bfloat16       # bf16 computation against PyTorch float32

The tests assert <= 1e-5; this prints the actual figures. Every LayerNorm and bias is
randomised too (transformers initialises them to identity / zero).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "float32")

DEFAULT = ("tiny@32", "tiny@56", "tiny-gelu@40", "ViT-B/16@224", "ViT-B/16@384")


def main(argv=None):
    import torch
    from transformers import CLIPModel

    from fiseclip_jax import encode_image, encode_text, get_config
    from fiseclip_jax.clip.modeling import embed_image_tokens
    from fiseclip_jax.clip.params import from_hf_state_dict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT), help="PRESET@SIZE")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our computation dtype")
    args = ap.parse_args(argv)
    print(f"{'case':<20}{'embeddings':>12}{'block 1':>10}{'mid block':>11}{'last block':>12}"
          f"{'image emb':>11}{'patch emb':>11}{'text emb':>10}")
    for case in args.cases:
        preset, _, size = case.rpartition("@")
        size = int(size)
        cfg = get_config(preset).replace(dtype=args.dtype)
        torch.manual_seed(0)
        model = CLIPModel(cfg.to_hf_config()).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.05 * torch.randn_like(p))
        params = jax.tree.map(jax.numpy.asarray, from_hf_state_dict(model.state_dict(), cfg))
        x = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
        n = cfg.vision.layers
        layers = (1, n // 2, n)
        with torch.no_grad():
            ref = model.vision_model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2),
                                     output_hidden_states=True, interpolate_pos_encoding=True)
            ref_img = model.visual_projection(ref.pooler_output).numpy()
            ref_patch = model.visual_projection(model.vision_model.post_layernorm(ref.last_hidden_state[:, 1:])).numpy()
            emb = model.vision_model.pre_layrnorm(model.vision_model.embeddings(
                torch.from_numpy(x).permute(0, 3, 1, 2), interpolate_pos_encoding=True)).numpy()
        out = encode_image(params, cfg, x, layers=layers)
        errs = [np.abs(np.asarray(out["block_tokens"][l]) - ref.hidden_states[l].numpy()).max() for l in layers]
        emb_err = np.abs(np.asarray(embed_image_tokens(params, cfg, x)) - emb).max()
        ids = np.zeros((4, cfg.text.context_length), np.int32)
        rng = np.random.RandomState(1)
        for i in range(4):
            k = rng.randint(1, 70)
            ids[i, 0], ids[i, 1:k + 1], ids[i, k + 1] = 49406, rng.randint(1, 49406, k), 49407
        with torch.no_grad():
            t = model.text_projection(model.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output).numpy()
        text_err = np.abs(np.asarray(encode_text(params, cfg, ids)) - t).max()
        print(f"{case:<20}{emb_err:>12.1e}{errs[0]:>10.1e}{errs[1]:>11.1e}{errs[2]:>12.1e}"
              f"{np.abs(np.asarray(out['image_embeds']) - ref_img).max():>11.1e}"
              f"{np.abs(np.asarray(out['patch_embeds']) - ref_patch).max():>11.1e}{text_err:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
