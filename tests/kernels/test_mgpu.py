"""The Mosaic GPU (Hopper wgmma) weight-only kernel, `kernels/_mgpu.py`, checked on CPU.

Numerics run in the Mosaic GPU interpreter (`InterpretGPUParams`: simulated GMEM / SMEM,
TMA copies, barriers, `wgmma`, NaN-poisoned uninitialized memory); lowering is checked
with `jax.export(..., platforms=["cuda"])`, which runs the Mosaic GPU Python lowering
(layouts, swizzles, tilings) but not ptxas: nothing here has run on a GPU.

The numerics go through the real entry point, `quantized_matmul(..., backend="gpu",
gpu_kernel="mosaic")`, so its planning, activation planes and XLA K tail are what is
checked, not a copy of them.

Tolerance: kernel and reference round the dequantized weight to x's dtype identically and
accumulate in f32, so in f32 they differ only by the order of the f32 sums (the kernel's
K steps, split K, and the XLA tails added on top): `F32_TOL`, far below one bf16 ulp. The
entry point returns x's dtype, so each element must be the f32 reference rounded once:
within half an ulp of it plus that slack (`assert_rounded_close`). A wrong scale row,
nibble, zero point or rounding misses this by orders of magnitude.
"""

from __future__ import annotations

import importlib
import itertools
import re
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels import BlockSizes, _mgpu
from jquant.kernels._formats import STORAGE_DTYPES, num_groups, packed_k
from jquant.kernels.block_sizes import get_block_sizes

qm = importlib.import_module("jquant.kernels.quantized_matmul")

# On a Hopper GPU the kernel compiles and runs for real; elsewhere it runs in the Mosaic GPU
# interpreter, a private module of JAX 0.10 (imported here only when it is needed).
ON_HOPPER = qm._is_hopper_or_newer()
if not ON_HOPPER:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as mgpu_interpret
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams


def _interpret():
    return False if ON_HOPPER else InterpretGPUParams()


QTYPES = ("int8", "int4", "uint4", "nf4", "mxfp4", "nvfp4", "fp8_e4m3", "fp8_e5m2")
F32_TOL = 2e-5  # max |y - ref| / max |ref|, f32 outputs (see the module docstring)
BF16_TOL = 2 ** -7  # plus one bf16 rounding of the output

# ---- The NumPy quantizer of tests/kernels/np_quant.py (written from the storage contract).


_npq = runpy.run_path(str(Path(__file__).with_name("np_quant.py")))
quantize_np, PACKED = _npq["quantize_np"], _npq["PACKED"]


def make_inputs(qtype, k, group_size, m, n, x_dtype=jnp.bfloat16, seed=0,
                scale_dtype=np.float32):
    rng = np.random.default_rng(seed)
    wt = rng.standard_normal((n, k)).astype(np.float32)
    q, s, zp = quantize_np(wt.T, qtype, group_size, scale_dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    return x, jnp.asarray(q), jnp.asarray(s), None if zp is None else jnp.asarray(zp)


# ---- Through the real entry point: `quantized_matmul(..., backend="gpu",
# gpu_kernel="mosaic")` plans, splits x into planes, calls `_mgpu` and adds the XLA K tail.

def mgpu_matmul(x, q, s, zp, *, qtype, k, group_size, interpret, block_sizes=None):
    return qm.quantized_matmul(x, q, s, zp, qtype=qtype, k=k, group_size=group_size,
                               backend="gpu", gpu_kernel="mosaic", interpret=interpret,
                               block_sizes=block_sizes)


def reference_f32(x, q, s, zp, *, qtype, k, group_size):
    """The reference before its final rounding: weight rounded to x.dtype, f32 product."""
    w = qm.dequantize(q, s, zp, qtype=qtype, k=k, group_size=group_size, dtype=x.dtype)
    return np.asarray(x, np.float32) @ np.asarray(w, np.float32)


def assert_rounded_close(y, ref_f32, x_dtype):
    """y (x's dtype) is ref_f32 up to F32_TOL of summation order, then one rounding to
    x's dtype: elementwise at most half an ulp of |ref| (eps / 2) plus that slack."""
    y, ref = np.asarray(y, np.float32), np.asarray(ref_f32, np.float32)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.all(np.isfinite(y))
    half_ulp = float(jnp.finfo(x_dtype).eps) / 2
    bound = 1.01 * F32_TOL * np.abs(ref).max() + half_ulp * (1 + F32_TOL) * np.abs(ref)
    excess = np.abs(y - ref) - bound
    assert np.all(excess <= 0), (excess.max(), np.unravel_index(excess.argmax(), y.shape))


def assert_close(y, ref, tol):
    y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    assert np.all(np.isfinite(y))
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err <= tol, err


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    # The interpreter keeps global state that an exception inside a kernel leaves dirty.
    if not ON_HOPPER:
        mgpu_interpret.reset_gpu_interpret_mode_state()
    yield


# ---- Planner and predicate

class TestPlan:
    # mxfp4 and nvfp4 at the block sizes they are defined with: 16 and 8 bytes a plane
    @pytest.mark.parametrize("qtype,group_size", (("int4", 32), ("nf4", 48), ("int8", 16),
                                                  ("int8", 96), ("uint4", 20), ("mxfp4", 32),
                                                  ("nvfp4", 16)))
    def test_rejects_small_or_odd_groups(self, qtype, group_size):
        assert "bytes per group" in _mgpu.unsupported_reason(qtype, 4096, group_size)

    @pytest.mark.parametrize("qtype,group_size", (("int4", 64), ("uint4", 128), ("nf4", None),
                                                  ("int8", 32), ("fp8_e4m3", 256),
                                                  ("mxfp4", 64), ("nvfp4", None),
                                                  ("int4", 8192)))  # >= K: per-channel
    def test_accepts(self, qtype, group_size):
        assert _mgpu.unsupported_reason(qtype, 4096, group_size) is None
        assert _mgpu.unsupported_reason(qtype, 4096, group_size, x_dtype=jnp.float16,
                                        n=4104) is None

    def test_rejects_f32_activations(self):
        assert "bfloat16 or float16" in _mgpu.unsupported_reason("int8", 256, None,
                                                                 x_dtype=jnp.float32)

    @pytest.mark.parametrize("qtype,k,group_size", (("int8", 1000, None), ("int4", 1000, 128),
                                                    ("nf4", 4100, None)))
    def test_rejects_k_bytes_off_the_tma_tile(self, qtype, k, group_size):
        assert "multiple of 32" in _mgpu.unsupported_reason(qtype, k, group_size)

    def test_rejects_n_off_the_tma_tile(self):
        assert "multiple of 8" in _mgpu.unsupported_reason("int8", 256, None, n=201)
        assert _mgpu.unsupported_reason("int8", 256, None, n=200) is None

    @pytest.mark.parametrize("qtype,group_size,kb_main", (
        ("int4", 64, 288),  # SmolLM2 K = 576: 9 whole groups of 32 bytes, no tail
        ("int4", 128, 256),  # 4 whole groups of 64 bytes; the short 5th group is XLA's
        ("int8", 64, 576),
        ("int8", 128, 512),
        ("nf4", None, 288),  # per-channel: 64-byte steps halved to 32, which divide 288
        ("int8", None, 576),
        ("int8", 576, 576)))  # group_size >= K is per-channel
    def test_k_576(self, qtype, group_size, kb_main):
        plan = _mgpu.plan_mgpu(qtype, 576, group_size, 1, 576,
                               BlockSizes(block_m=8, block_n=64, block_k=128), strict=False)
        assert plan.kb_main == kb_main
        assert plan.kb_main % plan.tkb == 0

    @pytest.mark.parametrize("m", (1, 7, 16, 33, 128, 1000))
    @pytest.mark.parametrize("n", (64, 200, 4096))
    @pytest.mark.parametrize("block", ((8, 64, 128), (64, 128, 64), (256, 256, 1024)))
    def test_tiles_fit_the_hardware(self, m, n, block):
        sizes = BlockSizes(block_m=block[0], block_n=block[1], block_k=block[2])
        for qtype, g in (("int4", 128), ("int8", 1024), ("nf4", None), ("fp8_e5m2", 32)):
            p = _mgpu.plan_mgpu(qtype, 4096, g, m, n, sizes, strict=False)
            planes = 2 if qtype in ("int4", "nf4") else 1
            assert p.tn % 64 == 0 and 64 <= p.tn <= 256
            assert p.tm in (16, 32, 64, 128) and p.m_pad % p.tm == 0 and p.m_pad >= m
            assert 32 <= p.tkb <= 128 and p.tkb & (p.tkb - 1) == 0
            assert p.tn * p.tm <= 8192 and p.tn * p.tkb <= 8192  # registers
            assert _mgpu._smem_bytes(p.tn, p.tm, p.tkb, planes, planes) <= _mgpu.SMEM_BUDGET
            assert p.n_main == n // p.tn * p.tn
            steps = p.kb_main // p.tkb
            assert steps % (p.k_splits * p.steps_per_group) == 0 or p.k_splits == 1

    def test_strict_block_sizes(self):
        with pytest.raises(ValueError, match="multiple of 64"):
            _mgpu.plan_mgpu("int4", 1024, 128, 4, 256,
                            BlockSizes(block_m=16, block_n=96, block_k=128), strict=True)
        with pytest.raises(ValueError, match="power of two"):
            _mgpu.plan_mgpu("int4", 1024, 128, 4, 256,
                            BlockSizes(block_m=24, block_n=128, block_k=128), strict=True)
        with pytest.raises(ValueError, match="bytes per group"):
            _mgpu.plan_mgpu("int4", 1024, 32, 4, 256,
                            BlockSizes(block_m=16, block_n=128, block_k=128), strict=False)

    def test_decode_splits_k(self):
        # One N tile at decode: K is split over CTAs, in whole groups.
        p = _mgpu.plan_mgpu("int4", 4096, 128, 1, 64,
                            BlockSizes(block_m=8, block_n=64, block_k=128), strict=False)
        assert p.k_splits > 1 and (p.kb_main // p.tkb) % p.k_splits == 0


# ---- Numerics in the Mosaic GPU interpreter

# (K, group_size): K split over CTAs (16 groups), SmolLM2's K with a short last group,
# per-channel with a K tail.
GEOMETRIES = ((1024, 64), (576, 128), (576, None))
# FP4's own block sizes (32, 16) are below this kernel's groups (TestPlan); its E2M1 decode
# is checked at one geometry each that the kernel takes (the interpreter is slow).
FP4_GEOMETRIES = {"mxfp4": ((1024, 64),), "nvfp4": ((576, None),)}
# (M, N): decode, odd M with N rows left to XLA, one M tile, several M tiles.
PROBLEMS = ((1, 128), (7, 200), (16, 128), (128, 200))


def _cases():
    problems = itertools.cycle(PROBLEMS)
    return [(q, k, g, *next(problems)) for q in QTYPES
            for k, g in FP4_GEOMETRIES.get(q, GEOMETRIES)]


def _check(qtype, k, group_size, m, n, x_dtype=jnp.bfloat16, scale_dtype=np.float32,
           block_sizes=None, seed=0, kernel=True):
    x, q, s, zp = make_inputs(qtype, k, group_size, m, n, x_dtype, seed, scale_dtype)
    kw = dict(qtype=qtype, k=k, group_size=group_size)
    fn = lambda x: mgpu_matmul(x, q, s, zp, interpret=_interpret(), block_sizes=block_sizes,
                               **kw)
    # guards the check below: the Mosaic GPU kernel (its wgmma) takes part, unless told not
    assert ("wgmma" in str(jax.make_jaxpr(fn)(x))) == kernel
    y = fn(x)
    assert y.dtype == x.dtype
    assert_rounded_close(y, reference_f32(x, q, s, zp, **kw), x.dtype)
    # and against the library's reference
    assert_close(y, qm.quantized_matmul_reference(x, q, s, zp, **kw), BF16_TOL)


class TestInterpret:
    @pytest.mark.parametrize("qtype,k,group_size,m,n", _cases())
    def test_matches_reference(self, qtype, k, group_size, m, n):
        _check(qtype, k, group_size, m, n)

    def test_float16_and_bf16_scales(self):
        _check("uint4", 576, 64, 5, 128, x_dtype=jnp.float16, scale_dtype=jnp.bfloat16)

    def test_group_over_several_steps(self):
        # 8-bit g = 256: 256 bytes a group, two 128-byte steps share one scale row.
        plan = _mgpu.plan_mgpu("int8", 1024, 256, 3, 64, get_block_sizes("gpu", 3),
                               strict=False)
        assert plan.steps_per_group == 2
        _check("int8", 1024, 256, 3, 64)

    def test_wide_tiles(self):
        # tm = 128 (swizzle 128 on both wgmma operands), tn = 128, one step = 128 bytes
        # per-channel... capped to 64 by registers at tn = 128.
        sizes = BlockSizes(block_m=128, block_n=128, block_k=256)
        plan = _mgpu.plan_mgpu("int4", 512, None, 100, 128, sizes, strict=True)
        assert (plan.tn, plan.tm, plan.tkb) == (128, 64, 64)
        _check("int4", 512, None, 100, 128, block_sizes=sizes)
        sizes = BlockSizes(block_m=128, block_n=64, block_k=256)
        plan = _mgpu.plan_mgpu("int8", 512, None, 100, 128, sizes, strict=True)
        assert (plan.tn, plan.tm, plan.tkb) == (64, 128, 128)
        _check("int8", 512, None, 100, 128, block_sizes=sizes)

    def test_n_below_one_tile_is_xla(self):
        plan = _mgpu.plan_mgpu("int4", 256, 64, 2, 40, get_block_sizes("gpu", 2),
                               strict=False)
        assert plan.n_main == 0
        _check("int4", 256, 64, 2, 40, kernel=False)

    def test_kernel_is_used(self):
        x, q, s, zp = make_inputs("int4", 256, 64, 4, 128)
        fn = lambda x: mgpu_matmul(x, q, s, zp, qtype="int4", k=256, group_size=64,
                                   interpret=False)
        assert _export(fn, jax.ShapeDtypeStruct(x.shape, x.dtype)) >= {_mgpu.MGPU_CUSTOM_CALL}

    def test_wrapper_rejects_f32_planes(self):
        plan = _mgpu.plan_mgpu("int8", 256, None, 2, 64, get_block_sizes("gpu", 2),
                               strict=False)
        q = jnp.zeros((64, 256), jnp.int8)
        with pytest.raises(ValueError, match="bfloat16 or float16"):
            _mgpu.weight_only_matmul_mgpu([jnp.zeros((2, plan.kb_main))], q,
                                          jnp.ones((64, 1)), None, plan=plan, qtype="int8",
                                          k=256, group_size=None, out_dtype=jnp.float32)


# ---- Lowering for "cuda"

def _export(fn, *args):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


def _lowers(qtype, k, group_size, m, n, x_dtype=jnp.bfloat16):
    q = jnp.zeros((n, packed_k(qtype, k, group_size)), STORAGE_DTYPES[qtype])
    s = jnp.ones((n, num_groups(k, group_size)), jnp.bfloat16)
    zp = s if qtype == "uint4" else None
    fn = lambda x: mgpu_matmul(x, q, s, zp, qtype=qtype, k=k, group_size=group_size,
                               interpret=False)
    targets = _export(fn, jax.ShapeDtypeStruct((m, k), x_dtype))
    assert _mgpu.MGPU_CUSTOM_CALL in targets, targets


class TestLowering:
    # K = 576 (SmolLM2): g = 64 is all kernel for 4-bit, g = 128 leaves a short group to
    # XLA, per-channel leaves bytes past the last step. N = 200: rows past 192 to XLA.
    @pytest.mark.parametrize("m", (1, 7, 16, 128))
    @pytest.mark.parametrize("qtype", QTYPES)
    def test_every_qtype_and_m(self, qtype, m):
        _lowers(qtype, 576, 64, m, 200)

    @pytest.mark.parametrize("group_size", (128, None))
    @pytest.mark.parametrize("m", (1, 128))
    @pytest.mark.parametrize("qtype", QTYPES)
    def test_group_and_per_channel(self, qtype, m, group_size):
        _lowers(qtype, 576, group_size, m, 200)

    @pytest.mark.parametrize("m,block", ((1, (8, 64, 128)), (256, (128, 64, 256)),
                                         (300, (64, 128, 128)), (64, (64, 256, 128))))
    def test_large_and_split(self, m, block):
        # K = 4096: decode splits K over CTAs; wide tm / tn tiles; several M tiles.
        sizes = BlockSizes(block_m=block[0], block_n=block[1], block_k=block[2])
        q = jnp.zeros((512, 2048), jnp.uint8)
        s = jnp.ones((512, 32), jnp.float32)
        fn = lambda x: mgpu_matmul(x, q, s, None, qtype="int4", k=4096, group_size=128,
                                   interpret=False, block_sizes=sizes)
        assert _mgpu.MGPU_CUSTOM_CALL in _export(fn, jax.ShapeDtypeStruct((m, 4096),
                                                                          jnp.bfloat16))

    def test_float16(self):
        _lowers("nf4", 1024, 128, 3, 128, jnp.float16)

    @pytest.mark.parametrize("m", (1, 128))
    @pytest.mark.parametrize("qtype", QTYPES)
    def test_lhs_in_registers(self, qtype, m):
        # The opt-in register-LHS variant: lowering only (the interpreter cannot run it).
        k, g, n = 576, 64, 256
        plan = _mgpu.plan_mgpu(qtype, k, g, m, n, get_block_sizes("gpu", m), strict=False,
                               lhs_in_registers=True)
        q = jnp.zeros((n, packed_k(qtype, k, g)), STORAGE_DTYPES[qtype])
        s = jnp.ones((n, num_groups(k, g)), jnp.bfloat16)
        zp = s if qtype == "uint4" else None
        planes = [jax.ShapeDtypeStruct((m, plan.kb_main), jnp.bfloat16)] * (
            2 if qtype in PACKED else 1)
        fn = lambda *xs: _mgpu.weight_only_matmul_mgpu(
            list(xs), q, s, zp, plan=plan, qtype=qtype, k=k, group_size=g,
            out_dtype=jnp.bfloat16)
        assert _mgpu.MGPU_CUSTOM_CALL in _export(fn, *planes)
        with pytest.raises(ValueError, match="no interpreter support"):
            _mgpu.weight_only_matmul_mgpu(
                [jnp.zeros(p.shape, p.dtype) for p in planes], q, s, zp, plan=plan,
                qtype=qtype, k=k, group_size=g, out_dtype=jnp.bfloat16, interpret=True)


# ---- Through the public entry point: quantized_matmul(..., backend="gpu")


class TestPublicEntry:
    def test_quantized_matmul_runs_mosaic(self):
        x, q, s, zp = make_inputs("uint4", 576, 64, 7, 200)
        kw = dict(qtype="uint4", k=576, group_size=64)
        y = qm.quantized_matmul(x, q, s, zp, backend="gpu", gpu_kernel="mosaic",
                                interpret=not ON_HOPPER, **kw)
        assert y.dtype == x.dtype
        assert_close(y, qm.quantized_matmul_reference(x, q, s, zp, **kw), BF16_TOL)
        fn = lambda x: qm.quantized_matmul(x, q, s, zp, backend="gpu", gpu_kernel="mosaic", **kw)
        assert _mgpu.MGPU_CUSTOM_CALL in _export(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))

    def test_select_gpu_kernel(self, monkeypatch):
        x, q, _, _ = make_inputs("int4", 256, 64, 1, 64)
        kw = dict(qtype="int4", k=256, group_size=64)
        monkeypatch.delenv("JQUANT_GPU_KERNEL", raising=False)
        assert qm.select_gpu_kernel(x, q, **kw) == ("mosaic" if ON_HOPPER else "triton")
        assert qm.select_gpu_kernel(x, q, gpu_kernel="mosaic", **kw) == "mosaic"
        monkeypatch.setenv("JQUANT_GPU_KERNEL", "mosaic")
        assert qm.select_gpu_kernel(x, q, **kw) == "mosaic"
        assert qm.select_gpu_kernel(x, q, gpu_kernel="triton", **kw) == "triton"
        monkeypatch.setenv("JQUANT_GPU_KERNEL", "cutlass")
        with pytest.raises(ValueError, match=r"\$JQUANT_GPU_KERNEL='cutlass' must be one of"):
            qm.select_gpu_kernel(x, q, **kw)

    def test_hopper_default_prefers_mosaic_where_it_applies(self, monkeypatch):
        monkeypatch.delenv("JQUANT_GPU_KERNEL", raising=False)
        monkeypatch.setattr(qm, "_is_hopper_or_newer", lambda: True)
        x, q, _, _ = make_inputs("int4", 256, 64, 1, 64)
        assert qm.select_gpu_kernel(x, q, qtype="int4", k=256, group_size=64) == "mosaic"
        # f32 activations and 4-bit groups of 32 have no Mosaic kernel: Triton takes them
        x32 = x.astype(jnp.float32)
        assert qm.select_gpu_kernel(x32, q, qtype="int4", k=256, group_size=64) == "triton"
        _, q32, _, _ = make_inputs("int4", 256, 32, 1, 64)
        assert qm.select_gpu_kernel(x, q32, qtype="int4", k=256, group_size=32) == "triton"

    def test_predicate_and_errors_name_the_problem(self):
        x, q, s, zp = make_inputs("int4", 256, 64, 3, 64)
        kw = dict(qtype="int4", k=256, group_size=64, backend="gpu", gpu_kernel="mosaic")
        assert qm.can_use_gpu_kernel(x, q, s, zp, **kw)
        assert not qm.can_use_gpu_kernel(x.astype(jnp.float32), q, s, zp, **kw)
        assert not qm.can_use_gpu_kernel(x, q, s, zp, **{**kw, "backend": "tpu"})
        with pytest.raises(ValueError, match="bfloat16 or float16"):
            qm.quantized_matmul(x.astype(jnp.float32), q, s, zp, interpret=True, **kw)
        with pytest.raises(ValueError, match="must be one of"):
            qm.quantized_matmul(x, q, s, zp, interpret=True, **{**kw, "gpu_kernel": "x"})
