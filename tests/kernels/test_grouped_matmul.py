"""The MoE grouped-matmul kernels against a NumPy loop over experts, in Pallas interpret mode
on CPU, and their lowering for TPU and CUDA by `jax.export`.

Weights come from `np_quant.py`'s `quantize_np`, expert by expert (written from the storage
contract, not from jquant's quantizer), and the reference dequantizes them with
`dequantize_np` and multiplies each expert's rows in float64.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels import _gpu
from jquant.kernels._formats import STORAGE_DTYPES, num_groups, packed_k

from jquant import _dispatch, _grouped, kernels
from jquant.qarray import quantize_array

_npq = runpy.run_path(str(Path(__file__).with_name("np_quant.py")))
quantize_np, dequantize_np = _npq["quantize_np"], _npq["dequantize_np"]

SIZES = {
    "mixed": [3, 0, 21, 1, 9],  # 34 of 40 rows; the last 6 belong to no group
    "one_takes_all": [0, 0, 40, 0, 0],
    "all_empty": [0, 0, 0, 0, 0],
}
M = 40
# (qtype, K, group_size): int8 per-channel and grouped, the 4-bit formats grouped; K whole
# kernel steps (TPU: 128-byte multiples; GPU: a power-of-two group of >= 16 bytes a step).
CASES = (("int8", 256, None), ("int8", 256, 128), ("int4", 256, 128), ("uint4", 512, 64),
         ("nf4", 256, 64))


def _stack(rng, qtype, k, group_size, n, experts=5):
    """NumPy-quantized experts stacked: (qvalue, scale, zero_point) and their float64
    dequantization (E, K, N)."""
    parts = [quantize_np(rng.standard_normal((k, n)).astype(np.float32), qtype, group_size)
             for _ in range(experts)]
    q = np.stack([p[0] for p in parts])
    s = np.stack([p[1] for p in parts])
    zp = None if parts[0][2] is None else np.stack([p[2] for p in parts])
    w = np.stack([dequantize_np(*p, qtype, k, group_size) for p in parts]).astype(np.float64)
    return q, s, zp, w


def np_grouped(x, w, sizes):
    y = np.zeros((x.shape[0], w.shape[2]))
    start = 0
    for e, g in enumerate(sizes):
        y[start:start + g] = x[start:start + g].astype(np.float64) @ w[e]
        start += g
    return y


def _interpret_for(backend: str) -> bool:
    """Interpret mode unless pytest runs on that backend's hardware."""
    return kernels.normalize_backend(None) != backend


class GroupedKernelTest:
    BACKEND = ""
    INTERPRET = True
    TM = None

    @pytest.mark.parametrize("qtype,k,group_size", CASES)
    @pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
    def test_matches_numpy(self, qtype, k, group_size, sizes):
        rng = np.random.default_rng(0)
        q, s, zp, w = _stack(rng, qtype, k, group_size, n=128)
        x = rng.standard_normal((M, k)).astype(np.float32)
        y = kernels.grouped_matmul(
            jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), None if zp is None else
            jnp.asarray(zp), jnp.asarray(sizes, jnp.int32), qtype=qtype, k=k,
            group_size=group_size, backend=self.BACKEND, interpret=self.INTERPRET, tm=self.TM)
        np.testing.assert_allclose(y, np_grouped(x, w, sizes), rtol=1e-4, atol=1e-3)

    def test_bfloat16_rows(self):
        rng = np.random.default_rng(1)
        q, s, zp, w = _stack(rng, "int4", 256, 128, n=128)
        x = jnp.asarray(rng.standard_normal((M, 256)), jnp.bfloat16)
        sizes = SIZES["mixed"]
        y = kernels.grouped_matmul(x, jnp.asarray(q), jnp.asarray(s, jnp.bfloat16), None,
                                   jnp.asarray(sizes, jnp.int32), qtype="int4", k=256,
                                   group_size=128, backend=self.BACKEND,
                                   interpret=self.INTERPRET)
        assert y.dtype == jnp.bfloat16
        want = np_grouped(np.asarray(x.astype(jnp.float32)), w, sizes)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=3e-2,
                                   atol=0.5)

    def test_short_last_group_is_left_to_xla(self):
        """K = 288 with groups of 128: a short last group the kernels do not take."""
        x = jnp.zeros((M, 288), jnp.float32)
        q = jnp.zeros((5, 128, packed_k("int4", 288, 128)), jnp.uint8)
        s = jnp.ones((5, 128, num_groups(288, 128)), jnp.float32)
        sizes = jnp.asarray(SIZES["mixed"], jnp.int32)
        kw = dict(qtype="int4", k=288, group_size=128, backend=self.BACKEND)
        assert not kernels.can_use_grouped_matmul(x, q, s, None, sizes, **kw)
        with pytest.raises(ValueError, match="short last group"):
            kernels.grouped_matmul(x, q, s, None, sizes, **kw, interpret=self.INTERPRET)


class TestTpuGrouped(GroupedKernelTest):
    BACKEND = "tpu"
    INTERPRET = _interpret_for("tpu")


class TestGpuGrouped(GroupedKernelTest):
    BACKEND = "gpu"
    INTERPRET = _interpret_for("gpu")
    TM = 32  # two rows of tiles in the "mixed" split's 21-row group


def test_reference_matches_numpy():
    rng = np.random.default_rng(2)
    q, s, zp, w = _stack(rng, "uint4", 256, 64, n=64)
    x = rng.standard_normal((M, 256)).astype(np.float32)
    sizes = SIZES["mixed"]
    y = kernels.grouped_matmul_reference(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s),
                                         jnp.asarray(zp), jnp.asarray(sizes, jnp.int32),
                                         qtype="uint4", k=256, group_size=64)
    np.testing.assert_allclose(y, np_grouped(x, w, sizes), rtol=1e-4, atol=1e-3)


def test_bad_stack_is_named():
    x = jnp.zeros((M, 256), jnp.float32)
    q = jnp.zeros((5, 128, 256), jnp.int8)
    s = jnp.ones((5, 128, 1), jnp.float32)
    kw = dict(qtype="int8", k=256, group_size=None, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="group_sizes must be int"):
        kernels.grouped_matmul(x, q, s, None, jnp.zeros((4,), jnp.int32), **kw)
    with pytest.raises(ValueError, match="scale must be"):
        kernels.grouped_matmul(x, q, s[:3], None, jnp.zeros((5,), jnp.int32), **kw)
    with pytest.raises(ValueError, match="qvalue must be a stack"):
        kernels.grouped_matmul(x, q[0], s, None, jnp.zeros((5,), jnp.int32), **kw)


def test_forced_kernel_path_runs_the_interpreted_kernel():
    """`set_matmul_path("kernel")` on CPU sends an MoE grouped matmul through the TPU kernel
    in interpret mode; "auto" keeps it on XLA. Both match NumPy."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 256, 128)).astype(np.float32)
    qa = quantize_array(jnp.asarray(w), "int4", axis=1, group_size=128)
    x = rng.standard_normal((M, 256)).astype(np.float32)
    sizes = SIZES["mixed"]
    want = np_grouped(x, np.asarray(qa.dequantize(), np.float64), sizes)
    old = _dispatch.set_matmul_path("kernel")
    try:
        jaxpr = str(jax.make_jaxpr(_grouped.grouped_matmul)(
            jnp.asarray(x), qa, jnp.asarray(sizes, jnp.int32)))
        assert "pallas_call" in jaxpr and "grouped_matmul_int4" in jaxpr
        y = _grouped.grouped_matmul(jnp.asarray(x), qa, jnp.asarray(sizes, jnp.int32))
    finally:
        _dispatch.set_matmul_path(old)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-3)
    jaxpr = str(jax.make_jaxpr(lambda *a: _grouped.grouped_matmul(*a))(  # a new trace
        jnp.asarray(x), qa, jnp.asarray(sizes, jnp.int32)))
    assert "pallas_call" not in jaxpr
    np.testing.assert_allclose(_grouped.grouped_matmul(jnp.asarray(x), qa, jnp.asarray(
        sizes, jnp.int32)), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend,platform,marker", [
    ("tpu", "tpu", "tpu_custom_call"), ("gpu", "cuda", _gpu.TRITON_CUSTOM_CALL)])
@pytest.mark.parametrize("qtype,group_size", [("int8", None), ("int4", 128), ("uint4", 64),
                                              ("nf4", 64)])
@pytest.mark.parametrize("m", (8, 256))
def test_lowers(backend, platform, marker, qtype, group_size, m):
    """Qwen3-30B-A3B's expert shape (K = 2048, N = 768) over 8 experts, decode and prefill."""
    k, n, experts = 2048, 768, 8
    q = jnp.zeros((experts, n, packed_k(qtype, k, group_size)), STORAGE_DTYPES[qtype])
    s = jnp.ones((experts, n, num_groups(k, group_size)), jnp.bfloat16)
    zp = s if qtype == "uint4" else None

    def f(x, q, s, zp, sizes):
        return kernels.grouped_matmul(x, q, s, zp, sizes, qtype=qtype, k=k,
                                      group_size=group_size, backend=backend)

    disabled = [jax.export.DisabledSafetyCheck.custom_call(_gpu.TRITON_CUSTOM_CALL)]
    exported = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=disabled)(
        jnp.zeros((m, k), jnp.bfloat16), q, s, zp, jnp.zeros((experts,), jnp.int32))
    assert marker in set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
