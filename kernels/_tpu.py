"""Pallas TPU (Mosaic) kernels: weight-only W{8,4}A16 and W8A8 (int8 x int8, fp8 x fp8).

Validated only on CPU: numerics in Pallas interpret mode (plain and `pltpu.InterpretParams`),
lowering with `jax.export(..., platforms=["tpu"])`. Export runs the Pallas -> Mosaic
lowering, not Mosaic's own layout passes, so an unsupported in-kernel layout would first
show on a real TPU.

Grid (M blocks, N blocks, K blocks), K innermost and "arbitrary", an f32 (int32 for int8
W8A8) VMEM accumulator. Each step decodes a (block_n, block_k) weight tile in VMEM and feeds
the MXU with `x_tile @ w_tile.T` (the weight is stored (N, K), contraction last). Why the
activations arrive pre-split into planes, and scales pre-transposed, is explained in
`_formats.py` and `_scale_blocks`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._formats import PACKED_QTYPES, code_planes, decode, is_per_channel, packed_k, pad_rows
from .block_sizes import BlockSizes

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: x (m, k) . w (n, k) -> (m, n)
_LANES = 128
_MAX_FULL_N = 2048  # an N that is no multiple of 128 is taken whole up to this size


class TpuPlan(NamedTuple):
    """Static tiling of one call; `kb_main` bytes of K go to the kernel, the rest to XLA."""

    bm: int
    bn: int
    bkb: int  # bytes of K per plane per step
    kb_main: int
    m_pad: int
    n_pad: int


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _sublanes(dtype) -> int:
    """Rows of one native tile: packed dtypes stack 2 (16-bit) or 4 (8-bit) rows per sublane."""
    return {4: 8, 2: 16, 1: 32}[jnp.dtype(dtype).itemsize]


def plan_tpu(qtype: str, k: int, group_size: int | None, m: int, n: int, x_dtype,
             block_sizes: BlockSizes, *, strict: bool) -> TpuPlan:
    """Fit `block_sizes` to the problem. `strict` (user-given sizes) raises instead of fixing."""
    packed = qtype in PACKED_QTYPES
    bkb = block_sizes.block_k // 2 if packed else block_sizes.block_k
    per_channel = is_per_channel(k, group_size)
    gb = None if per_channel else (group_size // 2 if packed else group_size)
    step = _LANES if gb is None else _lcm(_LANES, gb)
    if strict and bkb % step:
        block_k = block_sizes.block_k
        raise ValueError(f"{block_k=} must give a multiple of {step} bytes per step on TPU "
                         f"({qtype=}, {group_size=})")
    # Bytes that whole groups cover; a short last group is always left to the XLA tail.
    whole = packed_k(qtype, k, group_size) if gb is None else (k // group_size) * gb
    bkb = max(step, bkb // step * step)
    bkb = min(bkb, whole // step * step)
    kb_main = whole // bkb * bkb if bkb else 0

    sub = _sublanes(x_dtype)
    if strict and block_sizes.block_m % sub:
        block_m = block_sizes.block_m
        raise ValueError(f"{block_m=} must be a multiple of {sub} for {jnp.dtype(x_dtype)} x")
    bm = min(_round_up(block_sizes.block_m, sub), _round_up(m, sub))
    if n % _LANES == 0 or n > _MAX_FULL_N:
        if strict and block_sizes.block_n % _LANES:
            block_n = block_sizes.block_n
            raise ValueError(f"{block_n=} must be a multiple of {_LANES} on TPU")
        n_pad = _round_up(n, _LANES)
        bn = max(_LANES, block_sizes.block_n // _LANES * _LANES)
        while n_pad % bn:
            bn -= _LANES
    else:
        n_pad, bn = n, n
    return TpuPlan(bm=bm, bn=bn, bkb=bkb, kb_main=kb_main, m_pad=_round_up(m, bm), n_pad=n_pad)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _expand_groups(s: jax.Array, gpb: int, gb: int, bkb: int) -> jax.Array:
    """(bn, groups per step) -> a per-byte (bn, bkb) array, or (bn, 1) for one group.

    The expansion is a matmul with a 0/1 matrix: it avoids splitting the lane axis, which
    Mosaic reshapes handle poorly, and is exact (each output is one scale times 1.0).
    """
    if gpb == 1:
        return s
    rows = lax.broadcasted_iota(jnp.int32, (gpb, bkb), 0) * gb
    cols = lax.broadcasted_iota(jnp.int32, (gpb, bkb), 1)
    onehot = ((cols >= rows) & (cols < rows + gb)).astype(jnp.float32)
    return jnp.dot(s, onehot, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)


def _weight_only_kernel(*refs, qtype, n_planes, gpb, gb, has_zp, n_k, step=None):
    # `step` (the K step) is passed in by a caller that runs this body under a condition:
    # interpret mode reads program ids only outside one.
    x_refs = refs[:n_planes]
    w_ref, s_ref = refs[n_planes:n_planes + 2]
    zp_ref = refs[n_planes + 2] if has_zp else None
    o_ref, acc_ref = refs[-2:]
    step = pl.program_id(2) if step is None else step

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    bkb = w_ref.shape[-1]
    scale = _expand_groups(s_ref[...].astype(jnp.float32), gpb, gb, bkb)
    zp = _expand_groups(zp_ref[...].astype(jnp.float32), gpb, gb, bkb) if has_zp else None
    acc = acc_ref[...]
    for x_ref, codes in zip(x_refs, code_planes(w_ref[...], qtype)):
        w = decode(codes, qtype)
        if zp is not None:
            w = w - zp
        w = (w * scale).astype(x_ref.dtype)
        acc += lax.dot_general(x_ref[...], w, _NT, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(step == n_k - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _scale_blocks(s: jax.Array, kb_main: int, gb: int | None, bkb: int) -> jax.Array:
    """(N, G) scales -> (K steps, N, groups per step), so a block is (bn, all its groups).

    A (bn, groups) block of the stored (N, G) array would break the (8, 128) tiling rule
    (a step holds 2..16 groups, not 128); with groups as the whole last axis it is legal.
    This copies only the scales (1/64 of the weight bytes or less).
    """
    n = s.shape[0]
    if gb is None:
        return s.reshape(1, n, 1)
    gpb = bkb // gb
    g_main = kb_main // gb
    return s[:, :g_main].reshape(n, g_main // gpb, gpb).transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=(
    "plan", "qtype", "k", "group_size", "out_dtype", "interpret"))
def weight_only_matmul_tpu(x_planes, qvalue, scale, zero_point, *, plan: TpuPlan, qtype: str,
                           k: int, group_size: int | None, out_dtype, interpret=False):
    """Sum over planes p of x_planes[p] (M, kb_main) @ dequant(plane p of qvalue)[:, :kb_main].T.

    Returns (M, N) in `out_dtype`; the caller adds the part of K past `plan.kb_main`.
    """
    m, n = x_planes[0].shape[0], qvalue.shape[0]
    packed = qtype in PACKED_QTYPES
    gb = None if is_per_channel(k, group_size) else (group_size // 2 if packed else group_size)
    gpb = 1 if gb is None else plan.bkb // gb
    n_k = plan.kb_main // plan.bkb
    x_planes = [pad_rows(xp, plan.m_pad) for xp in x_planes]
    scales = [_scale_blocks(pad_rows(s, plan.n_pad), plan.kb_main, gb, plan.bkb)
              for s in ([scale] if zero_point is None else [scale, zero_point])]
    qvalue = pad_rows(qvalue, plan.n_pad)
    s_index = (lambda i, j, kk: (kk, j, 0)) if gb is not None else (lambda i, j, kk: (0, j, 0))
    in_specs = (
        [pl.BlockSpec((plan.bm, plan.bkb), lambda i, j, kk: (i, kk)) for _ in x_planes]
        + [pl.BlockSpec((plan.bn, plan.bkb), lambda i, j, kk: (j, kk))]
        + [pl.BlockSpec((None, plan.bn, gpb), s_index) for _ in scales]
    )
    kernel = functools.partial(_weight_only_kernel, qtype=qtype, n_planes=len(x_planes),
                               gpb=gpb, gb=gb, has_zp=zero_point is not None, n_k=n_k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.m_pad, plan.n_pad), out_dtype),
        grid=(plan.m_pad // plan.bm, plan.n_pad // plan.bn, n_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((plan.bm, plan.bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((plan.bm, plan.bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"quantized_matmul_{qtype}",
    )(*x_planes, qvalue, *scales)
    return out[:m, :n]


# W8A8 code dtype -> (MXU operand dtype, accumulator dtype). int8 feeds the MXU as is and
# accumulates exactly in int32. fp8 e4m3 is upcast to bf16 in VMEM: exact (every e4m3 value,
# subnormals included, is a bf16 value: 3 mantissa bits < 8, exponents -9..8 well inside
# bf16's range), and bf16 x bf16 -> f32 is the MXU's bf16 path. The
# products of two bf16-held e4m3 values are exact in f32 (4 + 4 significant bits); only the
# order of the f32 accumulation can differ from XLA's.
_W8A8_COMPUTE = {
    jnp.dtype(jnp.int8): (jnp.dtype(jnp.int8), jnp.dtype(jnp.int32)),
    jnp.dtype(jnp.float8_e4m3fn): (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)),
}


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref, *, n_k, compute_dtype):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, w = x_ref[...], w_ref[...]
    if x.dtype != compute_dtype:  # fp8 -> bf16, exact
        x, w = x.astype(compute_dtype), w.astype(compute_dtype)
    acc_ref[...] += lax.dot_general(x, w, _NT, preferred_element_type=acc_ref.dtype)

    @pl.when(step == n_k - 1)
    def _store():
        y = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("plan", "out_dtype", "interpret"))
def w8a8_matmul_tpu(xq, x_scale, qvalue, w_scale, *, plan: TpuPlan, out_dtype,
                    interpret=False):
    """(xq[:, :kb] @ qvalue[:, :kb].T) * x_scale (M, 1) * w_scale (1, N), kb = plan.kb_main.

    xq and qvalue are both int8 (MXU int8 dot, exact int32 accumulator) or both
    float8_e4m3fn (each tile upcast to bf16 in VMEM, exactly, then a bf16 MXU dot with an
    f32 accumulator). The fp8 operands reach the kernel as fp8 memrefs, no bitcast to int8
    needed (export shows `memref<..xf8E4M3FN>`, `arith.extf` to bf16, a bf16 `tpu.matmul`);
    they are tiled in 1-byte (32, 128) tiles like int8, so the plan's blocks (`plan_tpu`
    with the fp8 dtype) are legal for both.

    TPU v7-class chips (Ironwood) have a native fp8 MXU; a variant that feeds it the fp8
    tiles directly, skipping the upcast, is future work. The bf16 upcast runs on any TPU,
    at bf16 MXU rate; like the rest of this module it has been lowered, never run on one.
    """
    if xq.dtype != qvalue.dtype or jnp.dtype(xq.dtype) not in _W8A8_COMPUTE:
        raise ValueError(f"W8A8 TPU kernel needs int8 or float8_e4m3fn xq and qvalue of one "
                         f"dtype, got {xq.dtype} and {qvalue.dtype}")
    compute_dtype, acc_dtype = _W8A8_COMPUTE[jnp.dtype(xq.dtype)]
    m, n = xq.shape[0], qvalue.shape[0]
    n_k = plan.kb_main // plan.bkb
    xq = pad_rows(xq, plan.m_pad)
    x_scale = pad_rows(x_scale.astype(jnp.float32), plan.m_pad)
    qvalue = pad_rows(qvalue, plan.n_pad)
    w_scale = pad_rows(w_scale.astype(jnp.float32), plan.n_pad).reshape(1, plan.n_pad)
    out = pl.pallas_call(
        functools.partial(_w8a8_kernel, n_k=n_k, compute_dtype=compute_dtype),
        out_shape=jax.ShapeDtypeStruct((plan.m_pad, plan.n_pad), out_dtype),
        grid=(plan.m_pad // plan.bm, plan.n_pad // plan.bn, n_k),
        in_specs=[
            pl.BlockSpec((plan.bm, plan.bkb), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((plan.bm, 1), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((plan.bn, plan.bkb), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((1, plan.bn), lambda i, j, kk: (0, j)),
        ],
        out_specs=pl.BlockSpec((plan.bm, plan.bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((plan.bm, plan.bn), acc_dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="quantized_matmul_w8a8" if acc_dtype == jnp.int32 else "quantized_matmul_w8a8_fp8",
    )(xq, x_scale, qvalue, w_scale)
    return out[:m, :n]
