"""The report's output error of a kernel, taken a chunk of columns at a time, against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.calib import _layer
from jquant.calib.stats import from_inputs
from jquant.qarray import quantize_array


@pytest.mark.parametrize("cols", [None, 1, 6, 9], ids=lambda c: f"cols={c}")
def test_output_error_equals_numpy(cols, monkeypatch):
    k, n = 48, 18
    if cols:  # chunks of the largest divisor of n at most `cols` wide: 1, 6 and 9 columns
        monkeypatch.setattr(_layer, "_ERROR_BYTES", 4 * k * cols)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, k)).astype(np.float32) * rng.uniform(0.1, 3, k).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    q = quantize_array(jnp.asarray(w), "int4", group_size=16)
    calib = from_inputs(jnp.asarray(x))
    h = np.asarray(calib.hessian)
    out, werr = _layer._output_error(jnp.asarray(w), q, calib)
    d = np.asarray(q.dequantize(), np.float64) - w
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    want = np.trace(d.T @ h64 @ d) / np.trace(w64.T @ h64 @ w64)
    assert float(out) == pytest.approx(want, rel=1e-5)
    assert float(werr) == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w64), rel=1e-5)
