"""Data-parallel calibration: `quantize_to_disk` over a mesh of 2 processes (gloo on CPU), of
2 devices in one process, and on 1 device, run as subprocesses of `distributed_worker.py`.

The 2-process run of the GPTQ recipe is a resumed one: its process 0 dies as a killed
process does after writing layer 0, and a second 2-process run continues it (process 1
reads layer 0 back from process 0's unfinished output). Each setting then scores the GPTQ
checkpoint's perplexity over its own placement (`jquant.eval.perplexity`)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jquant
from jquant.io.packed import read_packed

# About 3 minutes of compiling subprocesses on a loaded 2-core machine.
pytestmark = pytest.mark.slow

RECIPES = {"gptq": "w4a16-gptq-g64", "awq": "w4a16-awq-gptq-uint4-g64"}
WORKER = Path(__file__).with_name("distributed_worker.py")
# A loaded 2-core machine runs a pass far slower than XLA:CPU's collective timeouts expect
# (see `eight_cpu_devices`): raised, so that only a real hang fails, by TIMEOUT. The
# optimisation flags cut compilation, most of these runs' time, about fourfold; every run
# takes the same flags, so the comparisons between them hold.
XLA_FLAGS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
    "--xla_cpu_collective_timeout_seconds=900 "
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
TIMEOUT = 600  # seconds for each group of worker processes


def _env(tmp: Path, devices: int) -> dict[str, str]:
    """The workers' environment: ``devices`` CPU devices per process, and this jquant (a
    directory holding only a link to it: the repository root would shadow other packages)."""
    path = tmp / "pythonpath"
    if not path.exists():
        path.mkdir()
        (path / "jquant").symlink_to(Path(jquant.__file__).parent)
    flags = f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}"
    return dict(os.environ, PYTHONPATH=str(path), JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, name: str, args: list[str], *, devices: int = 1, processes: int = 1):
    """``processes`` workers (a 2-process run when more than one); their logs go to files."""
    extra = [[]]
    if processes > 1:
        coordinator = f"127.0.0.1:{_free_port()}"
        extra = [["--coordinator", coordinator, "--num-processes", str(processes),
                  "--process-id", str(i)] for i in range(processes)]  # fmt: skip
    procs = []
    for i, more in enumerate(extra):
        log = open(tmp / f"{name}-{i}.log", "w")  # closed by _wait, with the process
        cmd = [sys.executable, str(WORKER), *args, *more]
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp, devices))
        procs.append((p, log))
    return procs


def _wait(tmp: Path, name: str, procs, *, expect=0) -> None:
    codes = []
    try:
        for p, _ in procs:
            codes.append(p.wait(timeout=TIMEOUT))
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = "\n".join((tmp / f"{name}-{i}.log").read_text()[-3000:] for i in range(len(procs)))
    assert codes == [expect] * len(procs), f"{name}: exit codes {codes}\n{logs}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """``{setting: {recipe key: output directory}}`` for the settings ``processes`` (2 × 1
    device), ``devices`` (1 × 2 devices) and ``single`` (1 device, no mesh)."""
    tmp = tmp_path_factory.mktemp("distributed")
    gguf = tiny.write_gguf(tmp / "tiny.gguf", tiny.tensors(tied=False))
    np.save(tmp / "tokens.npy", np.random.RandomState(0).randint(0, 200, (4, 16)))
    base = [str(gguf), str(tmp / "tokens.npy")]
    out = {s: {k: tmp / f"{s}-{k}" for k in RECIPES} for s in ("processes", "devices", "single")}

    def run_args(setting):
        runs = [a for k, r in RECIPES.items() for a in ("--run", r, str(out[setting][k]))]
        return [*runs, "--perplexity", str(tmp / f"{setting}-perplexity.json")]

    _wait(tmp, "single", _start(tmp, "single", base + run_args("single")))
    _wait(tmp, "devices", _start(tmp, "devices", base + run_args("devices") + ["--data-parallel"],
                                 devices=2))  # fmt: skip
    # Process 0 dies before writing layer 1; process 1 is left waiting in a collective
    # for it (or is stopped by the coordination service): it is killed.
    killed = _start(tmp, "killed", base + run_args("processes")[:3] + ["--die-at", "layers.00001"],
                    processes=2)  # fmt: skip
    p0, log0 = killed[0]
    code = p0.wait(timeout=TIMEOUT)
    log0.close()
    assert code == 3, (tmp / "killed-0.log").read_text()[-3000:]
    p1, log1 = killed[1]
    p1.kill()
    p1.wait()
    log1.close()
    assert not out["processes"]["gptq"].exists()  # nothing loadable yet
    _wait(tmp, "processes", _start(tmp, "processes", base + run_args("processes"), processes=2))
    return out


def _arrays(directory) -> dict[str, list[np.ndarray]]:
    arrays, _, _ = read_packed(directory)
    return {p: [np.asarray(x) for x in jax.tree.leaves(v)] for p, v in arrays.items()}


def _codes(directory) -> dict[str, np.ndarray]:
    arrays, _, _ = read_packed(directory)
    return {p: np.asarray(v.qvalue) for p, v in arrays.items() if isinstance(v, jquant.QArray)}


def _report(directory, process: int = 0) -> dict:
    return json.loads(Path(f"{directory}.report-{process}.json").read_text())


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_write_what_two_devices_of_one_process_write(runs, recipe):
    """The same mesh shape, the same windows on each device, the same programs: every code,
    scale and float leaf (AWQ's folded norms too) is byte-identical."""
    a, b = _arrays(runs["processes"][recipe]), _arrays(runs["devices"][recipe])
    assert set(a) == set(b)
    for path in a:
        for x, y in zip(a[path], b[path], strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), path
    rows = _report(runs["processes"][recipe])["rows"]
    assert _no_device(rows) == _no_device(_rows_of(rows, _report(runs["devices"][recipe])["rows"]))
    # Each process solved its share and received the other's: both report every kernel.
    assert _report(runs["processes"][recipe], 1)["rows"] == rows


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_solves_are_spread_over_the_devices(runs, recipe):
    """Each layer's kernels are solved by the mesh's devices in turn (in the 2-process run,
    each process solves half of them); without a mesh, on the default device."""
    for setting in ("processes", "devices"):
        rows = _report(runs[setting][recipe])["rows"]
        per_layer = {}
        for r in rows:  # the head is quantized after the layers, on the host's default device
            if r["path"].startswith("layers/"):
                per_layer.setdefault(r["path"].split("/")[1], []).append(r["device"])
        assert per_layer, rows  # the resumed 2-process gptq run reports layer 1 only
        for layer, devices in per_layer.items():
            assert len(set(devices)) == 2, (setting, layer, devices)
            assert abs(devices.count(devices[0]) - len(devices) / 2) <= 0.5, devices
    assert {r["device"] for r in _report(runs["single"][recipe])["rows"]} == {None}


def _no_device(rows):
    return [{k: v for k, v in r.items() if k != "device"} for r in rows]


def _rows_of(rows, other):
    """The rows of ``other`` for the kernels of ``rows`` (a resumed run has rows only for
    the layers it calibrated)."""
    paths = {r["path"] for r in rows}
    return [r for r in other if r["path"] in paths]


def test_the_killed_two_process_run_resumed_on_both_processes(runs):
    resumed = _report(runs["processes"]["gptq"])
    assert [_report(runs["processes"]["gptq"], i)["resumed_layers"] for i in (0, 1)] == [[0], [0]]
    # Layer 0 was done before the kill: only layer 1 and the head ran again.
    assert {r["path"].rsplit("/", 1)[0] for r in resumed["rows"]} == {
        f"layers/1/{m}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                  "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                                  "mlp/down_proj")} | {"lm_head"}
    assert _report(runs["processes"]["awq"])["resumed_layers"] == []


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_devices_agree_with_one_up_to_float_rounding(runs, recipe):
    """On 2 devices a Hessian is the sum of the 2 devices' partial sums: float rounding
    differs from 1 device's order of summation, so a code at a rounding boundary may flip;
    the output errors agree closely and the codes almost everywhere."""
    rows = _report(runs["processes"][recipe])["rows"]
    ref = _rows_of(rows, _report(runs["single"][recipe])["rows"])
    assert [r["path"] for r in rows] == [r["path"] for r in ref]
    for r, s in zip(rows, ref, strict=True):
        assert r["output_error"] == pytest.approx(s["output_error"], rel=1e-3), r["path"]
    a, c = _codes(runs["processes"][recipe]), _codes(runs["single"][recipe])
    assert set(a) == set(c)
    differ = sum(int(np.sum(a[p] != c[p])) for p in a) / sum(a[p].size for p in a)
    assert differ < 1e-3
    floats_a, floats_c = _arrays(runs["processes"][recipe]), _arrays(runs["single"][recipe])
    for path in set(floats_a) - set(a):
        for x, y in zip(floats_a[path], floats_c[path], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=path)


def test_perplexity_over_two_processes_is_the_one_device_perplexity(runs):
    """Each process scores its share of every call's windows; the windows' NLLs are gathered
    and summed on the host in window order, as on one device."""
    tmp = runs["single"]["gptq"].parent
    result = {s: json.loads((tmp / f"{s}-perplexity.json").read_text()) for s in runs}
    assert result["processes"] == result["devices"]
    assert result["processes"]["windows"] == result["single"]["windows"] == 9
    assert result["processes"]["nll"] == pytest.approx(result["single"]["nll"], rel=1e-6)
