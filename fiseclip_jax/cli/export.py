"""`fiseclip-jax export --method M --weights W [--size S] --class-name C [--bank BANK] [--platforms cpu,cuda,tpu]
[--batch N|dynamic] --out DIR`: the detector as one serialized jax.export program + its arrays (orbax)."""

from __future__ import annotations

import sys

from .. import methods
from ..bank import check_compatible, load_bank, read_bank_json
from ..errors import FiseclipError
from ..export import DYNAMIC, check_platforms, export_detector, resolve_batch
from ..prompts import clean_class_name
from .bank import weights_spec
from .common import DEFAULT_METHOD, RANDOM_BANNER, count, load_weights, speaker


def cmd_export(args) -> int:
    say = speaker(args.no_progress)
    platforms = check_platforms(args.platforms)  # everything is checked before the weights load
    record = read_bank_json(args.bank) if args.bank else None
    if record is not None:
        built = record["method"]["method"]
        if args.method and args.method != built:
            raise FiseclipError(f"--method {args.method}: the bank {args.bank} was built with {built}")
        if args.size and args.size != record["size"]:
            raise FiseclipError(f"--size {args.size}: the bank {args.bank} was built at {record['size']}")
        if args.class_name and clean_class_name(args.class_name) != clean_class_name(record["class_name"]):
            raise FiseclipError(f"--class-name {args.class_name!r}: the bank {args.bank} is for "
                                f"{record['class_name']!r}")
        method = None
    else:
        if not args.weights:
            raise FiseclipError("--weights is required (or --bank, whose weights are used)")
        method = methods.get(args.method or DEFAULT_METHOD).with_run_options(seed=args.seed)
        resolve_batch(method, args.batch, bank=False)
        if method.prompts is not None and not args.class_name:
            raise FiseclipError(f"--class-name is required: {method.label} encodes prompts for the class")
    spec, seed = args.weights, args.seed
    if record is not None and not spec:
        spec, seed = record["weights"], record.get("notes", {}).get("seed", args.seed)
    params, cfg, is_random = load_weights(spec, seed, say)
    bank = None
    if record is not None:
        check_compatible(record, args.bank, params=params, cfg=cfg)
        bank = load_bank(args.bank)
    out = export_detector(params, cfg, method, out=args.out, class_name=args.class_name or "", size=args.size,
                          bank=bank, platforms=platforms, batch=args.batch, weights=weights_spec(spec),
                          random_weights=is_random, overwrite=args.overwrite, say=say)
    if is_random:
        print(RANDOM_BANNER.format(spec=spec), file=sys.stderr)
    print(f"wrote {args.out}: {out['method']}{' bank detection' if bank is not None else ''} for "
          f"{out['class_name']!r} at {out['size']}px, batch {out['batch']}, platforms {','.join(out['platforms'])} "
          f"(program {out['program_bytes']} bytes); run it with `fiseclip-jax detect DIR --exported {args.out} "
          f"--out OUT` or fiseclip_jax.load_exported")
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="export a detector as a serialized jax.export program (runs without the "
                       "model code, on the platforms chosen)")
    e.add_argument("--method", choices=methods.names(), default=None,
                   help=f"default: {DEFAULT_METHOD}; with --bank, the bank's")
    e.add_argument("--weights", default=None,
                   help="a directory made by `convert`, a Hugging Face id, or random:PRESET (smoke tests only); "
                        "with --bank, default: the bank's weights")
    e.add_argument("--size", type=count(1), default=None,
                   help="input side S (divisible by the patch size); default: the weights' native size")
    e.add_argument("--class-name", default=None, help="product name for the prompts (required unless --bank)")
    e.add_argument("--bank", default=None,
                   help="a reference bank (`bank build`): export detection against it (any batch size)")
    e.add_argument("--platforms", default="cpu,cuda,tpu",
                   help="comma-separated jax.export platforms the program is lowered for: cpu, cuda, rocm, tpu "
                        "(default: cpu,cuda,tpu)")
    e.add_argument("--batch", default=DYNAMIC,
                   help="images per call: 'dynamic' (a symbolic batch dimension; anoclip, anoclip+ and --bank) "
                        "or N (fixed; needed by musc and fiseclip, which match the images of a call against each "
                        "other; fiseclip's batch size becomes N, and musc scores a category of up to N at once)")
    e.add_argument("--seed", type=int, default=0, help="seed for random: weights and the test-time adapter")
    e.add_argument("--out", required=True, help="export directory: export.json, program.bin, arrays/")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    e.add_argument("--no-progress", action="store_true", help="no phase messages")
    e.add_argument("--no-cache", action="store_true", help="neither read nor write the cache folder")
    e.set_defaults(func=cmd_export)
