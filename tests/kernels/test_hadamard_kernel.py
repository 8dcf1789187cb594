"""The Hadamard kernel in Pallas interpret mode against dense NumPy matrices, and its
lowering for TPU (Mosaic) and GPU (Triton) by `jax.export`."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jquant.kernels import _gpu
from jquant.kernels._hadamard_matrix import factor

from jquant import kernels
from jquant.hadamard import hadamard

# SmolLM2's hidden (16 * 36), intermediate (128 * 12) and head (64) widths on TPU; GPU
# takes powers of two only.
CASES = [("tpu", 576), ("tpu", 1536), ("tpu", 64), ("gpu", 64), ("gpu", 512)]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _dense(n):
    p, hm = factor(n)
    assert np.array_equal(hm @ hm.T, hm.shape[0] * np.eye(hm.shape[0]))
    return np.kron(scipy.linalg.hadamard(p), hm).astype(np.float64) / np.sqrt(n)


@pytest.mark.parametrize("backend,n", CASES)
@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
@pytest.mark.parametrize("transpose", (False, True))
def test_kernel_matches_dense(backend, n, dtype, transpose):
    x = np.random.default_rng(n).standard_normal((32, n)).astype(np.float32)
    xj = jnp.asarray(x, dtype)
    got = kernels.hadamard_transform(xj, transpose=transpose, backend=backend, interpret=True)
    assert got.dtype == dtype
    h = _dense(n)
    want = np.asarray(xj, np.float64) @ (h if transpose else h.T)
    np.testing.assert_allclose(np.asarray(got, np.float64), want,
                               atol=TOL[dtype] * np.abs(want).max())  # fmt: skip


def test_forced_kernel_path_matches_xla():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 1536)), jnp.float32)
    np.testing.assert_allclose(np.asarray(hadamard(x, path="kernel")),
                               np.asarray(hadamard(x, path="xla")), atol=1e-4)  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="rows=20 must be a multiple of block_rows=16"):
        kernels.hadamard_transform(jnp.ones((20, 64)), interpret=True)
    with pytest.raises(ValueError, match="n=576 has no gpu"):
        kernels.hadamard_transform(jnp.ones((16, 576)), backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="n=18"):
        kernels.hadamard_transform(jnp.ones((16, 18)), interpret=True)
    with pytest.raises(ValueError, match="path='fast'"):
        hadamard(jnp.ones((16, 64)), path="fast")


@pytest.mark.parametrize("backend,n", CASES)
def test_kernel_lowers(backend, n):
    platform = {"tpu": "tpu", "gpu": "cuda"}[backend]
    disabled = [jax.export.DisabledSafetyCheck.custom_call(_gpu.TRITON_CUSTOM_CALL)]
    fn = jax.jit(lambda x: kernels.hadamard_transform(x, backend=backend))
    exported = jax.export.export(fn, platforms=[platform], disabled_checks=disabled)(
        jax.ShapeDtypeStruct((256, n), jnp.bfloat16))
    expected = "tpu_custom_call" if backend == "tpu" else _gpu.TRITON_CUSTOM_CALL
    assert expected in set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
