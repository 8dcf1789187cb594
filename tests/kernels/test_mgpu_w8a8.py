"""The Mosaic GPU (Hopper wgmma) W8A8 kernel, `kernels/_mgpu_w8a8.py`, checked on CPU.

Numerics run in the Mosaic GPU interpreter (`InterpretGPUParams`: simulated GMEM / SMEM,
TMA copies, barriers, `wgmma`, NaN-poisoned uninitialized memory); lowering is checked
with `jax.export(..., platforms=["cuda"])`, which runs the Mosaic GPU Python lowering
(layouts, swizzles, tilings, the 8-bit K-major wgmma operands) but not ptxas: nothing
here has run on a GPU. On a Hopper GPU the same tests run the compiled kernel.

Tolerances, as max |y - ref| / max |ref| with f32 outputs:

* int8: the kernel's int32 sums are exact, like the reference's; the two differ only by
  the f32 scale products and, with split K or an XLA K tail, by adding a few f32 partial
  results (each a few ulps): `INT8_TOL` = 1e-6, about 8 f32 ulps.
* fp8: every e4m3 x e4m3 product is exact in f32; the sums are f32 in another order (the
  kernel's K steps, split K, the XLA K tail): `FP8_TOL` = 1e-5. A wrong scale, a row or
  column off by one, a dropped K step or an unscaled tail misses these by orders of
  magnitude.
"""

from __future__ import annotations

import importlib
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels import BlockSizes
from jquant.kernels import _mgpu_w8a8 as mw
from jquant.kernels.w8a8 import quantize_activations, quantized_matmul_w8a8_reference

qm = importlib.import_module("jquant.kernels.quantized_matmul")
w8a8 = importlib.import_module("jquant.kernels.w8a8")

# On a Hopper GPU the kernel compiles and runs for real; elsewhere it runs in the Mosaic GPU
# interpreter, a private module of JAX 0.10 (imported here only when it is needed).
ON_HOPPER = qm._is_hopper_or_newer()
if not ON_HOPPER:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams


def _interpret():
    return False if ON_HOPPER else InterpretGPUParams()


INT8, FP8 = jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)
DTYPES = (INT8, FP8)
TOL = {INT8: 1e-6, FP8: 1e-5}  # see the module docstring


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    # The interpreter keeps global state that an exception inside a kernel leaves dirty.
    if not ON_HOPPER:
        mgpu_interpret.reset_gpu_interpret_mode_state()
    yield


def make_inputs(m, n, k, dtype, seed=0, scale_dtype=jnp.float32):
    """xq, x_scale (per row), qvalue, w_scale (per channel), via `quantize_activations`."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.5, 2.0, (n, 1)), jnp.float32)
    xq, xs = quantize_activations(x, dtype)
    wq, ws = quantize_activations(w, dtype)
    return xq, xs, wq, ws.astype(scale_dtype)


def assert_close(y, ref, tol):
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.all(np.isfinite(y))
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= tol, err


# ---- Rules and errors

class TestRules:
    @pytest.mark.parametrize("m,n,k,dtype,expected", (
        (1, 256, 576, INT8, None),
        (7, 200, 576, FP8, None),
        (4096, 4096, 4096, INT8, None),
        (1, 8, 32, FP8, None),  # smallest: all XLA (no whole tile), still legal
        (3, 256, 576, jnp.bfloat16, "int8 or float8_e4m3fn"),
        (3, 256, 576, jnp.float8_e5m2, "int8 or float8_e4m3fn"),
        (3, 256, 576, jnp.uint8, "int8 or float8_e4m3fn"),
        (3, 256, 1000, INT8, "multiple of 32"),
        (3, 256, 16, FP8, "multiple of 32"),
        (3, 201, 576, INT8, "multiple of 8"),
        (0, 256, 576, INT8, "empty"),
    ))
    def test_unsupported_reason(self, m, n, k, dtype, expected):
        reason = mw.unsupported_reason(m, n, k, dtype)
        if expected is None:
            assert reason is None
        else:
            assert expected in reason

    @pytest.mark.parametrize("xd,wd", ((INT8, FP8), (FP8, INT8), (jnp.bfloat16, jnp.bfloat16)))
    def test_rejects_dtypes(self, xd, wd):
        xq, xs, wq, ws = make_inputs(4, 64, 64, INT8)
        with pytest.raises(ValueError, match="same dtype"):
            mw.w8a8_matmul_mgpu(xq.astype(xd), xs, wq.astype(wd), ws, out_dtype=jnp.float32)

    def test_rejects_shapes(self):
        xq, xs, wq, ws = make_inputs(4, 64, 64, INT8)
        call = lambda *a: mw.w8a8_matmul_mgpu(*a, out_dtype=jnp.float32)
        with pytest.raises(ValueError, match="disagree"):
            call(xq[:, :32], xs, wq, ws)
        with pytest.raises(ValueError, match="disagree"):
            call(xq[None], xs, wq, ws)
        with pytest.raises(ValueError, match="x_scale"):
            call(xq, xs[:3], wq, ws)
        with pytest.raises(ValueError, match="per-channel"):
            call(xq, xs, wq, jnp.ones((64, 2)))
        with pytest.raises(ValueError, match="multiple of 32"):
            call(xq[:, :48], xs, wq[:, :48], ws)
        with pytest.raises(ValueError, match="multiple of 8"):
            call(xq, xs, wq[:60], ws[:60])

    def test_strict_block_sizes(self):
        plan = lambda m, bs: mw.plan_w8a8_mgpu(m, 256, 1024, INT8, bs, strict=True)
        with pytest.raises(ValueError, match="64 or 128"):
            plan(1, BlockSizes(block_m=16, block_n=96, block_k=128))  # swap: block_n is tr
        with pytest.raises(ValueError, match="64 or 128"):
            plan(128, BlockSizes(block_m=256, block_n=128, block_k=128))
        with pytest.raises(ValueError, match="power of two"):
            plan(128, BlockSizes(block_m=128, block_n=96, block_k=128))
        with pytest.raises(ValueError, match="power of two"):
            plan(1, BlockSizes(block_m=16, block_n=64, block_k=96))


class TestPlan:
    @pytest.mark.parametrize("m", (1, 7, 16, 33, 63, 64, 128, 1000))
    @pytest.mark.parametrize("n", (64, 200, 4096))
    @pytest.mark.parametrize("k", (96, 576, 4096))
    def test_tiles_fit_the_hardware(self, m, n, k):
        for bs in (None, BlockSizes(block_m=8, block_n=64, block_k=64),
                   BlockSizes(block_m=256, block_n=256, block_k=1024)):
            p = mw.plan_w8a8_mgpu(m, n, k, FP8, bs or mw.default_block_sizes(m), strict=False)
            assert p.swap == (m < 64)
            assert p.tr in (64, 128) and p.tc in (16, 32, 64, 128, 256)
            assert p.tr * p.tc <= mw.MAX_ACC
            assert mw._smem_bytes(p.tr, p.tc, p.tk) <= mw.SMEM_BUDGET
            assert p.tk in (32, 64, 128, 256) and p.k_main == k  # non-strict: tk divides K
            m_tile, n_tile = (p.tc, p.tr) if p.swap else (p.tr, p.tc)
            assert p.m_pad % m_tile == 0 and 0 <= p.m_pad - m < m_tile
            assert p.n_main == n // n_tile * n_tile
            assert (p.k_main // p.tk) % p.k_splits == 0
            if p.swap:
                assert p.tc <= max(16, 1 << (m - 1).bit_length())  # decode: 16 columns

    def test_decode_splits_k(self):
        p = mw.plan_w8a8_mgpu(1, 128, 4096, INT8, mw.default_block_sizes(1), strict=False)
        assert p.swap and p.tc == 16 and p.k_splits > 1

    def test_strict_block_k_leaves_a_k_tail(self):
        p = mw.plan_w8a8_mgpu(7, 200, 576, INT8,
                              BlockSizes(block_m=16, block_n=128, block_k=256), strict=True)
        assert (p.tk, p.k_main, p.n_main) == (256, 512, 128)


# ---- Numerics in the Mosaic GPU interpreter, through `quantized_matmul_w8a8` (which hands
# the kernel's wrapper `w8a8_matmul_mgpu` the 2-D problem: no logic of its own to copy)

# (N, K, block sizes): N rows past the last tile and K tail to XLA (explicit block_k = 256
# over K = 576); N tail with the default K step (64, dividing 576); K split over CTAs.
GEOMETRIES = (
    (200, 576, "k_tail"),
    (200, 576, None),
    (64, 1024, None),
)
MS = (1, 7, 16, 128)


def _sizes(tag, m):
    if tag != "k_tail":
        return None
    if m < 64:
        return BlockSizes(block_m=16, block_n=128, block_k=256)
    return BlockSizes(block_m=128, block_n=128, block_k=256)


def _cases():
    geoms = itertools.cycle(GEOMETRIES)
    return [(d, m, *next(geoms)) for d in DTYPES for m in MS]


def mgpu_w8a8(xq, xs, wq, ws, **kw):
    """The real entry point, forced onto the Mosaic GPU kernel."""
    return w8a8.quantized_matmul_w8a8(xq, xs, wq, ws, backend="gpu", gpu_kernel="mosaic",
                                      **kw)


def _check(dtype, m, n, k, block_sizes=None, scale_dtype=jnp.float32):
    xq, xs, wq, ws = make_inputs(m, n, k, dtype, scale_dtype=scale_dtype)
    y = mgpu_w8a8(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=_interpret(),
                  block_sizes=block_sizes)
    ref = quantized_matmul_w8a8_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
    assert_close(y, ref, TOL[jnp.dtype(dtype)])
    return y, ref


class TestInterpret:
    @pytest.mark.parametrize("dtype,m,n,k,tag", _cases())
    def test_matches_reference(self, dtype, m, n, k, tag):
        sizes = _sizes(tag, m)
        plan = mw.plan_w8a8_mgpu(m, n, k, dtype, sizes or mw.default_block_sizes(m),
                                 strict=sizes is not None)
        assert plan.n_main > 0  # the kernel does take part
        if tag == "k_tail":
            assert plan.k_main < k and plan.n_main < n
        _check(dtype, m, n, k, sizes)

    def test_split_k_decode(self):
        plan = mw.plan_w8a8_mgpu(1, 64, 1024, INT8, mw.default_block_sizes(1), strict=False)
        assert plan.k_splits == 2
        _check(INT8, 1, 64, 1024)

    def test_bf16_output_and_scales(self):
        xq, xs, wq, ws = make_inputs(5, 136, 96, FP8, scale_dtype=jnp.bfloat16)
        y = mgpu_w8a8(xq, xs, wq, ws, out_dtype=jnp.bfloat16, interpret=_interpret())
        ref = quantized_matmul_w8a8_reference(xq, xs, wq, ws, out_dtype=jnp.bfloat16)
        assert y.dtype == jnp.bfloat16
        assert_close(y, ref, 2 ** -8)  # at most one bf16 rounding apart

    def test_n_below_one_tile_is_xla(self):
        plan = mw.plan_w8a8_mgpu(3, 40, 64, INT8, mw.default_block_sizes(3), strict=False)
        assert plan.n_main == 0
        _check(INT8, 3, 40, 64)


# ---- Lowering for "cuda"

def _export(fn, *args):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


class TestLowering:
    @pytest.mark.parametrize("m", (1, 256))
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_exports_mosaic_gpu(self, dtype, m):
        n, k = 200, 576  # N rows past the last tile go to XLA
        q = jnp.zeros((n, k), dtype)
        ws = jnp.ones((n, 1), jnp.float32)
        fn = lambda x, xs: mw.w8a8_matmul_mgpu(x, xs, q, ws, out_dtype=jnp.bfloat16)
        targets = _export(fn, jax.ShapeDtypeStruct((m, k), dtype),
                          jax.ShapeDtypeStruct((m, 1), jnp.float32))
        assert mw.MGPU_CUSTOM_CALL in targets, targets

    @pytest.mark.parametrize("m,block", ((1, (16, 64, 32)), (40, (64, 128, 256)),
                                         (128, (64, 256, 128)), (300, (128, 128, 64))))
    def test_tiles_and_swizzles(self, m, block):
        # 32-byte swizzle, split K, tc = 64 decode, a 64 x 256 accumulator, several M tiles.
        sizes = BlockSizes(block_m=block[0], block_n=block[1], block_k=block[2])
        q = jnp.zeros((512, 4096), jnp.int8)
        ws = jnp.ones((512, 1), jnp.float32)
        fn = lambda x, xs: mw.w8a8_matmul_mgpu(x, xs, q, ws, out_dtype=jnp.float32,
                                               block_sizes=sizes)
        targets = _export(fn, jax.ShapeDtypeStruct((m, 4096), jnp.int8),
                          jax.ShapeDtypeStruct((m, 1), jnp.float32))
        assert mw.MGPU_CUSTOM_CALL in targets, targets


# ---- Through the public entry point: quantized_matmul_w8a8(..., backend="gpu")


class TestPublicEntry:
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_quantized_matmul_w8a8_runs_mosaic(self, dtype):
        xq, xs, wq, ws = make_inputs(7, 200, 576, dtype)
        ref = quantized_matmul_w8a8_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
        y = w8a8.quantized_matmul_w8a8(xq, xs, wq, ws, out_dtype=jnp.float32, backend="gpu",
                                       gpu_kernel="mosaic", interpret=not ON_HOPPER)
        assert_close(y, ref, 1e-5)
        fn = lambda xq: w8a8.quantized_matmul_w8a8(xq, xs, wq, ws, backend="gpu",
                                                   gpu_kernel="mosaic")
        assert mw.MGPU_CUSTOM_CALL in _export(fn, jax.ShapeDtypeStruct(xq.shape, xq.dtype))

    def test_selection(self, monkeypatch):
        monkeypatch.delenv("JQUANT_GPU_KERNEL", raising=False)
        xq, xs, wq, ws = make_inputs(4, 64, 256, INT8)
        hopper = ON_HOPPER
        assert w8a8.select_gpu_w8a8_kernel(xq, wq) == ("mosaic" if hopper else "triton")
        monkeypatch.setattr(w8a8, "_is_hopper_or_newer", lambda: True)
        assert w8a8.select_gpu_w8a8_kernel(xq, wq) == "mosaic"
        _, _, wq_odd, ws_odd = make_inputs(4, 201, 256, INT8)  # N = 201: not a multiple of 8
        assert w8a8.select_gpu_w8a8_kernel(xq, wq_odd) == "triton"
        assert w8a8.can_use_gpu_w8a8(xq, xs, wq_odd, ws_odd, backend="gpu")  # Triton takes it
        assert not w8a8.can_use_gpu_w8a8(xq, xs, wq_odd, ws_odd, backend="gpu",
                                         gpu_kernel="mosaic")
        monkeypatch.setenv("JQUANT_GPU_KERNEL", "triton")
        assert w8a8.select_gpu_w8a8_kernel(xq, wq) == "triton"
        monkeypatch.setenv("JQUANT_GPU_KERNEL", "cutlass")
        with pytest.raises(ValueError, match=r"\$JQUANT_GPU_KERNEL='cutlass' must be one of"):
            w8a8.select_gpu_w8a8_kernel(xq, wq)
        with pytest.raises(ValueError, match="must be one of"):
            w8a8.select_gpu_w8a8_kernel(xq, wq, gpu_kernel="cublas")
