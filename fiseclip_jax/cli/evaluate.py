"""`fiseclip-jax evaluate`: a thin command over `evaluate.evaluate`.

    fiseclip-jax evaluate --dataset mvtec|visa|folder --root PATH [--category C ...] [--masks DIR]
                          --method fiseclip|musc|anoclip|anoclip+ --weights SPEC [--size S]
                          [--aupro exact|legacy] [--mask-rule resize|strict] [--resume] --out OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..evaluate import evaluate, list_categories
from .common import RANDOM_BANNER, add_method_args, load_weights, make_run_mesh, method_from_args


def cmd_evaluate(args) -> int:
    list_categories(args.dataset, args.root, args.category, args.masks)  # bad paths fail before loading weights
    mesh = make_run_mesh(args)
    params, cfg, is_random = load_weights(args.weights, args.seed)
    method = method_from_args(args)
    evaluate(params, cfg, args.dataset, args.root, method, categories=args.category, size=args.size,
             out=args.out, masks=args.masks, resume=args.resume, aupro=args.aupro,
             mask_rule="strict" if args.mask_rule == "strict" else "resize>0.5",
             overlays_per_category=args.overlays, progress=not args.no_progress, weights=args.weights,
             seed=args.seed, encode_batch=args.batch_size or 8, mesh=mesh)
    base = Path(args.out) / method.label / args.dataset
    print((base / "results.md").read_text(), end="")
    print(f"\nwrote {base}/results.md, results.csv, results.json, run.json and one folder per category")
    if is_random:
        print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics of a method on MVTec AD, VisA or a labelled folder "
                       "(anomalib-style tables; resumable)")
    e.add_argument("--dataset", choices=("mvtec", "visa", "folder"), required=True)
    e.add_argument("--root", required=True,
                   help="dataset root (MVTec: folder of categories; VisA: folder with split_csv/; "
                        "folder: the images, sub-folders good/ and <defect>/ give labels)")
    e.add_argument("--category", nargs="+", action="extend", default=None,
                   help="categories to run (default: all found); for a folder: its name in the prompts")
    e.add_argument("--masks", default=None, help="folder dataset only: ground-truth masks folder")
    add_method_args(e)
    e.add_argument("--aupro", choices=("exact", "legacy"), default="exact",
                   help="exact (default, SPEC §6) or the legacy 200-threshold variant of published tables")
    e.add_argument("--mask-rule", choices=("resize", "strict"), default="resize",
                   help="masks resized to the map size then > 0.5 (default), or strict: only fully white pixels")
    e.add_argument("--overlays", type=int, default=4, help="overlay pictures per category (default 4)")
    e.add_argument("--resume", action="store_true",
                   help="skip categories already finished in OUT with the same configuration")
    e.add_argument("--out", required=True, help="output root: OUT/<method>/<dataset>/...")
    e.set_defaults(func=cmd_evaluate)
