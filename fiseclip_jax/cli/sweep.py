"""`fiseclip-jax sweep`: a grid of method options over a dataset, each image encoded once per distinct encoding.

    fiseclip-jax sweep --dataset mvtec|visa|folder --root PATH [--category C ...] [--masks DIR]
                       --method M --weights SPEC [--size S] --grid KEY=V1,V2 [--grid ...]
                       [--set KEY=VALUE ...] [--config FILE] [--cache DIR] [--sort pixel_AUROC] --out OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import protocols
from ..errors import FiseclipError
from ..evaluate import list_categories
from ..sweep import SORT_KEYS, grid_points, parse_grid, sweep
from .common import (RANDOM_BANNER, add_method_args, add_override_args, feature_cache_from_args, load_weights,
                     method_from_args, speaker)
from .evaluate import add_evaluation_args, run_settings


def cmd_sweep(args) -> int:
    say = speaker(args.no_progress)
    if args.devices or args.distributed:
        raise FiseclipError("sweep runs on one device (its feature cache does): drop --devices")
    list_categories(args.dataset, args.root, args.category, args.masks)  # bad paths fail before the weights load
    protocol = protocols.get(args.protocol, args.dataset) if args.protocol else None
    method = method_from_args(args, protocol)
    grid = parse_grid(args.grid)
    points = grid_points(method, grid)  # every grid value checked before the weights load
    feature_cache = feature_cache_from_args(args)
    params, cfg, is_random = load_weights(args.weights, args.seed, say, dtype=args.dtype)
    rows = sweep(params, cfg, args.dataset, args.root, method, grid, out=args.out, categories=args.category,
                 masks=args.masks, cache=feature_cache, sort=args.sort, progress=not args.no_progress,
                 weights=args.weights, seed=args.seed, encode_batch=args.batch_size or 8, say=say,
                 **{"size": None, **run_settings(args, protocol)})
    print((Path(args.out) / "ablation.md").read_text(), end="")
    out = Path(args.out)
    print(f"\nwrote {out / 'ablation.md'}, ablation.csv, run.json and rows/<row>/run.json "
          f"({len(rows)} of {len(points)} configurations)")
    if is_random:
        print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("sweep", help="evaluate a grid of method options, encoding each image once per distinct "
                       "encoding (ablation.csv / ablation.md; resumable)")
    s.add_argument("--dataset", choices=("mvtec", "visa", "folder"), required=True)
    s.add_argument("--root", required=True, help="dataset root, as for evaluate")
    s.add_argument("--category", nargs="+", action="extend", default=None,
                   help="categories to run (default: all found); a row's metrics are their mean")
    s.add_argument("--masks", default=None, help="folder dataset only: ground-truth masks folder")
    add_method_args(s)
    add_override_args(s, cache_help="; default: a temporary cache under OUT/.features, removed when the sweep "
                                    "completes")
    s.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2",
                   help="values of one field to sweep (repeatable: the product of the grids); alternatives "
                        "separated by ',' or, for tuple fields, ';' (layers=3,6,9,12;6,12)")
    s.add_argument("--sort", choices=SORT_KEYS, default="pixel_AUROC",
                   help="the table's order: this metric, best first (default pixel_AUROC; seconds: fastest first)")
    add_evaluation_args(s)
    s.add_argument("--out", required=True,
                   help="output folder: ablation.csv, ablation.md, run.json, rows/<row>/run.json; a rerun "
                        "skips the rows already finished there")
    s.set_defaults(func=cmd_sweep, resume=False, overlays=0)
