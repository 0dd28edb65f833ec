"""`fiseclip-jax report RESULTS_DIR`: (re)build report.html of an evaluate run from its files.

RESULTS_DIR is the --out of `evaluate`, or its OUT/<method>/<dataset> folder (the one holding
results.json); the page is written beside results.json. Works on interrupted runs too (the
categories that finished)."""

from __future__ import annotations

from ..html_report import find_results, write_report


def cmd_report(args) -> int:
    base = find_results(args.results_dir)
    path = write_report(base)
    print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="write report.html (curves, histogram, confusion counts, gallery) "
                       "of an evaluate results folder")
    r.add_argument("results_dir", help="the --out of evaluate, or its OUT/<method>/<dataset> folder")
    r.set_defaults(func=cmd_report)
