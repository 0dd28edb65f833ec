"""What the commands share: method and weights options, the random-weights banner, the mesh."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Callable

from .. import cache, methods, overrides
from ..bank import check_compatible, load_bank, read_bank_json
from ..clip.checkpoint import resolve_weights
from ..distributed import initialize_distributed, make_mesh
from ..errors import FiseclipError
from ..features import FeatureCache
from ..prompts import clean_class_name

RANDOM_BANNER = """\
!!! ------------------------------------------------------------------------ !!!
!!! RANDOM WEIGHTS ({spec}): scores and maps are MEANINGLESS.                 
!!! This run only checks that the pipeline works. For real detection pass     
!!! --weights openai/clip-vit-large-patch14-336 (or a directory made by        
!!! `fiseclip-jax convert`).                                                   
!!! ------------------------------------------------------------------------ !!!"""


def count(minimum: int):
    """argparse type: an integer >= minimum (the error names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value

    return parse


DEFAULT_METHOD = "fiseclip"


def add_method_args(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """Options of every command that runs a method (`detect`, `evaluate`, `bank build`, `watch`)."""
    p.add_argument("--method", choices=methods.names(), default=None,
                   help=f"default: {DEFAULT_METHOD}, or the method of --protocol")
    p.add_argument("--weights", required=weights_required,
                   help="a directory made by `convert`, a Hugging Face id (e.g. openai/clip-vit-large-patch14-336), "
                        "or random:PRESET (e.g. random:ViT-B/16) for smoke tests only"
                        + ("" if weights_required else "; with --bank, default: the bank's weights"))
    p.add_argument("--size", type=count(1), default=None,
                   help="input side S (divisible by the patch size); default: the weights' native size")
    p.add_argument("--batch-size", type=count(0), default=None,
                   help="FiSeCLIP: images per matching batch (0 = whole category; default 16); "
                        "others: images per forward pass (default 8)")
    p.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                   help="MuSc only: override the activation (gelu reproduces MuSc's published runs, SPEC §8)")
    p.add_argument("--seed", type=int, default=0, help="seed for random: weights and the test-time adapter")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype of the CLIP towers (parameters and outputs stay float32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no phase messages")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the cache folder ($FISECLIP_CACHE, default ~/.cache/fiseclip_jax): "
                        "text features and compiled programs are recomputed")
    p.add_argument("--devices", type=count(1), default=None,
                   help="split batches over N devices (a JAX mesh; matching passes references around "
                        "the device ring); default: one device")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-host job first (jax.distributed.initialize, configured by the "
                        "cluster environment); --devices then counts devices of all hosts")


def make_run_mesh(args):
    """The mesh the CLI flags ask for, or None."""
    if args.distributed:
        initialize_distributed()
    if args.devices is None and not args.distributed:
        return None
    return make_mesh(args.devices)


def add_override_args(p: argparse.ArgumentParser, cache_help: str = "") -> None:
    """--set / --config (every field of the method config) and --cache DIR (per-image encoded features)."""
    p.add_argument("--set", dest="set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any field of the method config (repeatable): alpha=0.2, layers=6,12,18,24, tta.steps=10, "
                        "layers=none; `fiseclip-jax methods` lists the keys; wins over --config")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="method fields from a TOML file's [method] table (its `method` key names the method), or "
                        "the method config recorded in a previous run.json (reruns it exactly)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="feature cache: each image's encoded features are stored in DIR and reused when weights, "
                        "image, size and the method's encoding fields match (no forward pass), and so is the "
                        "matching of FiSeCLIP and MuSc (no matching when its fields match)" + cache_help)


def method_from_args(args, protocol=None) -> methods.Method:
    """The method config the flags stand for: the registered method (with a protocol's options), then a
    --config file's fields, the run options given (--batch-size, --act, --seed), then --set; a flag given
    explicitly wins over the protocol."""
    config = getattr(args, "config", None)
    sets = overrides.parse_assignments(getattr(args, "set", None) or [])
    base = protocol.method_config(args.method) if protocol else None
    return overrides.resolve_method(args.method or (None if config else DEFAULT_METHOD), base=base, config=config,
                                    sets=sets, run_options=dict(batch_size=args.batch_size, act=args.act,
                                                                seed=args.seed))


def feature_cache_from_args(args) -> FeatureCache | None:
    """The --cache folder as a FeatureCache (checked to be a folder), or None."""
    folder = getattr(args, "cache", None)
    if folder is None:
        return None
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FiseclipError(f"--cache {folder}: exists and is not a folder")
    return FeatureCache(folder)


def load_weights(spec: str, seed: int = 0, say: Callable[[str], None] = lambda msg: None, dtype: str = "float32"):
    """(params, cfg with the computation dtype, is_random); random weights are announced loudly."""
    say(f"loading weights {spec}")
    params, cfg, is_random = resolve_weights(spec, seed=seed)
    cfg = cfg.replace(dtype=dtype)
    if is_random:
        print(RANDOM_BANNER.format(spec=spec), file=sys.stderr)
    return params, cfg, is_random


def add_decision_args(p: argparse.ArgumentParser) -> None:
    """--fpr / --threshold: how scores become decisions (`detect --bank`, `watch`)."""
    p.add_argument("--fpr", type=float, default=0.01,
                   help="with --bank: the threshold flags this share of the bank's known-good images (default 0.01)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold on the score: above it is anomalous (overrides --fpr and --thresholds)")


def read_bank_args(args) -> dict | None:
    """bank.json of --bank (None without it), checked against --method / --size / --class-name, which the bank
    fixes; without --bank, --weights is required. Before any weights load."""
    if not args.bank:
        if not args.weights:
            raise FiseclipError("--weights is required (or --bank, whose weights are used)")
        return None
    record = read_bank_json(args.bank)
    built = record["method"]["method"]
    if args.method and args.method != built:
        raise FiseclipError(f"--method {args.method}: the bank {args.bank} was built with {built} (with --bank, "
                            "method, weights and size come from the bank)")
    if args.size and args.size != record["size"]:
        raise FiseclipError(f"--size {args.size}: the bank {args.bank} was built at {record['size']}")
    named = getattr(args, "class_name", None)
    if named and clean_class_name(named) != clean_class_name(record["class_name"]):
        raise FiseclipError(f"--class-name {args.class_name!r}: the bank {args.bank} is for {record['class_name']!r}")
    if not 0.0 <= args.fpr <= 1.0:
        raise FiseclipError(f"--fpr must be between 0 and 1, got {args.fpr}")
    return record


def load_with_bank(args, record, say: Callable[[str], None]):
    """(params, cfg, is_random, bank or None): --weights (else the bank's own weights and seed), and the bank,
    refused with a clear error if it was built with other weights."""
    spec, seed = args.weights, args.seed
    if record is not None and not spec:
        spec, seed = record["weights"], record.get("notes", {}).get("seed", args.seed)
    params, cfg, is_random = load_weights(spec, seed, say, dtype=getattr(args, "dtype", "float32"))
    if record is None:
        return params, cfg, is_random, None
    check_compatible(record, args.bank, params=params, cfg=cfg)
    return params, cfg, is_random, load_bank(args.bank)


def speaker(quiet: bool) -> Callable[[str], None]:
    """A function that prints phase messages ("[  12.3 s] encoding prompts") to stderr, or nothing."""
    start = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    return say


def run_interruptible(work: Callable[[], int], on_interrupt: Callable[[], str], lock: threading.Lock) -> int:
    """Run `work` in a worker thread so that Ctrl-C is seen at once, even during a long XLA call.

    On Ctrl-C: wait for the write in progress (`lock`), print `on_interrupt()` as one line, exit 130.
    What was written stays consistent (every write is atomic); the computation in flight is dropped.
    """
    result: dict = {}

    def target():
        try:
            result["rc"] = work()
        except BaseException as err:  # re-raised in the main thread
            result["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        lock.acquire(timeout=10)
        print(on_interrupt(), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    if "error" in result:
        raise result["error"]
    return result["rc"]


def configure_caches(args) -> None:
    """Text features and compiled XLA programs persist in the cache folder unless --no-cache.

    The XLA cache pays on CPU too: warm README job (benchmarks/startup.py, 2 cores) compiles
    in 3-5 s instead of 21 s, at no measurable cost to the first run."""
    cache.set_enabled(not getattr(args, "no_cache", False))
    if cache.enabled():
        cache.enable_compilation_cache()
