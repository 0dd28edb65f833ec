"""`fiseclip-jax watch DIR --bank BANK --out OUT [--update none|gated] [--poll SECONDS]`: score each new file of a
folder as it appears (online inspection). Without a bank: `--method anoclip|anoclip+ --weights W`."""

from __future__ import annotations

import sys

from ..outputs import WRITE_LOCK
from ..data import infer_class_name
from ..watch import UPDATES, Watch, check_watch, plan_watch
from .common import (RANDOM_BANNER, add_decision_args, add_method_args, load_with_bank, method_from_args,
                     read_bank_args, run_interruptible, speaker)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def cmd_watch(args) -> int:
    say = speaker(args.no_progress)
    record = read_bank_args(args)  # before the weights load: the bank, the folder, --out, the method
    plan = plan_watch(args.dir, args.out, overwrite=args.overwrite)
    method = method_from_args(args)
    check_watch(method, record is not None, args.update)
    class_name = args.class_name or infer_class_name(plan.folder)[0]
    state: dict = {}

    def work() -> int:
        params, cfg, is_random, bank = load_with_bank(args, record, say)
        weights = args.weights or (record or {}).get("weights", "")
        watch = Watch(params, cfg, plan, method=method, bank=bank, class_name=class_name,
                      size=args.size, update=args.update, poll=args.poll, settle=args.settle,
                      threshold=args.threshold, fpr=args.fpr, gate_quantile=args.gate_quantile,
                      max_files=args.max_files, until_idle=args.until_idle, weights=weights,
                      random_weights=is_random, seed=args.seed, say=say)
        state["watch"] = watch
        done = watch.run()
        if is_random:
            print(RANDOM_BANNER.format(spec=weights), file=sys.stderr)
        print(f"stopped: {done['stopped']}; {done['num_scored']} files scored in {plan.out / 'scores.csv'}")
        return 0

    def on_interrupt() -> str:
        watch = state.get("watch")
        if watch is None:
            return "fiseclip-jax watch: interrupted before the first file"
        done = watch.finish("interrupted (Ctrl-C)")
        return (f"fiseclip-jax watch: stopped; {done['num_scored']} files scored in {plan.out / 'scores.csv'}, which "
                "is complete; run the same command again to continue")

    return run_interruptible(work, on_interrupt, WRITE_LOCK)


def add_parser(sub) -> None:
    w = sub.add_parser("watch", help="score each new image of a folder as it appears (online inspection)")
    w.add_argument("dir", help="folder the images arrive in (and its direct sub-folders)")
    w.add_argument("--bank", default=None, help="a reference bank (`bank build`); method, weights, size come from it")
    w.add_argument("--class-name", default=None, help="without a bank: product name (default: the folder's name)")
    add_method_args(w, weights_required=False)
    add_decision_args(w)
    w.add_argument("--update", choices=UPDATES, default="none",
                   help="gated: a confidently normal image (score and text score at most --gate-quantile of the "
                        "bank's normal ones) joins the bank; the bank is saved in OUT/bank")
    w.add_argument("--gate-quantile", type=float, default=0.5, help="gated updates: the quantile (default 0.5)")
    w.add_argument("--poll", type=positive, default=1.0, help="seconds between looks at the folder (default 1)")
    w.add_argument("--settle", type=positive, default=5.0,
                   help="an unreadable file is skipped once unchanged this many seconds (default 5)")
    w.add_argument("--max-files", type=int, default=None, help="stop after this many files (scripts, tests)")
    w.add_argument("--until-idle", type=positive, default=None,
                   help="stop when no new file came for this many seconds (scripts, tests)")
    w.add_argument("--out", required=True, help="output folder: scores.csv, overlays/, run.json, bank/")
    w.add_argument("--overwrite", action="store_true",
                   help="clear an earlier watch run in --out instead of continuing it")
    w.set_defaults(func=cmd_watch)
