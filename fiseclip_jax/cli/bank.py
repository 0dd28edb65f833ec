"""`fiseclip-jax bank build GOOD_DIR --class-name C --method fiseclip|musc --weights W [--size S] [--capacity K]
[--mode exact|coreset] [--budget M] --out BANK` and `fiseclip-jax bank info BANK`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..bank import MODES, check_method, read_bank_json
from ..bank_run import plan_bank_build, run_bank_build
from ..errors import FiseclipError
from ..outputs import WRITE_LOCK, Status
from .common import RANDOM_BANNER, add_method_args, count, load_weights, method_from_args, run_interruptible, speaker


def weights_spec(spec: str) -> str:
    """A weights spec as a bank records it: an existing directory as its absolute path, anything else as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def cmd_build(args) -> int:
    say = speaker(args.no_progress)
    method = method_from_args(args)
    check_method(method)  # before anything is read: a method without references has no bank
    plan = plan_bank_build(args.dir, args.out, class_name=args.class_name, overwrite=args.overwrite,
                           resume=args.resume, strict=args.strict)
    if len(plan.category) < 2:
        raise FiseclipError(f"a reference bank needs at least 2 images; {plan.folder} has {len(plan.category)}")
    say(f"{len(plan.category)} images in {plan.folder}; class name {plan.class_name!r} (from {plan.class_name_source})")
    status = Status(total=len(plan.category))

    def work() -> int:
        params, cfg, is_random = load_weights(args.weights, args.seed, say)
        run_bank_build(params, cfg, plan, method, size=args.size, capacity=args.capacity, mode=args.mode,
                              budget=args.budget, encode_batch=args.batch_size or 8,
                              weights=weights_spec(args.weights), seed=args.seed, random_weights=is_random,
                              status=status, say=say)
        info = read_bank_json(plan.out)
        if is_random:
            print(RANDOM_BANNER.format(spec=args.weights), file=sys.stderr)
        print(f"wrote {plan.out}: {info['mode']} bank of {info['images']} images ({method.label}, "
              f"{info['size']}px, class {info['class_name']!r}); threshold at --fpr 0.01: "
              f"{info['notes']['threshold_fpr_0.01']:.6f}")
        skipped = info["notes"]["skipped"]
        if skipped:
            print(f"fiseclip-jax bank build: {len(skipped)} unreadable image(s) skipped (listed in "
                  f"{plan.out / 'bank.json'})", file=sys.stderr)
        return 0

    return run_interruptible(work, lambda: f"fiseclip-jax bank build: interrupted after encoding {status.done} of "
                             f"{status.total} images; rerun with --resume to finish", WRITE_LOCK)


def cmd_info(args) -> int:
    info = read_bank_json(args.bank)
    info.pop("arrays", None)
    print(json.dumps(info, indent=1))
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bank", help="reference banks of known-good images, for online inspection "
                       "(detect --bank, watch)")
    bsub = b.add_subparsers(dest="bank_command", required=True)
    c = bsub.add_parser("build", help="build a reference bank from images of the product that are mostly normal")
    c.add_argument("dir", help="folder of known-good images (or simply the first images of the line)")
    c.add_argument("--class-name", default=None, help="product name for the prompts (default: from the folder path)")
    add_method_args(c)
    c.add_argument("--capacity", type=count(2), default=None,
                   help="images the bank holds (default: all given; exact mode keeps the last K, FIFO)")
    c.add_argument("--mode", choices=MODES, default="exact",
                   help="exact: keep the images (scores equal batch scoring with them); coreset: keep M patch "
                        "features per layer (greedy k-center), memory independent of the number of images")
    c.add_argument("--budget", type=count(1), default=None,
                   help="coreset: patch features per (r, layer) (default: 10%% of all patches)")
    c.add_argument("--out", required=True, help="bank directory to create")
    c.add_argument("--overwrite", action="store_true", help="replace an existing bank")
    c.add_argument("--resume", action="store_true", help="finish an interrupted build (same options)")
    c.add_argument("--strict", action="store_true", help="stop at an unreadable image (default: skip it, warn)")
    c.set_defaults(func=cmd_build)
    i = bsub.add_parser("info", help="what a bank holds (bank.json, without the array shapes)")
    i.add_argument("bank")
    i.set_defaults(func=cmd_info)
