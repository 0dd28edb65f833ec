"""`fiseclip-jax`: a thin command line over the library API, one module per command.

    fiseclip-jax convert SRC --out DIR [--arch NAME] [--act quick_gelu|gelu]
    fiseclip-jax detect DIR --class-name NAME --method fiseclip|musc|anoclip|anoclip+
                        --weights DIR|HUB_ID|random:PRESET [--size S] [--batch-size B] --out OUT
    fiseclip-jax detect DIR --bank BANK --out OUT [--fpr F | --threshold X]
    fiseclip-jax detect DIR ... --thresholds CAT/thresholds.json [--threshold-rule f1|fpr] [--pixel-threshold X]
    fiseclip-jax evaluate --dataset mvtec|visa|folder --root PATH ... (see `evaluate --help`)
    fiseclip-jax sweep --dataset ... --root PATH --method M --grid KEY=V1,V2 ... --out OUT [--cache DIR]
    fiseclip-jax methods [NAME]           every field --set KEY=VALUE / --config FILE.toml can change
    fiseclip-jax report RESULTS_DIR
    fiseclip-jax bank build GOOD_DIR --class-name C --method fiseclip|musc --weights W [--size S]
                            [--capacity K] [--mode exact|coreset] --out BANK
    fiseclip-jax watch DIR --bank BANK --out OUT [--update none|gated] [--poll SECONDS]
    fiseclip-jax export --method M --weights W [--size S] --class-name C [--bank BANK]
                        [--platforms cpu,cuda,tpu] [--batch N|dynamic] --out DIR
    fiseclip-jax detect DIR --exported EXPORT_DIR --out OUT
"""

from __future__ import annotations

import argparse
import sys
import traceback

from ..errors import FiseclipError
from . import bank, convert, detect, evaluate, export, methods, report, sweep, watch
from .common import configure_caches

COMMANDS = (convert, detect, evaluate, sweep, methods, report, bank, watch, export)
# The library's own errors: bad input, explained in their message. Anything else is a bug.
USER_ERRORS = (FiseclipError, OSError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `fiseclip-jax detect: error: ...`, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="fiseclip-jax", description="Zero-shot industrial anomaly detection with CLIP, "
                "in JAX: FiSeCLIP, AnoCLIP(+), MuSc.")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    configure_caches(args)
    try:
        return args.func(args)
    except USER_ERRORS as e:  # bad input: one readable line, no traceback
        print(f"fiseclip-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fiseclip-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"fiseclip-jax {args.command}: unexpected error (the traceback above is a bug: please report it)",
              file=sys.stderr)
        return 3


