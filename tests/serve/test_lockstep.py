"""Serving over 2 processes (`jax.distributed`, gloo on CPU, one device each): process 0's
engine leads, process 1 follows (`jquant.serve.lockstep`); greedy tokens and window NLLs
equal the one-process engine's."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jquant

sys.path.insert(0, str(Path(__file__).parent))  # lockstep_case, beside this file

pytestmark = pytest.mark.slow  # two processes compiling the serving programs

HERE = Path(__file__).parent
TIMEOUT = 600
XLA_FLAGS = ("--xla_force_host_platform_device_count=1 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
             "--xla_cpu_collective_timeout_seconds=900")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_as_one(tmp_path):
    from lockstep_case import RECIPES, WINDOWS, build, serve

    path = tmp_path / "pythonpath"
    path.mkdir()
    (path / "jquant").symlink_to(Path(jquant.__file__).parent)
    env = dict(os.environ, PYTHONPATH=f"{path}{os.pathsep}{HERE}", JAX_PLATFORMS="cpu",
               XLA_FLAGS=XLA_FLAGS)  # fmt: skip
    coordinator = f"127.0.0.1:{_free_port()}"
    out = tmp_path / "out.json"
    procs = []
    for i in range(2):
        log = open(tmp_path / f"worker-{i}.log", "w")
        cmd = [sys.executable, str(HERE / "lockstep_worker.py"), str(out), "--coordinator",
               coordinator, "--num-processes", "2", "--process-id", str(i)]  # fmt: skip
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    got, follower = (json.loads(Path(f"{out}.{i}").read_text()) for i in range(2))
    for recipe in RECIPES:
        engine = build(recipe)
        ref = serve(engine)
        ref_nll = engine.runner.window_nll(WINDOWS)
        assert len({tuple(t) for t in ref}) == len(ref)  # the check can see cross-talk
        assert got[recipe]["tokens"] == ref, recipe
        np.testing.assert_allclose(got[recipe]["nll"], ref_nll, rtol=1e-5)
        run = got[recipe]
        assert (run["mesh"], run["kv_heads_axis"]) == (2, "tp"), run
        # o_proj's K=128 is one int4 group: it stays whole on each process, and is noted.
        assert len(run["notes"]) == 1 and "o_proj" in run["notes"][0], run["notes"]
        assert follower[recipe]["calls"] == run["calls"] > 0, (follower, run)
