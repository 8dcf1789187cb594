"""FP4 matmuls through dispatch: the fused kernels decode E2M1 (on CPU the forced "kernel" path
interprets the TPU kernel) and take the scales as floats, so the kernel path, the XLA path and
the NumPy product of the format's own definition agree."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant import ops
from jquant.qarray import quantize_array

BLOCK = {"mxfp4": 32, "nvfp4": 16}


def _numpy_weight(q):
    """The (K, N) float64 weight of an FP4 QArray from its stored parts: E2M1 codes read by
    ml_dtypes, E8M0 scales as powers of two, or E4M3 codes times the per-tensor scale."""
    codes = np.asarray(q.codes(), np.uint8)
    values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    if q.qtype == "mxfp4":
        scale = 2.0 ** (np.asarray(q.scale).view(np.uint8).astype(np.float64) - 127)
    else:
        e4m3 = np.asarray(q.scale.qvalue).astype(np.float64)
        scale = e4m3 * float(np.asarray(q.scale.scale).reshape(()))
    return (values * np.repeat(scale, BLOCK[q.qtype], axis=1)[:, :q.k]).T


def _rel_err(y, want):
    return float(np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", list(BLOCK))
@pytest.mark.parametrize("x_dtype", (jnp.float32, jnp.bfloat16))
def test_fp4_qdot_kernel_equals_xla_and_numpy(name, x_dtype):
    # K = 520: 16 (32) whole blocks for the kernel, then a short block of 8 left to XLA.
    rng = np.random.default_rng(3)
    w = rng.standard_normal((520, 24)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((4, 520)), x_dtype)
    q = quantize_array(w, name, group_size=BLOCK[name])
    want = np.asarray(x, np.float64) @ _numpy_weight(q)
    old = ops.set_matmul_path("kernel")
    try:
        # on CPU the forced path interprets the TPU kernel: it must take part
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.qdot(x, q))(x))
        y_kernel = ops.qdot(x, q)
        ops.set_matmul_path("xla")
        y_xla = ops.qdot(x, q)
    finally:
        ops.set_matmul_path(old)
    assert y_kernel.dtype == y_xla.dtype == x_dtype
    # f32: the same products summed in another order; bf16: the weight rounded to bf16
    # (as both paths do) and the result rounded once more (one ulp is 2**-8 of |y|)
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2**-7}[x_dtype]
    assert _rel_err(y_kernel, want) < tol
    assert _rel_err(y_xla, want) < tol
    assert _rel_err(y_kernel, np.asarray(y_xla, np.float64)) < tol


def test_fp4_auto_path_on_cpu_is_xla():
    q = quantize_array(np.ones((64, 8), np.float32), "mxfp4", group_size=32)
    x = jnp.ones((2, 64), jnp.float32)
    old = ops.set_matmul_path("auto")
    try:
        assert "pallas_call" not in str(jax.make_jaxpr(lambda x: ops.qdot(x, q))(x))
        np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), 64.0)
    finally:
        ops.set_matmul_path(old)
