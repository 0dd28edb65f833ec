"""`fiseclip-jax evaluate`: a thin command over `evaluate.evaluate`.

    fiseclip-jax evaluate --dataset mvtec|visa|folder --root PATH [--category C ...] [--masks DIR]
                          --method fiseclip|musc|anoclip|anoclip+ --weights SPEC [--size S]
                          [--protocol musc-paper|anoclip-paper] [--aupro exact|legacy]
                          [--mask-rule resize|strict|nonzero] [--metric-resolution input|original]
                          [--image-ap average_precision|pr_auc] [--resample bicubic|bilinear]
                          [--set KEY=VALUE ...] [--config FILE] [--cache DIR]
                          [--fpr F] [--gallery K] [--overwrite | --resume] [--strict] --out OUT

Writes results tables, per category thresholds.json (for `detect --thresholds`), and report.html.
"""

from __future__ import annotations

import sys

from .. import protocols
from ..errors import FiseclipError
from ..evaluate import evaluate, plan_evaluate
from ..outputs import WRITE_LOCK, Status
from .common import (RANDOM_BANNER, add_method_args, add_override_args, count, feature_cache_from_args, load_weights,
                     make_run_mesh, method_from_args, run_interruptible, speaker)

_MASK_RULES = {"resize": "resize>0.5", "strict": "strict", "nonzero": "resize>0"}


def run_settings(args, protocol) -> dict:
    """evaluate()'s settings: the protocol's, then every flag given explicitly on top."""
    settings = protocol.settings() if protocol else {}
    explicit = {"size": args.size, "resample": args.resample, "aupro": args.aupro,
                "mask_rule": _MASK_RULES.get(args.mask_rule), "metric_resolution": args.metric_resolution,
                "image_ap": args.image_ap}
    settings.update({k: v for k, v in explicit.items() if v is not None})
    return settings


def cmd_evaluate(args) -> int:
    if not 0.0 <= args.fpr <= 1.0:
        raise FiseclipError(f"--fpr must be between 0 and 1, got {args.fpr}")
    say = speaker(args.no_progress)
    # Everything is checked before the weights load: the dataset's files, --out, the options.
    protocol = protocols.get(args.protocol, args.dataset) if args.protocol else None
    method = method_from_args(args, protocol)  # bad --set / --config fail before the weights load
    feature_cache = feature_cache_from_args(args)
    plan = plan_evaluate(args.dataset, args.root, method, out=args.out, categories=args.category, masks=args.masks,
                         overwrite=args.overwrite, resume=args.resume, strict=args.strict)
    n_images = sum(len(c) for c in plan.categories)
    say(f"{len(plan.categories)} categor{'y' if len(plan.categories) == 1 else 'ies'}, {n_images} images; "
        f"results in {plan.base}")
    mesh = make_run_mesh(args)
    status = Status(total=len(plan.categories))

    def work() -> int:
        params, cfg, is_random = load_weights(args.weights, args.seed, say, dtype=args.dtype)
        if protocol is not None and cfg.name != protocol.weights:
            print(f"fiseclip-jax evaluate: warning: protocol {protocol.name} is defined for {protocol.weights} "
                  f"weights; these are {cfg.name}", file=sys.stderr)
        settings = run_settings(args, protocol)
        results = evaluate(params, cfg, args.dataset, args.root, method, out=args.out, masks=args.masks,
                           overlays_per_category=args.overlays, progress=not args.no_progress,
                           weights=args.weights, seed=args.seed, encode_batch=args.batch_size or 8, mesh=mesh,
                           fpr=args.fpr, gallery=args.gallery, plan=plan, status=status, say=say,
                           feature_cache=feature_cache,
                           **{"size": None, **settings})
        base = plan.base
        print((base / "results.md").read_text(), end="")
        print(f"\nwrote {base}/results.md, results.csv, results.json, run.json, report.html and one folder per "
              "category (metrics.json, scores.csv, thresholds.json, overlays/, gallery/)")
        if is_random:
            print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
        skipped = sum(c.get("n_unreadable", 0) for c in results["categories"].values())
        if skipped:
            print(f"fiseclip-jax evaluate: {skipped} image(s) could not be read and were left out of the metrics "
                  f"(each category's metrics.json lists them)", file=sys.stderr)
            return 1
        return 0

    return run_interruptible(work, lambda: f"fiseclip-jax evaluate: interrupted after {status.done} of "
                             f"{status.total} categories (results.* and run.json list those); rerun with --resume "
                             "to finish", WRITE_LOCK)


def add_evaluation_args(e) -> None:
    """How a run is scored (`evaluate`, `sweep`): --protocol and the metric variants."""
    e.add_argument("--protocol", choices=protocols.names(), default=None,
                   help="a published protocol (README: reproducing the papers): sets the method options, "
                        "size, resize filter, mask rule, AUPRO and image-AP variants for --dataset; "
                        "flags given explicitly win")
    e.add_argument("--aupro", choices=("exact", "legacy"), default=None,
                   help="exact (default, SPEC §6) or the legacy 200-threshold variant of published tables")
    e.add_argument("--mask-rule", choices=tuple(_MASK_RULES), default=None,
                   help="masks resized to the map size then > 0.5 (default), strict: only fully white pixels, "
                        "nonzero: any pixel > 0")
    e.add_argument("--metric-resolution", choices=("input", "original"), default=None,
                   help="pixel metrics at the map's size (input, default) or each image's original size")
    e.add_argument("--image-ap", choices=("average_precision", "pr_auc"), default=None,
                   help="image_AP as average precision (default) or AnoVL's auc(recall, precision)")
    e.add_argument("--resample", choices=("bicubic", "bilinear"), default=None,
                   help="preprocessing resize filter (default bicubic; AnoVL: bilinear)")


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
    add_override_args(e)
    add_evaluation_args(e)
    e.add_argument("--overlays", type=int, default=4, help="overlay pictures per category (default 4)")
    e.add_argument("--fpr", type=float, default=0.01,
                   help="thresholds.json: also the threshold that flags at most this share of the good images "
                        "(and of the normal pixels) (default 0.01)")
    e.add_argument("--gallery", type=count(0), default=4,
                   help="report.html: worst cases shown per category, of each kind (highest-scored good, "
                        "lowest-scored defective; default 4)")
    e.add_argument("--resume", action="store_true",
                   help="finish an interrupted run: skip categories already finished in OUT with the same configuration")
    e.add_argument("--overwrite", action="store_true",
                   help="clear OUT/<method>/<dataset> first (without it, or --resume, a non-empty one is refused)")
    e.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: leave it out of the metrics and go on)")
    e.add_argument("--out", required=True, help="output root: OUT/<method>/<dataset>/...")
    e.set_defaults(func=cmd_evaluate)
