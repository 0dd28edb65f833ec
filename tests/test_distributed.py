"""Sharded encoding and ring matching on several devices equal the single-device results (SPEC §4.2–4.3).

XLA_FLAGS must be set before jax is imported, and this session has imported it already, so
the checks run in fresh interpreters (tests/distributed_worker.py): one with 8 forced host
devices (meshes of 4, 8 and 2×2 devices), and two processes with 2 devices each joined by
`jax.distributed.initialize` on 127.0.0.1.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fiseclip_jax.distributed import make_mesh, pad_batch, ring_mutual_scores_jit
from fiseclip_jax.matching import mutual_scores_jit

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_sharded_encoder_and_ring_match_single_device_on_4_and_8_devices():
    run = subprocess.run([sys.executable, str(WORKER), "spmd"], env=_env(8), capture_output=True,
                         text=True, timeout=600)  # generous: CI machines may be shared
    assert run.returncode == 0 and "SPMD-OK" in run.stdout, run.stdout[-3000:] + run.stderr[-5000:]


def test_ring_on_one_device_mesh_in_process():
    """The ring degenerates to one block on the session's single device: no ppermute at all."""
    z, allowed, valid = distributed_worker.ring_case(5, 5)
    want = mutual_scores_jit(z, allowed, valid)
    got = ring_mutual_scores_jit(z, allowed, valid, mesh=make_mesh(1))
    np.testing.assert_array_equal(np.asarray(got.num_refs), np.asarray(want.num_refs))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), atol=1e-5)


def test_pad_batch_marks_padding_invalid():
    x, valid = pad_batch(np.ones((5, 2)), 4)
    assert x.shape == (8, 2) and not x[5:].any()
    np.testing.assert_array_equal(valid, np.arange(8) < 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # >= 8 s in the full suite on the 2-core CI machine
def test_two_processes_on_localhost_match_one_process(tmp_path):
    # gloo (JAX's CPU collectives) connects to the address the host name resolves to.
    try:
        if not socket.gethostbyname(socket.gethostname()).startswith("127."):
            pytest.skip("host name does not resolve to a loopback address: gloo would leave 127.0.0.1")
    except OSError as e:
        pytest.skip(f"cannot resolve the host name for gloo: {e}")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "process", str(port), str(i), str(tmp_path)],
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    log = "\n".join(f"--- process {i}\n{text[-3000:]}" for i, text in enumerate(logs))
    assert all(p.returncode == 0 for p in procs), log

    out = np.load(tmp_path / "process0.npz")
    z, allowed, valid = distributed_worker.ring_case(7, 7)
    want = mutual_scores_jit(z, allowed, valid)
    np.testing.assert_array_equal(out["num_refs"][:7], np.asarray(want.num_refs))
    np.testing.assert_allclose(out["scores"][:7], np.asarray(want.scores), atol=1e-5)
    assert not out["num_refs"][7:].any()  # the padding row

    from fiseclip_jax.detect import _encode_jit
    from fiseclip_jax.methods import FiSeCLIPConfig

    cfg, params, pixels = distributed_worker.encoder_case()
    want_tokens = _encode_jit(params, cfg, pixels, FiSeCLIPConfig())["tokens"]
    np.testing.assert_allclose(out["tokens"], np.asarray(want_tokens), atol=1e-5)
    assert jax.process_count() == 1  # this session stayed single-process
