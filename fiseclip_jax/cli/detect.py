"""`fiseclip-jax detect DIR --method M --weights W [--size S] [--set KEY=VALUE ...] [--config FILE] [--cache DIR]
... --out OUT`: a folder in, scores and maps out.

`fiseclip-jax detect DIR --bank BANK --out OUT [--fpr F | --threshold X]`: each image scored against a
reference bank (method, weights and size come from the bank), with a decision column."""

from __future__ import annotations

import sys

from ..detect import few_images_message
from ..errors import FiseclipError
from ..runner import WRITE_LOCK, Status, plan_detect, run_detect
from .common import (RANDOM_BANNER, add_decision_args, add_method_args, add_override_args, feature_cache_from_args,
                     load_with_bank, make_run_mesh, method_from_args, read_bank_args, run_interruptible, speaker)


def cmd_detect(args) -> int:
    say = speaker(args.no_progress)
    # Everything is checked before the weights load: the bank, the folder, --out, the options.
    record = read_bank_args(args)
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
                             feature_cache=feature_cache)
        if is_random:
            print(RANDOM_BANNER.format(spec=weights), file=sys.stderr)
        out = plan.out
        decided = ""
        if "decision" in record_:
            decided = f"; decisions at threshold {record_['decision']['threshold']:.6f}"
        print(f"wrote {out / 'scores.csv'} ({record_['num_scored']} of {record_['num_images']} images scored"
              f"{decided}), overlays in {out / 'overlays'} and {out / 'run.json'}")
        if record_["errors"]:
            print(f"fiseclip-jax detect: {len(record_['errors'])} image(s) could not be read and have no score "
                  f"(the error column of {out / 'scores.csv'} says why)", file=sys.stderr)
            return 1
        return 0

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
    add_decision_args(d)
    d.add_argument("--out", required=True, help="output folder: scores.csv, overlays/, run.json")
    d.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    d.add_argument("--resume", action="store_true", help="finish an interrupted run in --out (same options)")
    d.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image (default: give it an error row and go on)")
    d.set_defaults(func=cmd_detect)
