"""`fiseclip-jax convert SRC --out DIR [--arch PRESET] [--act quick_gelu|gelu] [--overwrite]`."""

from __future__ import annotations

from ..clip.convert import convert_clip


def cmd_convert(args) -> int:
    _, cfg = convert_clip(args.src, args.out, arch=args.arch, act=args.act, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.out} ({cfg.name}, act={cfg.act})")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert CLIP weights (Hugging Face dir, OpenAI .pt, OpenCLIP) to a JAX checkpoint")
    c.add_argument("src", help="Hugging Face CLIP directory, OpenAI .pt, or OpenCLIP .pt/.bin/.safetensors")
    c.add_argument("--out", required=True, help="output directory (orbax checkpoint + config.json)")
    c.add_argument("--arch", default=None, help="preset name to check the weights against (e.g. ViT-L/14@336)")
    c.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                   help="MLP activation when the source does not say it (OpenCLIP state dicts)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.set_defaults(func=cmd_convert)
