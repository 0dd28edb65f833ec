"""`fiseclip-jax detect DIR --method M --weights W [--size S] ... --out OUT`: a folder in, scores and maps out."""

from __future__ import annotations

import sys

from ..runner import run_detect
from .common import RANDOM_BANNER, add_method_args, load_weights, make_run_mesh, method_from_args


def cmd_detect(args) -> int:
    mesh = make_run_mesh(args)
    params, cfg, is_random = load_weights(args.weights, args.seed)
    method = method_from_args(args)
    out = run_detect(params, cfg, args.dir, method, class_name=args.class_name, out=args.out,
                     size=args.size, encode_batch=args.batch_size or 8, progress=not args.no_progress,
                     random_weights=is_random, weights=args.weights, seed=args.seed, mesh=mesh)
    if is_random:
        print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
    print(f"wrote {out / 'scores.csv'} and overlays in {out / 'overlays'}")
    return 0


def add_parser(sub) -> None:
    d = sub.add_parser("detect", help="score every image of a folder and draw its anomaly map")
    d.add_argument("dir", help="folder of images of one product (sub-folders are read too)")
    d.add_argument("--class-name", default=None, help="product name for the prompts (default: the folder name)")
    add_method_args(d)
    d.add_argument("--out", required=True, help="output folder: scores.csv, overlays/, run.json")
    d.set_defaults(func=cmd_detect)
