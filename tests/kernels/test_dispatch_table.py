"""The M-based kernel-or-XLA dispatch table, and that `jquant.ops` obeys it.

No device here: the ops tests pretend to be on a GPU or TPU by replacing the backend probe
and the kernel entry points, and check which path each M takes. Nothing here measures speed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels import dispatch_table as dt

from jquant import _act, _dispatch, kernels, ops, qarray


@pytest.fixture(autouse=True)
def _clean_table(monkeypatch, tmp_path):
    monkeypatch.delenv("JQUANT_DISPATCH_TABLE", raising=False)
    monkeypatch.setattr(dt, "MEASURED_DIR", str(tmp_path / "measured"))  # ships nothing
    old = dt.set_dispatch_table(None)
    yield
    dt.set_dispatch_table(old)


def _rows(kind, times):
    """Benchmark rows: times = {m: [(kernel_ms, xla_ms), ...one per layer shape]}."""
    rows = []
    for m, pairs in times.items():
        for kernel_ms, xla_ms in pairs:
            rows.append(dict(kind=kind, m=m, method="kernel", ms=kernel_ms))
            rows.append(dict(kind=kind, m=m, method="xla", ms=xla_ms))
            rows.append(dict(kind=kind, m=m, method="bf16_dot", ms=1.0))
    return rows


def test_no_measured_table_means_no_kernel():
    for backend in dt.BACKENDS:
        assert not dt.has_dispatch_table(backend)
        for kind in dt.KINDS:
            assert dt.kernel_max_m(backend, kind) == 0
            assert not dt.prefer_kernel(backend, kind, 1)


def test_the_real_shipped_tables_are_measurements():
    # Whatever ships in kernels/measured/ must load as benchmark JSON for its own backend.
    for (backend, kind), limit in dt._shipped(str(Path(dt.__file__).parent / "measured")).items():
        assert backend in dt.BACKENDS and kind in dt.KINDS and isinstance(limit, int)


def _write_table(path, backend, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(backend=backend, rows=rows)))
    return path


def test_shipped_table_and_user_tables_layer(tmp_path):
    _write_table(tmp_path / "measured" / "tpu.json", "tpu", _rows("int4", {1: [(1, 2)]}))
    dt._shipped.cache_clear()
    assert dt.has_dispatch_table("tpu") and not dt.has_dispatch_table("gpu")
    assert dt.kernel_max_m("tpu", "int4") == 1 and dt.kernel_max_m("tpu", "int8") == 0
    dt.set_dispatch_table({("gpu", "int8"): None})  # over the shipped one, not instead
    assert dt.kernel_max_m("gpu", "int8") is None and dt.kernel_max_m("tpu", "int4") == 1
    _write_table(tmp_path / "measured" / "gpu.json", "tpu", [])
    dt._shipped.cache_clear()
    with pytest.raises(ValueError, match="another backend"):
        dt.shipped_table()
    dt._shipped.cache_clear()


def test_table_from_benchmark_stops_at_first_loss():
    rows = _rows("int4", {1: [(1, 3), (1, 2)], 8: [(1, 2), (1, 1.5)], 64: [(2, 1), (1, 1.2)],
                          512: [(1, 9)]})  # fmt: skip
    # M=64: kernel/xla = 2 and 0.83, geometric mean 1.29 > 1 -> XLA from 64 on, even though
    # the kernel wins again at 512 (the limit is a prefix, not a set).
    assert dt.table_from_benchmark(rows, "gpu") == {("gpu", "int4"): 8}
    never = _rows("w8a8_fp8", {1: [(2, 1)], 8: [(1, 2)]})
    assert dt.table_from_benchmark(never, "tpu") == {("tpu", "w8a8_fp8"): 0}


def test_table_from_benchmark_rejects_bad_rows():
    with pytest.raises(ValueError, match="lacks kind/m/method/ms"):
        dt.table_from_benchmark([dict(kind="int4", m=1, method="kernel")], "gpu")


def test_env_var_loads_a_benchmark_json(tmp_path, monkeypatch):
    path = tmp_path / "kernels.json"
    rows = _rows("int8", {1: [(1, 2)], 16: [(3, 2)]})
    path.write_text(json.dumps(dict(backend="gpu", rows=rows)))
    monkeypatch.setenv("JQUANT_DISPATCH_TABLE", str(path))
    assert dt.kernel_max_m("gpu", "int8") == 1
    assert dt.kernel_max_m("gpu", "int4") == 0  # unmeasured kind: XLA
    assert dt.has_dispatch_table("gpu") and not dt.has_dispatch_table("tpu")


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a benchmarks/kernels.py"),
    ('{"rows": []}', "not a benchmarks/kernels.py"),
    ('{"backend": "cpu", "rows": []}', "measured on backend='cpu'"),
])  # fmt: skip
def test_bad_table_files(tmp_path, content, match):
    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        dt.load_table(str(path))


def test_set_dispatch_table_validates():
    with pytest.raises(ValueError, match="must be \\(backend, kind\\)"):
        dt.set_dispatch_table({("gpu", "int5"): 4})
    with pytest.raises(ValueError, match="int >= 0 or None"):
        dt.set_dispatch_table({("gpu", "int4"): -1})
    with pytest.raises(ValueError, match="no dispatch entry"):
        dt.prefer_kernel("cpu", "int4", 1)
    dt.set_dispatch_table({("gpu", "int4"): 4})
    assert dt.kernel_max_m("gpu", "int4") == 4 and dt.kernel_max_m("gpu", "int8") == 0


# ---- jquant.ops obeys the table ---------------------------------------------------------


@pytest.fixture(params=["gpu"])
def fake_device(request, monkeypatch):
    """ops sees a GPU (or TPU) whose kernels take everything; calls are recorded and
    answered by the reference, so results stay checkable."""
    calls = []
    backend = request.param

    def fake_kernel(x, q, s, zp, **kw):
        calls.append(("weight_only", x.shape[0]))
        return kernels.quantized_matmul_reference(x, q, s, zp, **kw)

    def fake_w8a8(x, codes, scale, *, backend=None, interpret=False):
        calls.append(("w8a8", x.shape[0], backend))
        return real_int8(x, codes, scale, backend="cpu")

    real_int8 = _act.int8_matmul
    monkeypatch.setattr(_dispatch, "_device_backend", lambda: backend)
    for name in ("can_use_gpu_kernel", "can_use_gpu_w8a8", "can_use_tpu_kernel",
                 "can_use_tpu_w8a8"):
        monkeypatch.setattr(kernels, name, lambda *a, **k: True)
    monkeypatch.setattr(kernels, "quantized_matmul", fake_kernel)
    monkeypatch.setattr(_act, "int8_matmul", fake_w8a8)
    monkeypatch.setattr(_dispatch, "_noticed", set())
    return calls



def _kernel_calls(calls):
    """The recorded calls that reached a device kernel (W8A8 on "cpu" is the XLA path)."""
    return [c for c in calls if c[0] == "weight_only" or c[2] != "cpu"]


def _weight(qtype="int4", activation=None, group_size=32):
    w = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32)
    return qarray.quantize_array(w, qtype, axis=0, group_size=group_size, activation=activation,
                                 scale_dtype=jnp.float32)


@pytest.mark.parametrize("m,expect_kernel", [(1, True), (4, True), (5, False), (64, False)])
def test_ops_follows_the_limit(fake_device, m, expect_kernel):
    dt.set_dispatch_table({("gpu", "int4"): 4})
    w = _weight()
    x = jax.random.normal(jax.random.key(1), (m, 64), jnp.float32)
    y = ops.qdot(x, w)
    assert fake_device == ([("weight_only", m)] if expect_kernel else [])
    np.testing.assert_allclose(y, x @ w.dequantize(), rtol=1e-5, atol=1e-5)


def test_forced_kernel_path_ignores_the_limit(fake_device):
    dt.set_dispatch_table({("gpu", "int4"): 0})
    x = jnp.ones((8, 64), jnp.float32)
    old = ops.set_matmul_path("kernel")
    try:
        ops.qdot(x, _weight())
    finally:
        ops.set_matmul_path(old)
    assert fake_device == [("weight_only", 8)]
    ops.qdot(x, _weight())  # auto: limit 0 means XLA at every M
    assert fake_device == [("weight_only", 8)]


def test_w8a8_limit_and_xla_path(fake_device):
    w = _weight("int8", activation="int8", group_size=None)
    x = jax.random.normal(jax.random.key(2), (16, 64), jnp.float32)
    dt.set_dispatch_table({("gpu", "w8a8_int8"): None})  # at every M
    y_kernel = ops.qdot(x, w)
    dt.set_dispatch_table({("gpu", "w8a8_int8"): 8})
    y_xla = ops.qdot(x, w)
    # the kernel on the device, then XLA's int8 x int8 (the reference backend)
    assert fake_device == [("w8a8", 16, "gpu"), ("w8a8", 16, "cpu")]
    np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-6)


@pytest.mark.parametrize("fake_device", ["gpu", "tpu"], indirect=True)
@pytest.mark.parametrize("weight", [dict(qtype="int4"), dict(qtype="int8", activation="int8",
                                                           group_size=None)])
def test_auto_runs_a_kernel_only_with_a_measured_table(fake_device, weight, tmp_path, caplog):
    backend = _dispatch._device_backend()
    kind = "w8a8_int8" if weight.get("activation") else "int4"
    w = _weight(**weight)
    x = jax.random.normal(jax.random.key(5), (2, 64), jnp.float32)
    with caplog.at_level(logging.WARNING, logger="jquant"):
        y = ops.qdot(x, w)
        ops.qdot(x, w)
    assert _kernel_calls(fake_device) == []  # no table: XLA, and one notice on how to opt in
    notices = [r.getMessage() for r in caplog.records if "dispatch table" in r.getMessage()]
    assert len(notices) == 1 and backend in notices[0] and "JQUANT_DISPATCH_TABLE" in notices[0]
    # a measured table for this backend ships with jquant: the kernel runs
    _write_table(tmp_path / "measured" / f"{backend}.json", backend,
                 _rows(kind, {1: [(1, 2)], 8: [(1, 2)], 64: [(3, 2)]}))
    dt._shipped.cache_clear()
    try:
        y_kernel = ops.qdot(x, w)
        called = [c[:2] for c in _kernel_calls(fake_device)]
        assert called == [("w8a8" if "w8a8" in kind else "weight_only", 2)]
        ops.qdot(jnp.ones((64, 64), jnp.float32), w)  # above the measured limit: XLA
        assert len(_kernel_calls(fake_device)) == 1
    finally:
        dt._shipped.cache_clear()
    np.testing.assert_allclose(y_kernel, y, rtol=1e-5, atol=1e-5)


def test_env_table_turns_the_kernel_on(fake_device, tmp_path, monkeypatch):
    x = jnp.ones((4, 64), jnp.float32)
    ops.qdot(x, _weight())
    assert fake_device == []
    path = _write_table(tmp_path / "t.json", "gpu", _rows("int4", {8: [(1, 2)]}))
    monkeypatch.setenv("JQUANT_DISPATCH_TABLE", str(path))
    ops.qdot(x, _weight())
    assert fake_device == [("weight_only", 4)]


def test_cpu_auto_never_runs_a_kernel(monkeypatch):
    calls = []
    real_w8a8 = kernels.quantized_matmul_w8a8

    def w8a8(*a, backend=None, **k):
        calls.append(("w8a8", 0, backend))
        return real_w8a8(*a, backend=backend, **k)

    monkeypatch.setattr(kernels, "quantized_matmul", lambda *a, **k: calls.append(("kernel",)))
    monkeypatch.setattr(kernels, "quantized_matmul_w8a8", w8a8)
    dt.set_dispatch_table({(b, k): None for b in dt.BACKENDS for k in dt.KINDS})
    assert _dispatch._device_backend() == "cpu"
    for w in (_weight(), _weight("int8", activation="int8", group_size=None)):
        x = jnp.ones((3, 64), jnp.float32)
        assert "pallas_call" not in str(jax.make_jaxpr(lambda x, w=w: ops.qdot(x, w))(x))
    assert calls == [("w8a8", 0, "cpu")]  # the XLA int8 x int8 reference, no kernel


@pytest.mark.parametrize("qtype", ["int8", "fp8_e4m3"])
def test_forced_w8a8_kernel_on_cpu_matches_xla(qtype):
    """Path "kernel" on CPU interprets the W8A8 kernel (TPU int8, GPU fp8) through ops."""
    w = jax.random.normal(jax.random.key(3), (512, 256), jnp.float32)
    w = qarray.quantize_array(w, qtype, axis=0, activation=qtype, scale_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(4), (7, 512), jnp.float32)
    y_xla = ops.qdot(x, w)
    old = ops.set_matmul_path("kernel")
    try:
        y_kernel = ops.qdot(x, w)
        assert "pallas_call" in str(jax.make_jaxpr(ops.qdot)(x, w))
    finally:
        ops.set_matmul_path(old)
    np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-5, atol=1e-4)
