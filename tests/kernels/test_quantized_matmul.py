"""Quantized matmul kernels against their references, in Pallas interpret mode on CPU.

The weights come from `quantize_np` below, a NumPy quantizer written from the storage
contract, not from jquant's quantizer. The reference itself is checked against an independent NumPy
dequantization first, so a kernel that matches it matches the contract.
"""

from __future__ import annotations

import itertools
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jquant.kernels import (
    BlockSizes,
    quantized_matmul,
    quantized_matmul_reference,
)

from jquant import kernels

# ---- The NumPy quantizer (tests/kernels/np_quant.py): written from the storage contract,
# not from jquant's quantizer.


_npq = runpy.run_path(str(Path(__file__).with_name("np_quant.py")))
quantize_np, dequantize_np, grad_np = _npq["quantize_np"], _npq["dequantize_np"], _npq["grad_np"]


# ---- Tests

QTYPES = ("int8", "int4", "uint4", "nf4", "mxfp4", "nvfp4", "fp8_e4m3", "fp8_e5m2")
# (K, group_size): whole groups, a short last group (576 = 4 * 128 + 64), per-channel.
GEOMETRIES = ((256, 64), (576, 128), (576, None))
# FP4 at the block sizes the formats are defined with (mxfp4 32, nvfp4 16): whole blocks,
# and a short last block (584 = 18 * 32 + 8 = 36 * 16 + 8).
FP4_GEOMETRIES = {"mxfp4": ((512, 32), (584, 32)), "nvfp4": ((512, 16), (584, 16))}
# The Triton kernel's steps are >= 16 bytes a plane, so nvfp4's blocks of 16 (8 bytes) are
# not its to take (see TestGpuKernel); its E2M1 decoding is checked at groups it takes.
GPU_FP4_GEOMETRIES = {**FP4_GEOMETRIES, "nvfp4": ((512, 32), (584, None))}
# (M, N, x dtype): decode rows, odd M and N, a block of rows.
PROBLEMS = ((1, 128, jnp.bfloat16), (7, 200, jnp.float32), (16, 128, jnp.float32),
            (128, 200, jnp.bfloat16))
# Kernel and reference round the weight identically; they differ only in summation order,
# plus one final rounding of y for 16-bit outputs. Relative to max |y|.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 1.6e-2}


def make_inputs(qtype, k, group_size, m, n, x_dtype=jnp.float32, seed=0,
                scale_dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, s, zp = quantize_np(w, qtype, group_size, scale_dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    return x, jnp.asarray(q), jnp.asarray(s), None if zp is None else jnp.asarray(zp)


def assert_close(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.dtype)
    tol = TOLERANCE[jnp.dtype(y.dtype)]
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(y))
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= tol, err


def _cases(fp4_geometries=FP4_GEOMETRIES):
    """Every qtype x geometry, each with one (M, N, dtype) problem, rotating through them."""
    problems = itertools.cycle(PROBLEMS)
    return [(q, k, g, *next(problems)) for q in QTYPES
            for k, g in fp4_geometries.get(q, GEOMETRIES)]


class TestReference:
    @pytest.mark.parametrize("qtype", QTYPES)
    @pytest.mark.parametrize("k,group_size", GEOMETRIES + ((129, 32), (65, None), (584, 16)))
    def test_dequantize_matches_numpy(self, qtype, k, group_size):
        x, q, s, zp = make_inputs(qtype, k, group_size, 1, 24)
        got = kernels.dequantize(q, s, zp, qtype=qtype, k=k, group_size=group_size)
        want = dequantize_np(np.asarray(q), np.asarray(s),
                                      None if zp is None else np.asarray(zp),
                                      qtype, k, group_size)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("qtype", QTYPES)
    def test_quantization_error_is_small(self, qtype):
        # Pins the quantizer + reference pair: relative error of y vs the float matmul.
        rng = np.random.default_rng(1)
        w = rng.standard_normal((576, 64)).astype(np.float32)
        x = rng.standard_normal((8, 576)).astype(np.float32)
        g = {"mxfp4": 32, "nvfp4": 16}.get(qtype, 64)
        q, s, zp = quantize_np(w, qtype, g)
        y = quantized_matmul_reference(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s),
                                       None if zp is None else jnp.asarray(zp),
                                       qtype=qtype, k=576, group_size=g)
        err = np.linalg.norm(np.asarray(y) - x @ w) / np.linalg.norm(x @ w)
        bound = {"int8": 0.01, "fp8_e4m3": 0.04, "fp8_e5m2": 0.08}.get(qtype, 0.15)
        assert err < bound, err

    @pytest.mark.parametrize("qtype", ("int4", "uint4"))
    def test_xla_path_matches_reference(self, qtype):
        x, q, s, zp = make_inputs(qtype, 576, 128, 5, 40)
        ref = quantized_matmul_reference(x, q, s, zp, qtype=qtype, k=576, group_size=128)
        assert_close(quantized_matmul(x, q, s, zp, qtype=qtype, k=576, group_size=128,
                                      backend="cpu"), ref)


def _interpret_for(backend: str) -> bool:
    """Interpret mode unless pytest runs on that backend's hardware: on a GPU (TPU) machine
    the GPU (TPU) kernels below compile and run for real, against the same references."""
    return kernels.normalize_backend(None) != backend


GPU_INTERPRET = _interpret_for("gpu")


class KernelTest:
    """Run one backend's kernel (interpreted off its hardware); subclasses set BACKEND /
    INTERPRET."""

    BACKEND = ""
    INTERPRET = True
    # (K, group_size) of an int4 weight whose K is less than one kernel step.
    BELOW_ONE_BLOCK = (96, 32)  # TPU: 48 bytes, a step is >= 128

    def run(self, x, q, s, zp, qtype, k, group_size, **kw):
        return quantized_matmul(x, q, s, zp, qtype=qtype, k=k, group_size=group_size,
                                backend=self.BACKEND, interpret=self.INTERPRET, **kw)

    @pytest.mark.parametrize("qtype,k,group_size,m,n,x_dtype", _cases())
    def test_matches_reference(self, qtype, k, group_size, m, n, x_dtype):
        x, q, s, zp = make_inputs(qtype, k, group_size, m, n, x_dtype)
        ref = quantized_matmul_reference(x, q, s, zp, qtype=qtype, k=k, group_size=group_size)
        # every case reaches the kernel, not only the XLA fallback
        jaxpr = jax.make_jaxpr(lambda x: self.run(x, q, s, zp, qtype, k, group_size))(x)
        assert "pallas_call" in str(jaxpr)
        assert_close(self.run(x, q, s, zp, qtype, k, group_size), ref)

    @pytest.mark.parametrize("k,group_size", GEOMETRIES)
    @pytest.mark.parametrize("qtype", ("int8", "int4"))
    def test_kernel_is_used(self, qtype, k, group_size):
        # Guards the tests above: the geometries must reach the kernel, not only XLA.
        x, q, s, zp = make_inputs(qtype, k, group_size, 4, 128)
        jaxpr = jax.make_jaxpr(lambda x: self.run(x, q, s, zp, qtype, k, group_size))(x)
        assert "pallas_call" in str(jaxpr)

    @pytest.mark.parametrize("qtype,group_size", (("int4", 64), ("uint4", None), ("int8", 64)))
    def test_many_blocks(self, qtype, group_size):
        # Small explicit blocks: several M, N and K steps, so accumulation across K steps
        # and the index maps are exercised (the default blocks cover these K in one step).
        x, q, s, zp = make_inputs(qtype, 1088, group_size, 40, 256, jnp.float32, seed=3)
        ref = quantized_matmul_reference(x, q, s, zp, qtype=qtype, k=1088,
                                         group_size=group_size)
        sizes = BlockSizes(block_m=16, block_n=128, block_k=256)
        assert_close(self.run(x, q, s, zp, qtype, 1088, group_size, block_sizes=sizes), ref)

    def test_bf16_scales_and_batch_dims(self):
        x, q, s, zp = make_inputs("uint4", 256, 64, 6, 128, jnp.bfloat16,
                                  scale_dtype=jnp.bfloat16)
        x = x.reshape(2, 3, 256)
        ref = quantized_matmul_reference(x, q, s, zp, qtype="uint4", k=256, group_size=64)
        y = self.run(x, q, s, zp, "uint4", 256, 64)
        assert y.shape == (2, 3, 128)
        assert_close(y, ref)

    def test_k_below_one_block_falls_back_to_xla(self):
        k, group_size = self.BELOW_ONE_BLOCK
        x, q, s, zp = make_inputs("int4", k, group_size, 3, 128)
        jaxpr = jax.make_jaxpr(lambda x: self.run(x, q, s, zp, "int4", k, group_size))(x)
        assert "pallas_call" not in str(jaxpr)  # no kernel: all of K is XLA's
        ref = quantized_matmul_reference(x, q, s, zp, qtype="int4", k=k, group_size=group_size)
        assert_close(self.run(x, q, s, zp, "int4", k, group_size), ref)

    @pytest.mark.parametrize("qtype,group_size", (("int4", 128), ("uint4", 64), ("nf4", None),
                                                  ("mxfp4", 32)))
    def test_grad_matches_numpy(self, qtype, group_size):
        # The custom backward is the vjp of the reference, so the expected gradients are
        # computed without it: those of sum((x @ W) * cot) with W dequantized in NumPy.
        x, q, s, zp = make_inputs(qtype, 576, group_size, 8, 128)
        cot = jnp.asarray(np.random.default_rng(2).standard_normal((8, 128)), jnp.float32)
        args = (x, s) if zp is None else (x, s, zp)

        def loss(x, s, zp=None):
            y = quantized_matmul(x, q, s, zp, qtype=qtype, k=576, group_size=group_size,
                                 backend=self.BACKEND, interpret=self.INTERPRET)
            return jnp.sum(y * cot)

        got = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
        want = grad_np(np.asarray(x), np.asarray(cot), np.asarray(q), np.asarray(s),
                       None if zp is None else np.asarray(zp), qtype, 576, group_size)
        for name, g, w in zip(("x", "scale", "zero_point"), got, want):
            assert g.shape == w.shape, name
            np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-4, err_msg=name)


class TestTpuKernel(KernelTest):
    BACKEND = "tpu"
    INTERPRET = _interpret_for("tpu")


class TestTpuKernelSimulated:
    """TPU interpret mode with `pltpu.InterpretParams`: simulated VMEM, DMAs, NaN-poisoned
    uninitialized memory and out-of-bounds checks. Slower, so a few cases only."""

    @pytest.mark.parametrize("qtype,k,group_size", (("int4", 576, 128), ("uint4", 512, None),
                                                    ("nf4", 1088, 64), ("nvfp4", 584, 16)))
    def test_matches_reference(self, qtype, k, group_size):
        x, q, s, zp = make_inputs(qtype, k, group_size, 7, 200, jnp.bfloat16)
        ref = quantized_matmul_reference(x, q, s, zp, qtype=qtype, k=k, group_size=group_size)
        y = quantized_matmul(x, q, s, zp, qtype=qtype, k=k, group_size=group_size,
                             backend="tpu", interpret=pltpu.InterpretParams(),
                             block_sizes=BlockSizes(block_m=16, block_n=200, block_k=256))
        assert_close(y, ref)


class TestGpuKernel(KernelTest):
    BACKEND = "gpu"
    INTERPRET = GPU_INTERPRET
    # Triton steps one group (g = 32: 16 bytes) at a time, so K = 96, g = 32 runs the
    # kernel; per-channel K = 24 is 12 bytes, below the 16-byte minimum step.
    BELOW_ONE_BLOCK = (24, None)

    @pytest.mark.parametrize("qtype,k,group_size,m,n,x_dtype", _cases(GPU_FP4_GEOMETRIES))
    def test_matches_reference(self, qtype, k, group_size, m, n, x_dtype):
        super().test_matches_reference(qtype, k, group_size, m, n, x_dtype)

    def test_nvfp4_blocks_of_16_are_not_taken(self):
        x, q, s, zp = make_inputs("nvfp4", 512, 16, 2, 128)
        kw = dict(qtype="nvfp4", k=512, group_size=16, backend="gpu")
        assert not kernels.can_use_gpu_kernel(x, q, s, zp, gpu_kernel="triton", **kw)
        assert not kernels.can_use_gpu_kernel(x, q, s, zp, gpu_kernel="mosaic", **kw)
        with pytest.raises(ValueError, match="gives 8 bytes per group"):
            quantized_matmul(x, q, s, zp, interpret=True, gpu_kernel="triton", **kw)

    @pytest.mark.parametrize("m", (1, 3, 8, 9, 33))
    def test_decode_and_prefill_paths(self, m):
        # M <= 8 takes the FMA path, M > 8 the dot path; both pad M to a power of two.
        x, q, s, zp = make_inputs("int4", 512, 128, m, 192, jnp.bfloat16)
        ref = quantized_matmul_reference(x, q, s, zp, qtype="int4", k=512, group_size=128)
        assert_close(self.run(x, q, s, zp, "int4", 512, 128), ref)


class TestW8A8:
    @pytest.mark.parametrize("m,k,n", ((1, 576, 200), (40, 1088, 256)))
    @pytest.mark.parametrize("interpret", (True, pltpu.InterpretParams()))
    def test_tpu_kernel_matches_reference(self, m, k, n, interpret):
        rng = np.random.default_rng(4)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        q, s, _ = quantize_np(rng.standard_normal((k, n)), "int8", None)
        xq, xs = kernels.quantize_activations(x)
        q, s = jnp.asarray(q), jnp.asarray(s)
        ref = kernels.quantized_matmul_w8a8_reference(xq, xs, q, s, out_dtype=jnp.float32)
        y = kernels.quantized_matmul_w8a8(
            xq, xs, q, s, out_dtype=jnp.float32, backend="tpu", interpret=interpret,
            block_sizes=BlockSizes(block_m=32, block_n=128, block_k=256))
        assert_close(y, ref)
        # and W8A8 stays close to the float product it approximates
        w = np.asarray(q, np.float32) * np.asarray(s)
        exact = np.asarray(x) @ w.T
        assert np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact) < 0.02

    def test_rejects_group_scales(self):
        xq = jnp.zeros((2, 256), jnp.int8)
        with pytest.raises(ValueError, match="per-channel"):
            kernels.quantized_matmul_w8a8(xq, jnp.ones((2, 1)), jnp.zeros((8, 256), jnp.int8),
                                          jnp.ones((8, 2)), backend="tpu")


class TestW8A8Gpu:
    """The GPU W8A8 kernel (Triton lowering) in interpret mode, int8 and fp8 e4m3."""

    # K = 1000: a K tail of 8 past the last 32-wide block; N = 201: 9 rows past the last
    # 16-wide block (both finished by XLA); M from decode (padded to 16 rows) to prefill.
    @pytest.mark.parametrize("dtype", (jnp.int8, jnp.float8_e4m3fn))
    @pytest.mark.parametrize("m", (1, 7, 16, 128))
    def test_matches_reference(self, m, dtype):
        k, n = 1000, 201
        rng = np.random.default_rng(m)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
        q, s = kernels.quantize_activations(w, dtype)  # per row of (N, K): per channel
        xq, xs = kernels.quantize_activations(x, dtype)
        ref = kernels.quantized_matmul_w8a8_reference(xq, xs, q, s, out_dtype=jnp.float32)
        y = kernels.quantized_matmul_w8a8(xq, xs, q, s, out_dtype=jnp.float32, backend="cuda",
                                          interpret=GPU_INTERPRET)
        assert_close(y, ref)
        exact = np.asarray(x) @ np.asarray(w).T  # and close to the float product
        bound = 0.02 if dtype == jnp.int8 else 0.06
        assert np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact) < bound

    def test_bf16_output_batch_dims_and_explicit_blocks(self):
        rng = np.random.default_rng(9)
        xq, xs = kernels.quantize_activations(jnp.asarray(rng.standard_normal((2, 3, 256))))
        q, s = kernels.quantize_activations(jnp.asarray(rng.standard_normal((64, 256))))
        ref = kernels.quantized_matmul_w8a8_reference(xq, xs, q, s)
        y = kernels.quantized_matmul_w8a8(xq, xs, q, s, backend="gpu", interpret=GPU_INTERPRET,
                                          block_sizes=BlockSizes(block_m=16, block_n=32,
                                                                 block_k=64))
        assert_close(y, ref)
        with pytest.raises(ValueError, match="power of two"):
            kernels.quantized_matmul_w8a8(xq, xs, q, s, backend="gpu", interpret=GPU_INTERPRET,
                                          block_sizes=BlockSizes(block_m=16, block_n=48,
                                                                 block_k=64))

    def test_wrapper_rejects_unpadded_shapes(self):
        from jquant.kernels import _gpu

        with pytest.raises(ValueError, match="k=100 must be a multiple of block_k=32"):
            _gpu.w8a8_matmul_gpu(jnp.zeros((16, 100), jnp.int8), jnp.ones(16),
                                 jnp.zeros((32, 100), jnp.int8), jnp.ones(32), block_m=16,
                                 block_n=16, block_k=32, out_dtype=jnp.float32)

    def test_predicate_and_dtype_rules(self):
        xq, xs = jnp.zeros((2, 64), jnp.int8), jnp.ones((2, 1))
        q, s = jnp.zeros((32, 64), jnp.int8), jnp.ones((32, 1))
        assert kernels.can_use_gpu_w8a8(xq, xs, q, s, backend="cuda")
        assert not kernels.can_use_gpu_w8a8(xq, xs, q, s, backend="cpu")
        assert not kernels.can_use_gpu_w8a8(xq, xs, q, jnp.ones((32, 2)), backend="gpu")
        with pytest.raises(ValueError, match="same dtype"):
            kernels.quantized_matmul_w8a8(xq, xs, q.astype(jnp.float8_e4m3fn), s,
                                          backend="gpu")


class TestErrors:
    def _inputs(self, qtype="int4"):
        return make_inputs(qtype, 256, 64, 2, 128)

    def _call(self, x, q, s, zp, qtype="int4", k=256, group_size=64, **kw):
        return quantized_matmul(x, q, s, zp, qtype=qtype, k=k, group_size=group_size, **kw)

    def test_x_k_mismatch(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match="x has 256 elements along K"):
            self._call(x, q, s, zp, k=512)

    def test_qvalue_bytes_mismatch(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match="qvalue has 120 bytes"):
            self._call(x, q[:, :120], s, zp)

    def test_scale_shape(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match=r"scale.shape=\(128, 2\)"):
            self._call(x, q, s[:, :2], zp)

    def test_qvalue_dtype(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match="stored as uint8"):
            self._call(x, q.astype(jnp.int8), s, zp)

    def test_zero_point_rules(self):
        x, q, s, _ = self._inputs("uint4")
        with pytest.raises(ValueError, match="needs a zero_point"):
            self._call(x, q, s, None, qtype="uint4")
        x, q, s, _ = self._inputs("int4")
        with pytest.raises(ValueError, match="zero_point must be None"):
            self._call(x, q, s, s)

    def test_e8m0_scale_is_refused(self):
        # mxfp4 stores float8_e8m0fnu scales; the kernels take floats (jquant.ops converts)
        x, q, s, zp = make_inputs("mxfp4", 256, 32, 2, 128)
        with pytest.raises(ValueError, match="scale.dtype=float8_e8m0fnu must be bfloat16"):
            self._call(x, q, s.astype(jnp.float8_e8m0fnu), zp, qtype="mxfp4", group_size=32)

    def test_unknown_qtype(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match="unknown qtype='int3'"):
            self._call(x, q, s, zp, qtype="int3")

    def test_float16_x_has_no_tpu_kernel(self):
        x, q, s, zp = self._inputs()
        x = x.astype(jnp.float16)
        assert not kernels.can_use_tpu_kernel(x, q, s, zp, qtype="int4", k=256, group_size=64,
                                              backend="tpu")
        with pytest.raises(ValueError, match="no TPU kernel"):
            self._call(x, q, s, zp, backend="tpu", interpret=True)

    def test_gpu_rejects_tiny_groups(self):
        x, q, s, zp = make_inputs("int4", 256, 16, 2, 128)
        assert not kernels.can_use_gpu_kernel(x, q, s, zp, qtype="int4", k=256, group_size=16,
                                              backend="gpu")
        with pytest.raises(ValueError, match="power of two"):
            self._call(x, q, s, zp, group_size=16, backend="gpu", interpret=True)

    def test_illegal_explicit_block_sizes(self):
        x, q, s, zp = self._inputs()
        with pytest.raises(ValueError, match="block_k=64 must give a multiple of 128 bytes"):
            self._call(x, q, s, zp, backend="tpu", interpret=True,
                       block_sizes=BlockSizes(block_m=16, block_n=128, block_k=64))
        with pytest.raises(ValueError, match="block_n=96 must be a power of two"):
            self._call(x, q, s, zp, backend="gpu", interpret=True,
                       block_sizes=BlockSizes(block_m=16, block_n=96, block_k=64))

    def test_block_sizes_validate(self):
        with pytest.raises(ValueError, match="block_k must be a positive int"):
            BlockSizes(block_m=8, block_n=128, block_k=0)


class TestPredicates:
    def test_backend_selects(self):
        x, q, s, zp = make_inputs("int4", 256, 64, 2, 128, jnp.bfloat16)
        kw = dict(qtype="int4", k=256, group_size=64)
        assert kernels.can_use_tpu_kernel(x, q, s, zp, backend="tpu", **kw)
        assert not kernels.can_use_tpu_kernel(x, q, s, zp, backend="cpu", **kw)
        assert kernels.can_use_gpu_kernel(x, q, s, zp, backend="cuda", **kw)
        assert not kernels.can_use_gpu_kernel(x, q, s, zp, backend="tpu", **kw)
        # invalid inputs are never "usable"
        assert not kernels.can_use_tpu_kernel(x, q[:, :8], s, zp, backend="tpu", **kw)

    def test_package_exports(self):
        for name in ("quantized_matmul", "quantized_matmul_reference", "can_use_tpu_kernel",
                     "can_use_gpu_kernel", "BlockSizes", "quantized_matmul_w8a8",
                     "can_use_gpu_w8a8"):
            assert hasattr(kernels, name)
        assert kernels.get_block_sizes("tpu", 1).block_m == 16


def test_jax_without_triton_backend_is_a_clear_no(monkeypatch):
    """A JAX whose Pallas lost its Triton backend: the GPU predicates say no, and forcing
    the Triton kernel raises with the reason instead of failing inside Pallas."""
    from jquant.kernels import _gpu

    monkeypatch.setattr(_gpu, "TRITON_AVAILABLE", False)
    x, q, s, zp = make_inputs("int4", 256, 64, 2, 128)
    kw = dict(qtype="int4", k=256, group_size=64, backend="gpu", gpu_kernel="triton")
    assert not kernels.can_use_gpu_kernel(x, q, s, zp, **kw)
    with pytest.raises(ValueError, match="no Pallas Triton backend"):
        quantized_matmul(x, q, s, zp, interpret=True, **kw)
    xq, xs = kernels.quantize_activations(jnp.ones((2, 256)))
    wq, ws = kernels.quantize_activations(jnp.ones((128, 256)))
    assert not kernels.can_use_gpu_w8a8(xq, xs, wq, ws, backend="gpu", gpu_kernel="triton")
    with pytest.raises(ValueError, match="no Pallas Triton backend"):
        kernels.quantized_matmul_w8a8(xq, xs, wq, ws, backend="gpu", gpu_kernel="triton",
                                      interpret=True)
