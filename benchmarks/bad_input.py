"""The bad-input cases of issue 12, run through the CLI: case -> exit code -> what the user reads.

    python benchmarks/bad_input.py        # prints a markdown table (tiny random CLIP, generated images)

Each case runs `fiseclip_jax.cli.main` in this process on generated images; the message shown is
the last line the command wrote to stderr (progress and the random-weights banner left out).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from fiseclip_jax.cli import main

TINY = ["--weights", "random:tiny", "--size", "32", "--no-progress"]


def images(root: Path, n: int, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("good" if i % 2 == 0 else "crack")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(sub / f"{i:03d}.png")
    return root


def mvtec(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for sub in ("good", "crack"):
        for i in range(2):
            p = root / "bottle" / "test" / sub / f"{i:03d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(p)
            if sub == "crack":
                m = root / "bottle" / "ground_truth" / "crack" / f"{i:03d}_mask.png"
                m.parent.mkdir(parents=True, exist_ok=True)
                mask = np.zeros((32, 32), np.uint8)
                mask[4:12, 8:20] = 255
                Image.fromarray(mask).save(m)
    return root


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("!!!")
             and not ln.lstrip().startswith("[") and "img/s" not in ln]
    return lines[-1] if lines else ""


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, last_line(err.getvalue())


def cases(tmp: Path):
    good = images(tmp / "widget", 6)
    one = images(tmp / "one", 1)
    empty = tmp / "empty"
    empty.mkdir()
    afile = tmp / "afile.txt"
    afile.write_text("x")
    trunc = images(tmp / "trunc", 5)
    (trunc / "good" / "zz_truncated.png").write_bytes((trunc / "good" / "000.png").read_bytes()[:60])
    data = mvtec(tmp / "mvtec")
    (data / "bottle" / "test" / "good" / "zz_truncated.png").write_bytes(
        (data / "bottle" / "test" / "good" / "000.png").read_bytes()[:60])
    bad_st = tmp / "model.safetensors"
    bad_st.write_bytes(b"garbage that is not a safetensors header")
    done = tmp / "done"
    run(["detect", str(good), *TINY, "--out", str(done)])
    d = ["detect"]
    return [
        ("--out is an existing file", d + [str(good), *TINY, "--out", str(afile)]),
        ("--out under a file (/dev/null/out)", d + [str(good), *TINY, "--out", "/dev/null/out"]),
        ("--out inside the input folder", d + [str(good), *TINY, "--out", str(good / "results")]),
        ("--out holds an earlier run", d + [str(good), *TINY, "--out", str(done)]),
        ("... with --overwrite", d + [str(good), *TINY, "--out", str(done), "--overwrite"]),
        ("missing folder", d + [str(tmp / "nope"), *TINY, "--out", str(tmp / "o1")]),
        ("empty folder", d + [str(empty), *TINY, "--out", str(tmp / "o2")]),
        ("--batch-size -3", d + [str(good), *TINY, "--batch-size", "-3", "--out", str(tmp / "o3")]),
        ("--size 0", d + [str(good), "--weights", "random:tiny", "--size", "0", "--out", str(tmp / "o4")]),
        ("--size -16", d + [str(good), "--weights", "random:tiny", "--size", "-16", "--out", str(tmp / "o5")]),
        ("--size 20 (patch 16)", d + [str(good), "--weights", "random:tiny", "--size", "20", "--out", str(tmp / "o6")]),
        ("one image, --method musc", d + [str(one), *TINY, "--method", "musc", "--out", str(tmp / "o7")]),
        ("one image, --method fiseclip", d + [str(one), *TINY, "--method", "fiseclip", "--out", str(tmp / "o8")]),
        ("a truncated image among 5", d + [str(trunc), *TINY, "--method", "anoclip", "--out", str(tmp / "o9")]),
        ("... with --strict", d + [str(trunc), *TINY, "--method", "anoclip", "--strict", "--out", str(tmp / "o10")]),
        ("--overwrite with --resume", d + [str(good), *TINY, "--overwrite", "--resume", "--out", str(tmp / "o11")]),
        ("unknown --method", d + [str(good), *TINY, "--method", "patchcore", "--out", str(tmp / "o12")]),
        ("convert a corrupt .safetensors", ["convert", str(bad_st), "--out", str(tmp / "w")]),
        ("evaluate: a truncated image", ["evaluate", "--dataset", "mvtec", "--root", str(data), *TINY,
                                         "--out", str(tmp / "e1")]),
        ("evaluate: --out holds an earlier run", ["evaluate", "--dataset", "mvtec", "--root", str(data), *TINY,
                                                  "--out", str(tmp / "e1")]),
        ("evaluate: --out inside the dataset", ["evaluate", "--dataset", "mvtec", "--root", str(data), *TINY,
                                                "--out", str(data / "bottle" / "out")]),
    ]


def main_() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(what, *run(argv)) for what, argv in cases(Path(tmp))]
    print("| case | exit | message (last stderr line) |\n|---|---|---|")
    for what, code, msg in rows:
        msg = msg.replace(tmp, "/tmp/…").replace("|", "\\|")
        print(f"| {what} | {code} | {msg} |")
    print("\n(Ctrl-C: exit 130 with `interrupted after N of M images; rerun with --resume to finish`, "
          "tests/test_runs.py::test_ctrl_c_exits_quickly_with_one_line_and_consistent_files)")
    sys.stdout.flush()


if __name__ == "__main__":
    main_()
