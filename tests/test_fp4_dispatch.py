"""FP4 matmuls through dispatch: no fused kernel decodes E2M1, so a forced kernel path says so
and the default path gives the NumPy product of the format's own definition."""

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
    return (values * np.repeat(scale, BLOCK[q.qtype], axis=1)).T


@pytest.mark.parametrize("name", list(BLOCK))
def test_fp4_qdot_runs_on_xla_and_equals_numpy(name):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((128, 24)).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    q = quantize_array(w, name, group_size=BLOCK[name])
    want = np.asarray(x, np.float64) @ _numpy_weight(q)
    old = ops.set_matmul_path("kernel")
    try:
        with pytest.raises(ValueError, match=f"no fused kernel applies .*QArray\\({name}"):
            ops.qdot(x, q)
        for path in ("auto", "xla"):
            ops.set_matmul_path(path)
            np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), want, rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())  # fmt: skip
    finally:
        ops.set_matmul_path(old)
