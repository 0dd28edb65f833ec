"""`fiseclip-jax`: a thin command line over the library API.

    fiseclip-jax convert SRC --out DIR [--arch NAME] [--act quick_gelu|gelu]
    fiseclip-jax detect DIR --class-name NAME --method fiseclip|musc|anoclip|anoclip+
                        --weights DIR|HUB_ID|random:PRESET [--size S] [--batch-size B] --out OUT
    fiseclip-jax evaluate --dataset mvtec|visa|folder --root PATH ... (see `evaluate --help`)
"""

from __future__ import annotations

import argparse
import sys

RANDOM_BANNER = """\
!!! ------------------------------------------------------------------------ !!!
!!! RANDOM WEIGHTS ({spec}): scores and maps are MEANINGLESS.                 
!!! This run only checks that the pipeline works. For real detection pass     
!!! --weights openai/clip-vit-large-patch14-336 (or a directory made by        
!!! `fiseclip-jax convert`).                                                   
!!! ------------------------------------------------------------------------ !!!"""


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("fiseclip", "musc", "anoclip", "anoclip+"), default="fiseclip")
    p.add_argument("--weights", required=True,
                   help="a directory made by `convert`, a Hugging Face id (e.g. openai/clip-vit-large-patch14-336), "
                        "or random:PRESET (e.g. random:ViT-B/16) for smoke tests only")
    p.add_argument("--size", type=int, default=None,
                   help="input side S (divisible by the patch size); default: the weights' native size")
    p.add_argument("--batch-size", type=int, default=None,
                   help="FiSeCLIP: images per matching batch (0 = whole category; default 16); "
                        "others: images per forward pass (default 8)")
    p.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                   help="MuSc only: override the activation (gelu reproduces MuSc's published runs, SPEC §8)")
    p.add_argument("--seed", type=int, default=0, help="seed for random: weights and the test-time adapter")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cache folder ($FISECLIP_CACHE, default ~/.cache/fiseclip_jax): "
                        "text features and compiled programs are recomputed")
    p.add_argument("--devices", type=int, default=None,
                   help="split batches over N devices (a JAX mesh; matching passes references around "
                        "the device ring); default: one device")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host job first (jax.distributed.initialize, configured by the "
                        "cluster environment); --devices then counts devices of all hosts")


def make_run_mesh(args):
    """The mesh the CLI flags ask for, or None."""
    if args.distributed:
        from .distributed import initialize_distributed

        initialize_distributed()
    if args.devices is None and not args.distributed:
        return None
    from .distributed import make_mesh

    return make_mesh(args.devices)


def method_config(method: str, batch_size: int | None, act: str | None, seed: int = 0):
    """The library config a CLI method name stands for."""
    from .methods.configs import AnoCLIPConfig, FiSeCLIPConfig, MuScConfig

    if method == "fiseclip":
        return FiSeCLIPConfig() if batch_size is None else FiSeCLIPConfig(batch_size=batch_size)
    if method == "musc":
        return MuScConfig(act=act)
    if method == "anoclip":
        return AnoCLIPConfig()
    if method == "anoclip+":
        from .tta import TTAConfig

        return AnoCLIPConfig(tta=TTAConfig(seed=seed))
    raise ValueError(f"unknown method {method!r}")


def load_weights(spec: str, seed: int = 0):
    from .clip.checkpoint import resolve_weights

    params, cfg, is_random = resolve_weights(spec, seed=seed)
    if is_random:
        print(RANDOM_BANNER.format(spec=spec), file=sys.stderr)
    return params, cfg, is_random


def cmd_convert(args) -> int:
    from .clip.convert import convert_clip

    _, cfg = convert_clip(args.src, args.out, arch=args.arch, act=args.act, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.out} ({cfg.name}, act={cfg.act})")
    return 0


def cmd_detect(args) -> int:
    from .runner import run_detect

    mesh = make_run_mesh(args)
    params, cfg, is_random = load_weights(args.weights, args.seed)
    config = method_config(args.method, args.batch_size, args.act, args.seed)
    out = run_detect(params, cfg, args.dir, config, class_name=args.class_name, out=args.out,
                     size=args.size, encode_batch=args.batch_size or 8, progress=not args.no_progress,
                     random_weights=is_random, weights=args.weights, seed=args.seed, mesh=mesh)
    if is_random:
        print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
    print(f"wrote {out / 'scores.csv'} and overlays in {out / 'overlays'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fiseclip-jax", description="Zero-shot industrial anomaly detection with CLIP, "
                                 "in JAX: FiSeCLIP, AnoCLIP(+), MuSc.")
    sub = ap.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert CLIP weights (Hugging Face dir, OpenAI .pt, OpenCLIP) to a JAX checkpoint")
    c.add_argument("src", help="Hugging Face CLIP directory, OpenAI .pt, or OpenCLIP .pt/.bin/.safetensors")
    c.add_argument("--out", required=True, help="output directory (orbax checkpoint + config.json)")
    c.add_argument("--arch", default=None, help="preset name to check the weights against (e.g. ViT-L/14@336)")
    c.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                   help="MLP activation when the source does not say it (OpenCLIP state dicts)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("detect", help="score every image of a folder and draw its anomaly map")
    d.add_argument("dir", help="folder of images of one product (sub-folders are read too)")
    d.add_argument("--class-name", default=None, help="product name for the prompts (default: the folder name)")
    _add_method_args(d)
    d.add_argument("--out", required=True, help="output folder: scores.csv, overlays/, run.json")
    d.set_defaults(func=cmd_detect)

    try:
        from .evaluate_cli import add_evaluate_parser
    except ImportError:  # evaluation lands with its own issue
        pass
    else:
        add_evaluate_parser(sub, _add_method_args)
    return ap


def configure_caches(args) -> None:
    """Text features and compiled XLA programs persist in the cache folder unless --no-cache.

    The XLA cache pays on CPU too: warm README job (benchmarks/startup.py, 2 cores) compiles
    in 3-5 s instead of 21 s, at no measurable cost to the first run."""
    from . import cache

    cache.set_enabled(not getattr(args, "no_cache", False))
    if cache.enabled():
        cache.enable_compilation_cache()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_caches(args)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one readable line, no traceback
        print(f"fiseclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
