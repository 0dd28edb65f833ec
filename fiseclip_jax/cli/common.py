"""What the commands share: method and weights options, the random-weights banner, the mesh."""

from __future__ import annotations

import argparse
import sys

from .. import methods
from ..clip.checkpoint import resolve_weights
from ..distributed import initialize_distributed, make_mesh

RANDOM_BANNER = """\
!!! ------------------------------------------------------------------------ !!!
!!! RANDOM WEIGHTS ({spec}): scores and maps are MEANINGLESS.                 
!!! This run only checks that the pipeline works. For real detection pass     
!!! --weights openai/clip-vit-large-patch14-336 (or a directory made by        
!!! `fiseclip-jax convert`).                                                   
!!! ------------------------------------------------------------------------ !!!"""


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Options of every command that runs a method (`detect`, `evaluate`)."""
    p.add_argument("--method", choices=methods.names(), default=None,
                   help="default: fiseclip, or the method of --protocol")
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
    p.add_argument("--devices", type=int, default=None,
                   help="split batches over N devices (a JAX mesh; matching passes references around "
                        "the device ring); default: one device")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host job first (jax.distributed.initialize, configured by the "
                        "cluster environment); --devices then counts devices of all hosts")


def make_run_mesh(args):
    """The mesh the CLI flags ask for, or None."""
    if args.distributed:
        initialize_distributed()
    if args.devices is None and not args.distributed:
        return None
    return make_mesh(args.devices)


def method_from_args(args, protocol=None) -> methods.Method:
    """The method config the flags stand for: the registered method (with a protocol's options) and the
    run options it takes; a flag given explicitly wins over the protocol."""
    method = protocol.method_config(args.method) if protocol else methods.get(args.method or "fiseclip")
    return method.with_run_options(batch_size=args.batch_size, act=args.act, seed=args.seed)


def load_weights(spec: str, seed: int = 0):
    """(params, cfg, is_random); random weights are announced loudly."""
    params, cfg, is_random = resolve_weights(spec, seed=seed)
    if is_random:
        print(RANDOM_BANNER.format(spec=spec), file=sys.stderr)
    return params, cfg, is_random
