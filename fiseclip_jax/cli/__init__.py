"""`fiseclip-jax`: a thin command line over the library API, one module per command.

    fiseclip-jax convert SRC --out DIR [--arch NAME] [--act quick_gelu|gelu]
    fiseclip-jax detect DIR --class-name NAME --method fiseclip|musc|anoclip|anoclip+
                        --weights DIR|HUB_ID|random:PRESET [--size S] [--batch-size B] --out OUT
    fiseclip-jax evaluate --dataset mvtec|visa|folder --root PATH ... (see `evaluate --help`)
"""

from __future__ import annotations

import argparse
import sys

from . import convert, detect, evaluate

COMMANDS = (convert, detect, evaluate)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fiseclip-jax", description="Zero-shot industrial anomaly detection with CLIP, "
                                 "in JAX: FiSeCLIP, AnoCLIP(+), MuSc.")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # user errors: one readable line, no traceback
        print(f"fiseclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


