"""The TPU W8A8 kernel (Pallas Mosaic), int8 x int8 and fp8 e4m3 x fp8 e4m3, on CPU.

Numerics run in Pallas interpret mode (plain and `pltpu.InterpretParams`, which simulates
VMEM and poisons uninitialized memory); lowering is checked with `jax.export` for "tpu".

Tolerances. int8: the kernel's int32 accumulator is exact, so kernel and reference differ
only by where the f32 epilogue rounds (the K tail is scaled and added separately): a few
f32 ulps. fp8: the kernel upcasts the codes to bf16, exactly, and every product of two
e4m3 values (4 significant bits each) is exact in f32, so only the order of the f32
accumulation differs from XLA's dot: at K = 1000 that is far below 1e-5 of max |y|. A kernel
that accumulated in bf16, or rounded an operand, would miss 1e-5 by orders of magnitude.
"""

from __future__ import annotations

import base64
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jquant.kernels import BlockSizes, _tpu
from jquant.kernels.w8a8 import can_use_tpu_w8a8

from jquant import kernels

DTYPES = (jnp.int8, jnp.float8_e4m3fn)
F32_TOL = 1e-5  # max |y - ref| / max |ref|, see the module docstring
BF16_TOL = 2 ** -8  # one bf16 rounding of the output: half an ulp at 8 significant bits


def _problem(m, n, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    xq, xs = kernels.quantize_activations(x, dtype)
    q, s = kernels.quantize_activations(w, dtype)  # per row of (N, K): per channel
    return x, w, xq, xs, q, s


def _assert_close(y, ref, tol):
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, y.dtype, ref.dtype)
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert np.all(np.isfinite(y))
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= tol, err


def _run(xq, xs, q, s, **kw):
    return kernels.quantized_matmul_w8a8(xq, xs, q, s, backend="tpu", **kw)


# K = 1000 with 256-wide K blocks: three K steps in the kernel and a 232-wide tail for XLA.
# N = 201 is odd: taken whole as one block (legal: it is the full dimension). M = 1 and 7
# pad to one 32-row block, 128 is four blocks.
@pytest.mark.parametrize("interpret", (True, pltpu.InterpretParams()), ids=("plain", "sim"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("int8", "fp8"))
@pytest.mark.parametrize("m", (1, 7, 16, 128))
def test_matches_reference(m, dtype, interpret):
    k, n = 1000, 201
    x, w, xq, xs, q, s = _problem(m, n, k, dtype, seed=m)
    ref = kernels.quantized_matmul_w8a8_reference(xq, xs, q, s, out_dtype=jnp.float32)
    y = _run(xq, xs, q, s, out_dtype=jnp.float32, interpret=interpret,
             block_sizes=BlockSizes(block_m=32, block_n=128, block_k=256))
    _assert_close(y, ref, F32_TOL)
    exact = np.asarray(x) @ np.asarray(w).T  # and close to the float product
    bound = 0.02 if dtype == jnp.int8 else 0.06
    assert np.linalg.norm(np.asarray(y) - exact) / np.linalg.norm(exact) < bound


@pytest.mark.parametrize("dtype", DTYPES, ids=("int8", "fp8"))
def test_bf16_output_default_blocks_and_batch_dims(dtype):
    # Default blocks: K = 1000 leaves a tail past the 896 bytes the kernel takes.
    _, _, xq, xs, q, s = _problem(6, 200, 1000, dtype, seed=11)
    xq, xs = xq.reshape(2, 3, 1000), xs.reshape(2, 3, 1)
    ref = kernels.quantized_matmul_w8a8_reference(xq, xs, q, s)
    y = _run(xq, xs, q, s, interpret=True)
    assert y.shape == (2, 3, 200)
    _assert_close(y, ref, BF16_TOL)


@pytest.mark.parametrize("bad", (np.nan, np.inf), ids=("nan", "inf"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("int8", "fp8"))
def test_non_finite_rows_stay_non_finite(dtype, bad):
    # An int8 code cannot hold NaN: the row's scale must carry it into the epilogue, or a
    # diverging activation comes out as a finite row (NumPy's x @ w.T is non-finite there).
    x, w, _, _, q, s = _problem(7, 201, 1000, dtype, seed=3)
    x = np.array(x)
    x[1, 10], x[4, 999] = bad, -bad
    xq, xs = kernels.quantize_activations(jnp.asarray(x), dtype)
    assert np.isfinite(np.asarray(xs)).tolist() == [[r not in (1, 4)] for r in range(7)]
    y = np.asarray(_run(xq, xs, q, s, out_dtype=jnp.float32, interpret=True,
                        block_sizes=BlockSizes(block_m=32, block_n=128, block_k=256)))
    with np.errstate(invalid="ignore"):
        ref = x @ np.asarray(w).T
    np.testing.assert_array_equal(np.isfinite(y).all(axis=1), np.isfinite(ref).all(axis=1))
    assert not np.isfinite(y[[1, 4]]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=("int8", "fp8"))
def test_kernel_is_used(dtype):
    # Guards the tests above: fp8 must reach the Pallas kernel, not the XLA reference.
    _, _, xq, xs, q, s = _problem(7, 201, 1000, dtype)
    jaxpr = jax.make_jaxpr(lambda xq: _run(xq, xs, q, s, interpret=True))(xq)
    assert "pallas_call" in str(jaxpr)


def test_every_fp8_code_converts_exactly():
    # Row 0 of xq holds all 256 e4m3fn codes (the two NaN codes zeroed), subnormals
    # included; the weight is the identity, so y[0, n] must equal code n bit for bit.
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    codes = np.where(np.isnan(codes.astype(np.float32)), 0, codes).astype(codes.dtype)
    xq = jnp.asarray(np.stack([codes, codes[::-1]]))
    q = jnp.asarray(np.eye(256, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn))
    ones = lambda r: jnp.ones((r, 1), jnp.float32)
    y = _run(xq, ones(2), q, ones(256), out_dtype=jnp.float32, interpret=True,
             block_sizes=BlockSizes(block_m=32, block_n=128, block_k=128))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(xq, np.float32))


def test_fp8_block_m_follows_the_byte_tiling():
    # fp8, like int8, packs 32 rows per (sublane, lane) tile: bm rounds up to 32 and an
    # explicit block_m that is no multiple of 32 is refused.
    plan = _tpu.plan_tpu("int8", 1000, None, 7, 201, jnp.float8_e4m3fn,
                         BlockSizes(block_m=8, block_n=128, block_k=256), strict=False)
    assert (plan.bm, plan.bn, plan.bkb, plan.kb_main) == (32, 201, 256, 768)
    _, _, xq, xs, q, s = _problem(7, 128, 512, jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="multiple of 32"):
        _run(xq, xs, q, s, interpret=True,
             block_sizes=BlockSizes(block_m=16, block_n=128, block_k=256))


def test_wrapper_rejects_mixed_dtypes():
    plan = _tpu.TpuPlan(bm=32, bn=128, bkb=128, kb_main=128, m_pad=32, n_pad=128)
    with pytest.raises(ValueError, match="one dtype"):
        _tpu.w8a8_matmul_tpu(jnp.zeros((32, 128), jnp.int8), jnp.ones((32, 1)),
                             jnp.zeros((128, 128), jnp.float8_e4m3fn), jnp.ones((128, 1)),
                             plan=plan, out_dtype=jnp.float32, interpret=True)


# ---- Lowering for "tpu" (export runs Pallas -> Mosaic, not Mosaic's own compiler passes).

def _export_fp8(m, k=4160, n=384):
    q, s = jnp.zeros((n, k), jnp.float8_e4m3fn), jnp.ones((n, 1), jnp.float32)
    fn = lambda xq, xs: kernels.quantized_matmul_w8a8(xq, xs, q, s, backend="tpu")
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
        jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((m, 1), jnp.float32))
    return exported.mlir_module()


@pytest.mark.parametrize("m", (1, 256))
def test_fp8_kernel_lowers(m):
    # K = 4160: several K steps and a 64-wide tail left to XLA.
    module = _export_fp8(m)
    assert "custom_call @tpu_custom_call" in module
    assert re.findall(r'kernel_name = "(\w+)"', module) == ["quantized_matmul_w8a8_fp8"]


def test_fp8_kernel_reads_fp8_and_feeds_the_mxu_bf16():
    # The Mosaic body of the custom call: fp8 memrefs (no bitcast to int8 needed), an
    # exact extf to bf16, and a bf16 x bf16 -> f32 tpu.matmul. Uses private jaxlib API.
    try:
        from jax._src.interpreters import mlir as jax_mlir
        from jax._src.lib import tpu
        from jaxlib.mlir import ir
        from jaxlib.mlir.passmanager import PassManager
    except ImportError as e:  # pragma: no cover - depends on the jaxlib build
        pytest.skip(f"Mosaic dialect unavailable: {e}")
    body = re.search(r"\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22", _export_fp8(1)).group(1)
    ctx = jax_mlir.make_ir_context()
    tpu.register_dialect(ctx)
    with ctx, ir.Location.unknown():
        ctx.allow_unregistered_dialects = True
        module = ir.Module.parse(base64.b64decode(body))
        PassManager.parse("builtin.module(mosaic-serde{serialize=false})").run(module.operation)
        text = str(module)
    assert "memref<32x1024xf8E4M3FN" in text and "memref<384x1024xf8E4M3FN" in text
    assert re.search(r"arith.extf %\w+ : vector<32x1024xf8E4M3FN> to vector<32x1024xbf16>",
                     text)
    assert re.search(r"tpu.matmul .*: vector<32x1024xbf16>, vector<384x1024xbf16>, "
                     r"vector<32x384xf32> -> vector<32x384xf32>", text)


# ---- can_use_tpu_w8a8

@pytest.mark.parametrize("dtype", DTYPES, ids=("int8", "fp8"))
def test_can_use_tpu_w8a8(dtype):
    xq, xs = jnp.zeros((2, 256), dtype), jnp.ones((2, 1))
    q, s = jnp.zeros((128, 256), dtype), jnp.ones((128, 1))
    assert can_use_tpu_w8a8(xq, xs, q, s, backend="tpu")
    for other in ("cpu", "gpu", "cuda", "rocm"):
        assert not can_use_tpu_w8a8(xq, xs, q, s, backend=other)
    # default backend: this machine's (CPU in CI) is not a TPU
    assert can_use_tpu_w8a8(xq, xs, q, s) == (jax.default_backend() == "tpu")
    # inputs that break the contract are never usable
    bad = (
        (xq, xs, q, jnp.ones((128, 2))),                     # group-wise weight scales
        (xq, xs, q[:, :128], s),                             # K disagrees
        (xq, jnp.ones((2, 2)), q, s),                        # x_scale not per row
        (xq, xs, q, s.astype(jnp.int32)),                    # integer scales
        (xq.astype(jnp.bfloat16), xs, q, s),                 # unquantized activations
    )
    for args in bad:
        assert not can_use_tpu_w8a8(*args, backend="tpu")
    other_dtype = jnp.float8_e4m3fn if dtype == jnp.int8 else jnp.int8
    assert not can_use_tpu_w8a8(xq, xs, q.astype(other_dtype), s, backend="tpu")
    e5m2 = jnp.float8_e5m2
    assert not can_use_tpu_w8a8(xq.astype(e5m2), xs, q.astype(e5m2), s, backend="tpu")
