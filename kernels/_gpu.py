"""Pallas GPU kernel (Triton lowering): weight-only W{8,4}A16 with decode and prefill paths.

Validated only on CPU: numerics in Pallas interpret mode, lowering with
`jax.export(..., platforms=["cuda"])` (which needs the Triton custom call allowed, see
`TRITON_CUSTOM_CALL`). It has never run on a GPU, so its speed is unknown.

Triton and Mosaic GPU: Mosaic GPU is the default Pallas GPU backend and Triton's is
deprecated from JAX 0.11. On Hopper the Mosaic GPU kernels (`_mgpu.py`, `_mgpu_w8a8.py`)
run where their rules hold; this kernel serves other GPUs (Ampere, Ada) and the shapes
those do not take. If a JAX without Pallas's Triton backend is installed, this module
still imports and `unsupported_reason` says why it cannot run (`TRITON_AVAILABLE`).

Each program owns a (block_m, block_n) output tile and loops over K inside (GPU grid
programs run concurrently, so the reduction cannot be a grid axis). A grouped weight is
read one group per step, so the group's scale is a (block_n,) vector broadcast over the
group; per-channel steps over `block_k` elements with one scale. A step is at least 16
bytes (`_MIN_TILE`), so 4-bit groups start at 32 elements: mxfp4's blocks of 32 run here,
nvfp4's blocks of 16 (8 bytes a plane) do not (`unsupported_reason`; XLA takes them).

* M <= 8 (decode): no tensor cores. Each row of x is a multiply and a row reduction over
  the dequantized tile on CUDA cores; padding M to the MMA minimum of 16 would waste
  >= half the work, and decode is bound by weight bandwidth anyway.
* M > 8 (prefill): `dot_general` on the dequantized bf16/f16 tile (tensor cores).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._formats import (
    PACKED_QTYPES,
    code_planes,
    decode,
    floor_pow2,
    group_bytes,
    is_pow2,
    next_pow2,
    packed_k,
    pad_rows,
)
from .block_sizes import BlockSizes

try:
    from jax.experimental.pallas import triton as pltr
except ImportError:  # a JAX whose Pallas has no Triton backend any more
    pltr = None

TRITON_AVAILABLE = pltr is not None
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"
_NT = (((1,), (1,)), ((), ()))
_SMALL_M = 8
_MIN_TILE = 16  # smallest MMA operand side Triton accepts


class GpuPlan(NamedTuple):
    """Static tiling of one call; `kb_main` bytes of K go to the kernel, the rest to XLA."""

    bm: int
    bn: int
    step: int  # bytes of K per plane per loop step: one group, or block_k per-channel
    kb_main: int
    m_pad: int
    n_pad: int
    small_m: bool










def unsupported_reason(qtype: str, k: int, group_size: int | None) -> str | None:
    """Triton tiles are powers of two: a grouped step must be one such tile of >= 16 bytes."""
    if not TRITON_AVAILABLE:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend"
    gb = group_bytes(qtype, k, group_size)
    if gb is not None and not (is_pow2(gb) and gb >= _MIN_TILE):
        return (f"{group_size=} gives {gb} bytes per group and plane; the GPU kernel needs a "
                f"power of two >= {_MIN_TILE} (group sizes 32..256 for 4-bit, 16.. for 8-bit)")
    return None


def _require_pow2(block_sizes: BlockSizes) -> None:
    """Explicit block sizes must be legal as given: Triton tiles are powers of two."""
    for name in ("block_m", "block_n", "block_k"):
        value = getattr(block_sizes, name)
        if not is_pow2(value):
            raise ValueError(f"{name}={value} must be a power of two on GPU (Triton tiles)")


def plan_gpu(qtype: str, k: int, group_size: int | None, m: int, n: int,
             block_sizes: BlockSizes, *, strict: bool) -> GpuPlan:
    """Fit `block_sizes` to the problem. `strict` (user-given sizes) raises instead of fixing."""
    if strict:
        _require_pow2(block_sizes)
    gb = group_bytes(qtype, k, group_size)
    kbytes = packed_k(qtype, k, group_size)
    if gb is not None:
        step, kb_main = gb, (k // group_size) * gb
    else:
        step = block_sizes.block_k // 2 if qtype in PACKED_QTYPES else block_sizes.block_k
        step = max(_MIN_TILE, step if is_pow2(step) else next_pow2(step) // 2)
        while step > _MIN_TILE and step > kbytes:
            step //= 2
        kb_main = kbytes // step * step
    small_m = m <= _SMALL_M
    if small_m:
        bm = next_pow2(m)
    else:
        bm = max(_MIN_TILE, min(next_pow2(block_sizes.block_m), next_pow2(m)))
    bn = block_sizes.block_n
    bn = max(_MIN_TILE, bn if is_pow2(bn) else next_pow2(bn) // 2)
    while bn > _MIN_TILE and n % bn:
        bn //= 2
    return GpuPlan(bm=bm, bn=bn, step=step, kb_main=kb_main, m_pad=-(-m // bm) * bm,
                   n_pad=-(-n // bn) * bn, small_m=small_m)


def _dequant_tile(w_ref, s_ref, zp_ref, t, *, qtype, step, grouped, x_dtype):
    """Weight planes of step t as f32 (bn, step) tiles, rounded to x's dtype like the reference."""
    off = pl.multiple_of(t * step, step)
    row = t if grouped else 0
    scale = s_ref[row, :].astype(jnp.float32)[:, None]
    zp = None if zp_ref is None else zp_ref[row, :].astype(jnp.float32)[:, None]
    tiles = []
    for codes in code_planes(w_ref[:, pl.ds(off, step)], qtype):
        w = decode(codes, qtype)
        w = (w if zp is None else w - zp) * scale
        tiles.append(w.astype(x_dtype))
    return off, tiles


def _weight_only_kernel(*refs, qtype, n_planes, step, n_steps, grouped, has_zp, small_m):
    x_refs = refs[:n_planes]
    w_ref, s_ref = refs[n_planes:n_planes + 2]
    zp_ref = refs[n_planes + 2] if has_zp else None
    o_ref = refs[-1]
    bm, bn = o_ref.shape
    x_dtype = x_refs[0].dtype
    tile = functools.partial(_dequant_tile, w_ref, s_ref, zp_ref, qtype=qtype, step=step,
                             grouped=grouped, x_dtype=x_dtype)

    if small_m:
        def body(t, accs):
            off, tiles = tile(t)
            out = []
            for r, acc in enumerate(accs):
                for x_ref, w in zip(x_refs, tiles):
                    xr = x_ref[r, pl.ds(off, step)].astype(jnp.float32)
                    acc = acc + jnp.sum(w.astype(jnp.float32) * xr[None, :], axis=1)
                out.append(acc)
            return tuple(out)

        init = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm))
        accs = lax.fori_loop(0, n_steps, body, init)
        for r, acc in enumerate(accs):
            o_ref[r, :] = acc.astype(o_ref.dtype)
        return

    def body(t, acc):
        off, tiles = tile(t)
        for x_ref, w in zip(x_refs, tiles):
            acc += lax.dot_general(x_ref[:, pl.ds(off, step)], w, _NT,
                                   preferred_element_type=jnp.float32)
        return acc

    acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "plan", "qtype", "k", "group_size", "out_dtype", "interpret"))
def weight_only_matmul_gpu(x_planes, qvalue, scale, zero_point, *, plan: GpuPlan, qtype: str,
                           k: int, group_size: int | None, out_dtype, interpret=False):
    """Sum over planes p of x_planes[p] (M, kb_main) @ dequant(plane p of qvalue)[:, :kb_main].T.

    Returns (M, N) in `out_dtype`; the caller adds the part of K past `plan.kb_main`.
    Scales are passed transposed, (G, N), so a step reads one contiguous row of them.
    """
    m, n = x_planes[0].shape[0], qvalue.shape[0]
    grouped = group_bytes(qtype, k, group_size) is not None
    n_groups = plan.kb_main // plan.step if grouped else 1
    x_planes = [pad_rows(xp, plan.m_pad) for xp in x_planes]
    qvalue = pad_rows(qvalue, plan.n_pad)
    scales = [pad_rows(s, plan.n_pad)[:, :n_groups].T
              for s in ([scale] if zero_point is None else [scale, zero_point])]
    kbytes = qvalue.shape[1]
    in_specs = (
        [pl.BlockSpec((plan.bm, plan.kb_main), lambda i, j: (i, 0)) for _ in x_planes]
        + [pl.BlockSpec((plan.bn, kbytes), lambda i, j: (j, 0))]
        + [pl.BlockSpec((n_groups, plan.bn), lambda i, j: (0, j)) for _ in scales]
    )
    kernel = functools.partial(
        _weight_only_kernel, qtype=qtype, n_planes=len(x_planes), step=plan.step,
        n_steps=plan.kb_main // plan.step, grouped=grouped, has_zp=zero_point is not None,
        small_m=plan.small_m)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.m_pad, plan.n_pad), out_dtype),
        grid=(plan.m_pad // plan.bm, plan.n_pad // plan.bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((plan.bm, plan.bn), lambda i, j: (i, j)),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"quantized_matmul_{qtype}",
    )(*x_planes, qvalue, *scales)
    return out[:m, :n]


# ---- W8A8: int8 x int8 (int32 accumulation) or fp8 x fp8 (f32 accumulation) -------------

W8A8_MIN_BLOCK_K = 32  # K of one int8 / fp8 MMA instruction (mma.m16n8k32, wgmma k32)


def plan_w8a8_gpu(m: int, n: int, k: int, block_sizes: BlockSizes, *,
                  strict: bool) -> tuple[int, int, int]:
    """(block_m, block_n, block_k), powers of two: block_m >= 16 (one MMA tile; M is padded),
    block_n and block_k halved until they divide N and K or reach their minimum (16, 32);
    what is left over (rows of N past the last block, K past the last block) goes to XLA."""
    if strict:
        _require_pow2(block_sizes)
    bm = max(_MIN_TILE, min(next_pow2(block_sizes.block_m), next_pow2(m)))
    bn = max(_MIN_TILE, floor_pow2(block_sizes.block_n))
    while bn > _MIN_TILE and n % bn:
        bn //= 2
    bk = max(W8A8_MIN_BLOCK_K, floor_pow2(block_sizes.block_k))
    while bk > W8A8_MIN_BLOCK_K and k % bk:
        bk //= 2
    return bm, bn, bk


def _w8a8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, block_k, n_steps, acc_dtype):
    bm, bn = o_ref.shape

    def body(t, acc):
        off = pl.multiple_of(t * block_k, block_k)
        return acc + lax.dot_general(x_ref[:, pl.ds(off, block_k)],
                                     w_ref[:, pl.ds(off, block_k)], _NT,
                                     preferred_element_type=acc_dtype)

    acc = lax.fori_loop(0, n_steps, body, jnp.zeros((bm, bn), acc_dtype))
    y = acc.astype(jnp.float32) * xs_ref[...][:, None] * ws_ref[...][None, :]
    o_ref[...] = y.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "block_m", "block_n", "block_k", "out_dtype", "interpret"))
def w8a8_matmul_gpu(xq, x_scale, qvalue, w_scale, *, block_m: int, block_n: int,
                    block_k: int, out_dtype, interpret=False):
    """(xq (M, K) @ qvalue[:n_main, :K].T) * x_scale (M,)[:, None] * w_scale (N,)[None, :n_main].

    Both operands int8 (int32 accumulator) or both float8_e4m3fn (f32 accumulator, a
    native fp8 `tt.dot`: Ada / Hopper fp8 tensor cores). M and K must be multiples of the
    blocks (the caller pads x, which is small); the weight is never copied: it may be wider
    than K (columns past K are not read) and only its first n_main = N // block_n * block_n
    rows are computed, the caller adds the rest. Returns (M, n_main).
    """
    if not TRITON_AVAILABLE:
        raise ValueError(f"this JAX ({jax.__version__}) has no Pallas Triton backend")
    (m, k), n = xq.shape, qvalue.shape[0]
    if m % block_m:
        raise ValueError(f"{m=} must be a multiple of {block_m=}")
    if k % block_k or k > qvalue.shape[1]:
        raise ValueError(f"{k=} must be a multiple of {block_k=} and <= {qvalue.shape[1]=}")
    n_main = n // block_n * block_n
    acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    kernel = functools.partial(_w8a8_kernel, block_k=block_k, n_steps=k // block_k,
                               acc_dtype=acc_dtype)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n_main), out_dtype),
        grid=(m // block_m, n_main // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((block_m,), lambda i, j: (i,)),
            pl.BlockSpec((block_n, qvalue.shape[1]), lambda i, j: (j, 0)),
            pl.BlockSpec((block_n,), lambda i, j: (j,)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name=f"quantized_matmul_w8a8_{jnp.dtype(xq.dtype).name}",
    )(xq, x_scale.astype(jnp.float32), qvalue, w_scale.astype(jnp.float32))
