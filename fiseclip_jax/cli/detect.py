"""`fiseclip-jax detect DIR --method M --weights W [--size S] [--set KEY=VALUE ...] [--config FILE] [--cache DIR]
... --out OUT`: a folder in, scores and maps out.

`fiseclip-jax detect DIR --bank BANK --out OUT [--fpr F | --threshold X]`: each image scored against a
reference bank (method, weights and size come from the bank), with a decision column.

`--thresholds CAT/thresholds.json [--threshold-rule f1|fpr]` (from `evaluate`), `--threshold X` or
`--pixel-threshold X`: a decision column, and for a pixel threshold a defect mask per image in masks/.

`fiseclip-jax detect DIR --exported EXPORT_DIR --out OUT`: the images scored by an exported program
(`fiseclip-jax export`; method, weights, size, class name and bank come from the export)."""

from __future__ import annotations

import sys

from ..detect import few_images_message
from ..errors import FiseclipError
from ..export import load_exported, read_export_json
from ..outputs import WRITE_LOCK, Status
from ..runner import THRESHOLD_RULES, plan_detect, read_thresholds, run_detect
from .common import (RANDOM_BANNER, add_decision_args, add_method_args, add_override_args, feature_cache_from_args,
                     load_with_bank, make_run_mesh, method_from_args, read_bank_args, run_interruptible, speaker)


# Options an export fixes (its method, weights, size, class name and bank were chosen when it was made).
FIXED_BY_EXPORT = ("method", "weights", "size", "class_name", "bank", "act", "batch_size", "devices", "distributed",
                   "set", "config", "cache")


def cmd_detect(args) -> int:
    if args.exported:
        return cmd_detect_exported(args)
    say = speaker(args.no_progress)
    # Everything is checked before the weights load: the bank, the folder, --out, the options.
    record = read_bank_args(args)
    if record is not None and args.thresholds:
        raise FiseclipError("--thresholds holds thresholds of zero-shot scores; with --bank use --fpr or --threshold")
    thresholds = read_thresholds(args.thresholds, args.threshold_rule) if args.thresholds else None
    if record is not None and (args.devices or args.distributed):
        raise FiseclipError("--bank scores each image on its own against the bank: --devices is not supported")
    if record is not None and (args.set or args.config or args.cache):
        raise FiseclipError("--bank: the method and its options are the bank's; --set, --config and --cache "
                            "do not apply")
    if args.cache and (args.devices or args.distributed):
        raise FiseclipError("--cache runs on one device: drop --devices or --cache")
    method = method_from_args(args)  # bad --set / --config fail before anything is read
    feature_cache = feature_cache_from_args(args)
    plan = plan_detect(args.dir, args.out, class_name=args.class_name, overwrite=args.overwrite,
                       resume=args.resume, strict=args.strict)
    if record is not None:
        plan.class_name, plan.class_name_source = record["class_name"], "the bank"
    say(f"{len(plan.category)} images in {plan.folder}; class name {plan.class_name!r} "
        f"(from {plan.class_name_source})")
    if record is None and len(plan.category) < method.min_images:
        raise FiseclipError(few_images_message(method, len(plan.category), plan.class_name))
    mesh = make_run_mesh(args) if record is None else None
    status = Status(total=len(plan.category))

    def work() -> int:
        params, cfg, is_random, bank = load_with_bank(args, record, say)
        weights = args.weights or (record or {}).get("weights", "")
        record_ = run_detect(params, cfg, plan.folder, method, out=plan.out, size=args.size,
                             encode_batch=args.batch_size or 8, progress=not args.no_progress,
                             random_weights=is_random, weights=weights, seed=args.seed, mesh=mesh, plan=plan,
                             status=status, say=say, bank=bank, threshold=args.threshold, fpr=args.fpr,
                             thresholds=thresholds, pixel_threshold=args.pixel_threshold,
                             feature_cache=feature_cache)
        if is_random:
            print(RANDOM_BANNER.format(spec=weights), file=sys.stderr)
        return _report(record_, plan.out)

    return run_interruptible(work, lambda: f"fiseclip-jax detect: interrupted after {status.done} of {status.total} "
                             f"images; rerun with --resume to finish", WRITE_LOCK)


def _report(record_: dict, out) -> int:
    decided = ""
    if "decision" in record_:
        decided = f"; decisions at threshold {record_['decision']['threshold']:.6f}"
    masks = ""
    if "pixel_threshold" in record_:
        masks = f", defect masks (map > {record_['pixel_threshold']['threshold']:.6f}) in {out / 'masks'}"
    print(f"wrote {out / 'scores.csv'} ({record_['num_scored']} of {record_['num_images']} images scored"
          f"{decided}), overlays in {out / 'overlays'}{masks} and {out / 'run.json'}")
    if record_["errors"]:
        print(f"fiseclip-jax detect: {len(record_['errors'])} image(s) could not be read and have no score "
              f"(the error column of {out / 'scores.csv'} says why)", file=sys.stderr)
        return 1
    return 0


def cmd_detect_exported(args) -> int:
    say = speaker(args.no_progress)
    given = [f"--{name.replace('_', '-')}" for name in FIXED_BY_EXPORT if getattr(args, name, None)]
    if given:
        raise FiseclipError(f"{', '.join(given)}: the export {args.exported} fixes method, weights, size, class "
                            "name and bank; drop the option(s) or export again")
    record = read_export_json(args.exported)  # before any image is read
    thresholds = read_thresholds(args.thresholds, args.threshold_rule) if args.thresholds else None
    plan = plan_detect(args.dir, args.out, class_name=record["class_name"], overwrite=args.overwrite,
                       resume=args.resume, strict=args.strict)
    plan.class_name_source = "the export"
    say(f"{len(plan.category)} images in {plan.folder}; class name {plan.class_name!r} (from the export)")
    status = Status(total=len(plan.category))

    def work() -> int:
        say(f"loading the exported program {args.exported}")
        exported = load_exported(args.exported)
        if exported.record["random_weights"]:
            print(RANDOM_BANNER.format(spec=exported.record["weights"]), file=sys.stderr)
        record_ = run_detect(None, None, plan.folder, None, out=plan.out, encode_batch=8,
                             progress=not args.no_progress, seed=args.seed, plan=plan, status=status, say=say,
                             threshold=args.threshold, fpr=args.fpr, exported=exported, thresholds=thresholds,
                             pixel_threshold=args.pixel_threshold)
        return _report(record_, plan.out)

    return run_interruptible(work, lambda: f"fiseclip-jax detect: interrupted after {status.done} of {status.total} "
                             f"images; rerun with --resume to finish", WRITE_LOCK)


def add_parser(sub) -> None:
    d = sub.add_parser("detect", help="score every image of a folder and draw its anomaly map")
    d.add_argument("dir", help="folder of images of one product (sub-folders are read too)")
    d.add_argument("--class-name", default=None,
                   help="product name for the prompts (default: from the folder path; MVTec bottle/test -> bottle)")
    add_method_args(d, weights_required=False)
    add_override_args(d)
    d.add_argument("--bank", default=None,
                   help="a reference bank (`bank build`): each image is scored against it alone and gets a decision")
    d.add_argument("--exported", default=None, metavar="EXPORT_DIR",
                   help="score with an exported program (`fiseclip-jax export`): method, weights, size, class "
                        "name and bank are the export's")
    add_decision_args(d)
    d.add_argument("--thresholds", default=None, metavar="THRESHOLDS_JSON",
                   help="a category's thresholds.json from `evaluate` (same method and size): its image threshold "
                        "gives the decision column, its pixel threshold a defect mask per image (masks/)")
    d.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="f1",
                   help="which thresholds of --thresholds: f1 (F1-optimal, default) or fpr (at most evaluate's "
                        "--fpr share of good images / normal pixels flagged)")
    d.add_argument("--pixel-threshold", type=float, default=None,
                   help="defect masks: white where the anomaly map is above this (overrides --thresholds')")
    d.add_argument("--out", required=True, help="output folder: scores.csv, overlays/, masks/, run.json")
    d.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    d.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (same options)")
    d.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: give it an error row and go on)")
    d.set_defaults(func=cmd_detect)
