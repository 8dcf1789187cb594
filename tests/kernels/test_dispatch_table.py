"""The M-based kernel-or-XLA dispatch table, and that `jquant.ops` obeys it.

No device here: the ops tests pretend to be on a GPU by replacing the backend probe and the
kernel entry point, and check which path each M takes. Nothing here measures speed.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels import dispatch_table as dt

from jquant import kernels, ops, qarray


@pytest.fixture(autouse=True)
def _clean_table(monkeypatch):
    monkeypatch.delenv("JQUANT_DISPATCH_TABLE", raising=False)
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


def test_defaults_limit_weight_only_not_w8a8():
    assert dt.prefer_kernel("gpu", "int4", 1) and dt.prefer_kernel("tpu", "nf4", 256)
    assert not dt.prefer_kernel("gpu", "int4", 257)
    assert dt.prefer_kernel("gpu", "w8a8_fp8", 1 << 20)
    assert dt.kernel_max_m("tpu", "w8a8_int8") is None


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
    assert dt.kernel_max_m("gpu", "int4") == dt.DEFAULT_TABLE[("gpu", "int4")]  # unmeasured kind


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
    assert dt.kernel_max_m("gpu", "int4") == 4 and dt.kernel_max_m("gpu", "int8") == 256


# ---- jquant.ops obeys the table ---------------------------------------------------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """ops sees a GPU whose weight-only kernel takes everything; calls are recorded and
    answered by the reference, so results stay checkable."""
    calls = []

    def fake_kernel(x, q, s, zp, **kw):
        calls.append(("weight_only", x.shape[0]))
        return kernels.quantized_matmul_reference(x, q, s, zp, **kw)

    def fake_w8a8(x, codes, scale, *, backend=None, interpret=False):
        calls.append(("w8a8", x.shape[0], backend))
        return real_int8(x, codes, scale, backend="cpu")

    real_int8 = ops._act.int8_matmul
    monkeypatch.setattr(ops, "_device_backend", lambda: "gpu")
    monkeypatch.setattr(kernels, "can_use_gpu_kernel", lambda *a, **k: True)
    monkeypatch.setattr(kernels, "can_use_gpu_w8a8", lambda *a, **k: True)
    monkeypatch.setattr(kernels, "quantized_matmul", fake_kernel)
    monkeypatch.setattr(ops._act, "int8_matmul", fake_w8a8)
    return calls


def _weight(qtype="int4", activation=None, group_size=32):
    w = jax.random.normal(jax.random.key(0), (64, 48), jnp.float32)
    return qarray.quantize_array(w, qtype, axis=0, group_size=group_size, activation=activation,
                                 scale_dtype=jnp.float32)


@pytest.mark.parametrize("m,expect_kernel", [(1, True), (4, True), (5, False), (64, False)])
def test_ops_follows_the_limit(fake_gpu, m, expect_kernel):
    dt.set_dispatch_table({("gpu", "int4"): 4})
    w = _weight()
    x = jax.random.normal(jax.random.key(1), (m, 64), jnp.float32)
    y = ops.qdot(x, w)
    assert fake_gpu == ([("weight_only", m)] if expect_kernel else [])
    np.testing.assert_allclose(y, x @ w.dequantize(), rtol=1e-5, atol=1e-5)


def test_forced_kernel_path_ignores_the_limit(fake_gpu):
    dt.set_dispatch_table({("gpu", "int4"): 0})
    x = jnp.ones((8, 64), jnp.float32)
    old = ops.set_matmul_path("kernel")
    try:
        ops.qdot(x, _weight())
    finally:
        ops.set_matmul_path(old)
    assert fake_gpu == [("weight_only", 8)]
    ops.qdot(x, _weight())  # auto: limit 0 means XLA at every M
    assert fake_gpu == [("weight_only", 8)]


def test_w8a8_limit_and_xla_path(fake_gpu):
    w = _weight("int8", activation="int8", group_size=None)
    x = jax.random.normal(jax.random.key(2), (16, 64), jnp.float32)
    y_kernel = ops.qdot(x, w)  # default: W8A8 kernels at every M
    dt.set_dispatch_table({("gpu", "w8a8_int8"): 8})
    y_xla = ops.qdot(x, w)
    # the kernel on the device, then XLA's int8 x int8 (the reference backend)
    assert fake_gpu == [("w8a8", 16, "gpu"), ("w8a8", 16, "cpu")]
    np.testing.assert_allclose(y_kernel, y_xla, rtol=1e-6)


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
