"""Pallas Mosaic GPU kernel (Hopper, sm_90): W8A8 matmul with 8-bit `wgmma`.

Validated only on CPU: numerics in the Mosaic GPU interpreter (`InterpretGPUParams`,
simulated GMEM / SMEM, TMA copies, barriers and `wgmma`), lowering with
`jax.export(..., platforms=["cuda"])` (a `mosaic_gpu_v2` custom call). It has never run
on a GPU: nothing here has been through ptxas or measured, so its speed is unknown and a
kernel that exports can still fail to compile on an H100.

This is the Mosaic GPU counterpart of `_gpu.w8a8_matmul_gpu` (Triton lowering) and computes
what `w8a8.quantized_matmul_w8a8_reference` does:

    y = (xq (M, K) @ qvalue (N, K).T) * x_scale (M, 1) * w_scale (N, 1).T

with xq and qvalue both `float8_e4m3fn` (f32 accumulator) or both int8 (exact int32
accumulator: Mosaic GPU's `wgmma` takes s8 x s8 -> s32 on sm_90). Both scales are applied
in f32 in the kernel's epilogue, in the reference's order (`acc * x_scale * w_scale`).

**Operands.** Hopper's 8-bit `wgmma` takes no transposes: both operands must be K-major
in SMEM. Both of ours already are (xq is (M, K), qvalue is (N, K), K minor), so the
kernel computes `out (R, C) = lhs (R, K) @ rhs (C, K).T`, with `rhs` passed to `wgmma` as
`plgpu.transpose_ref(rhs_tile, (1, 0))` (a view, no data movement). No XLA transpose of
either operand is needed.

**Swap AB.** The lhs side is the wgmma M side (64-row multiples); the rhs side the wgmma
N side (8..256, here 16..256). For M < 64 (decode) the kernel computes y^T: lhs = qvalue
(R = N, tiles `tr` of 64 or 128 rows), rhs = xq (C = M padded to a power of two tile `tc`
of 16..64 rows), so a decode M of 1..16 costs a 16-column wgmma instead of a 64-row
one. For M >= 64 lhs = xq (M padded to `tr`) and rhs = qvalue (tiles `tc` of N).

One CTA (one warpgroup) owns a (tr, tc) output tile and a contiguous range of K steps
(split K: with few output tiles, K is split so that about one CTA per SM runs; the f32
partial results, each already scaled, are added by XLA). `plgpu.emit_pipeline` streams,
per K step of `tk` elements (= bytes), the lhs tile (tr, tk) and the rhs tile (tc, tk)
GMEM -> SMEM by TMA (double-buffered, both with the same (8, swizzle) tiling and
swizzle), and issues `wgmma(acc, lhs_tile, rhs_tile.T)`. The epilogue converts the
accumulator to f32, multiplies by the row and column scale vectors (loaded from GMEM
straight into the WGMMA row / column layouts), stores the tile to SMEM and copies it to
GMEM by TMA.

Constraints (`unsupported_reason`): xq and qvalue the same dtype, int8 or float8_e4m3fn;
K a multiple of 32 and N a multiple of 8, because TMA tiles the whole operand arrays (not
just the slice read) with an (8, >= 32 byte) swizzled tile. Within those, every shape
gives the reference's answer: M is padded to a whole tile; rows of N past the last whole
tile and K past the last whole step (only when an explicit `block_k` does not divide K)
are computed by XLA and added.

Interpreter vs GPU: two differences, both forced by the JAX 0.10 interpreter.
(1) The scale vectors are loaded with `plgpu.load(..., layout=WGMMA.reduce(...))` so they
broadcast against the accumulator; the interpreter has no rule for `plgpu.load`, so under
`interpret` the same values are read with a plain `ref[...]` (layouts are no-ops there).
(2) The interpreter's `wgmma` cannot read a transposed ref (`TransposeTransform` has no
`indices`), so under `interpret` each rhs tile is copied, transposed, into a (tk, tc)
SMEM scratch and `wgmma` reads that; the GPU path reads the TMA'd tile through
`transpose_ref`, which is what makes it K-major for the 8-bit wgmma. Everything else (the
TMA pipeline, indexing, split K, the epilogue, the XLA tails) is the same code. So the
transposed-view operand is checked by the lowering only, not numerically.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ._formats import floor_pow2, is_pow2, next_pow2
from ._mgpu import MGPU_CUSTOM_CALL as MGPU_CUSTOM_CALL
from ._mgpu import (
    SMEM_BUDGET,
    WGMMA_ROWS,
    interpreter_params,
    load_vector,
    split_k,
    tiled,
)
from .block_sizes import BlockSizes

W8A8_MGPU_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
MIN_TC, MAX_TC = 16, 256  # rhs tile (the wgmma N side): powers of two
MIN_TK, MAX_TK = 32, 256  # K elements (bytes) per step: powers of two, >= the 32 B swizzle
MAX_ACC = 128 * 128  # accumulator elements per warpgroup (128 registers a thread)
SWAP_BELOW_M = 64  # M below this: compute y^T so that M is the narrow wgmma N side
_NT = (((1,), (1,)), ((), ()))


class W8A8Plan(NamedTuple):
    """Static tiling of one call. The kernel computes out (R, C) = lhs (R, K) @ rhs (C, K).T
    over `k_main` of K; with `swap` lhs is qvalue (R = N) and rhs xq (C = M), else the
    reverse."""

    swap: bool  # True: y^T = qvalue @ xq^T (decode); False: y = xq @ qvalue^T
    tr: int  # lhs rows per CTA (64 or 128)
    tc: int  # rhs rows per CTA (power of two, 16..256)
    tk: int  # K elements per step (power of two, 32..256)
    k_main: int  # K the kernel covers (multiple of tk); XLA does the rest
    n_main: int  # rows of N the kernel covers (multiple of its tile); XLA does the rest
    m_pad: int  # M padded to a multiple of its tile
    k_splits: int  # CTAs along K; scaled partial results added by XLA








def unsupported_reason(m: int, n: int, k: int, dtype: Any) -> str | None:
    """Why the Mosaic GPU W8A8 kernel cannot take xq (m, k) x qvalue (n, k), or None.

    The rules: `dtype` (of both operands) int8 or float8_e4m3fn; K a multiple of 32 and N
    a multiple of 8 (TMA tiles the whole xq and qvalue arrays with an (8, >= 32 byte)
    swizzled tile, so their dimensions must be multiples of it); M >= 1 (any M is padded).
    """
    if jnp.dtype(dtype) not in W8A8_MGPU_DTYPES:
        return (f"dtype={jnp.dtype(dtype)} has no Mosaic GPU W8A8 kernel; use int8 or "
                "float8_e4m3fn")
    if m < 1 or n < 1 or k < 1:
        return f"empty problem (M={m}, N={n}, K={k})"
    if k % MIN_TK:
        return (f"K={k}; the Mosaic GPU W8A8 kernel needs a multiple of {MIN_TK} "
                "(TMA swizzle tile)")
    if n % 8:
        return f"N={n}; the Mosaic GPU W8A8 kernel needs a multiple of 8 (TMA)"
    return None


def default_block_sizes(m: int) -> BlockSizes:
    """This kernel's defaults (not measured): a 128-byte K step (one 128 B swizzle)."""
    if m < SWAP_BELOW_M:
        return BlockSizes(block_m=16, block_n=128, block_k=128)
    return BlockSizes(block_m=128, block_n=128, block_k=128)


def _smem_bytes(tr: int, tc: int, tk: int) -> int:
    """SMEM of one CTA: double-buffered 8-bit lhs and rhs tiles, the f32 output tile."""
    return 2 * (tr + tc) * tk + tr * tc * 4


def plan_w8a8_mgpu(m: int, n: int, k: int, dtype: Any, block_sizes: BlockSizes, *,
                   strict: bool) -> W8A8Plan:
    """Fit `block_sizes` to the problem. `strict` (user-given sizes) raises instead of fixing.

    M < 64 (swap): block_n -> tr (the tile of N), 64 or 128; block_m -> tc, a power of two
    in [16, 64] not above M rounded up. M >= 64: block_m -> tr (tile of M), 64 or 128;
    block_n -> tc (tile of N), a power of two in [16, 256], not above N. The accumulator
    is capped at 128 x 128 f32 (tr x tc), SMEM at 200 KiB. block_k -> tk, a power of two
    in [32, 256]; unless `strict`, halved while it does not divide K (down to 32, which
    always does), so only an explicit block_k leaves a K tail to XLA. Then K is split
    over CTAs by `_mgpu.split_k` (about one CTA per SM, >= 4 steps per split).
    """
    reason = unsupported_reason(m, n, k, dtype)
    if reason is not None:
        raise ValueError(reason)
    swap = m < SWAP_BELOW_M
    b_r, b_c = (block_sizes.block_n, block_sizes.block_m) if swap else (
        block_sizes.block_m, block_sizes.block_n)
    r_name, c_name = ("block_n", "block_m") if swap else ("block_m", "block_n")
    if strict:
        if b_r not in (WGMMA_ROWS, 2 * WGMMA_ROWS):
            raise ValueError(f"{r_name}={b_r} must be 64 or 128 on Mosaic GPU W8A8 (the "
                             "wgmma M side)")
        for name, value in ((c_name, b_c), ("block_k", block_sizes.block_k)):
            if not is_pow2(value):
                raise ValueError(f"{name}={value} must be a power of two on Mosaic GPU")
    c_size = m if swap else n
    tr = 2 * WGMMA_ROWS if b_r >= 2 * WGMMA_ROWS else WGMMA_ROWS
    if swap and tr > WGMMA_ROWS and n < tr:
        tr = WGMMA_ROWS
    if not swap:
        tr = min(tr, max(WGMMA_ROWS, -(-m // WGMMA_ROWS) * WGMMA_ROWS))
    c_cap = 64 if swap else MAX_TC
    tc = max(MIN_TC, min(c_cap, floor_pow2(b_c)))
    tc = min(tc, max(MIN_TC, next_pow2(c_size) if swap else floor_pow2(c_size)))
    tc = min(tc, MAX_ACC // tr)
    tk = max(MIN_TK, min(MAX_TK, floor_pow2(block_sizes.block_k)))
    if not strict:
        while tk > MIN_TK and (tk > k or k % tk):
            tk //= 2
    while tc > MIN_TC and _smem_bytes(tr, tc, tk) > SMEM_BUDGET:
        tc //= 2
    k_main = k // tk * tk
    if swap:
        n_main, m_pad = n // tr * tr, -(-m // tc) * tc
        ctas = max(1, n_main // tr) * (m_pad // tc)
    else:
        n_main, m_pad = n // tc * tc, -(-m // tr) * tr
        ctas = max(1, n_main // tc) * (m_pad // tr)
    n_steps = k_main // tk
    k_splits = split_k(n_steps, 1, ctas)
    return W8A8Plan(swap=swap, tr=tr, tc=tc, tk=tk, k_main=k_main, n_main=n_main,
                    m_pad=m_pad, k_splits=k_splits)


# ---- the kernel -------------------------------------------------------------------------

def _operand_swizzle(tk: int, k: int) -> int:
    """One swizzle for both operands (wgmma needs them equal); TMA tiles the whole arrays,
    so it must divide all of K, not just the step."""
    return plgpu.find_swizzle(math.gcd(tk, k) * 8)


def _kernel(lhs_gmem, rhs_gmem, rs_gmem, cs_gmem, o_gmem, o_smem, *rhs_t_smem,
            plan: W8A8Plan, acc_dtype, x_is_rows: bool, interpret: bool):
    tr, tc, tk = plan.tr, plan.tc, plan.tk
    steps = plan.k_main // tk // plan.k_splits
    ri, ci, si = lax.axis_index("r"), lax.axis_index("c"), lax.axis_index("k")
    rows, cols = pl.ds(ri * tr, tr), pl.ds(ci * tc, tc)
    ks = pl.ds(si * steps * tk, steps * tk)
    transforms = tiled(_operand_swizzle(tk, lhs_gmem.shape[1]), 1)

    def scope(acc_ref):
        def body(idx, lhs_smem, rhs_smem):
            del idx
            if interpret:  # the interpreter cannot read a transposed operand: copy it
                rhs_t_smem[0][...] = rhs_smem[...].T
                plgpu.commit_smem()
                rhs = rhs_t_smem[0]
            else:
                rhs = plgpu.transpose_ref(rhs_smem, (1, 0))
            plgpu.wgmma(acc_ref, lhs_smem, rhs)
            plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=[plgpu.BlockSpec((tr, tk), lambda t: (0, t), transforms=transforms),
                      plgpu.BlockSpec((tc, tk), lambda t: (0, t), transforms=transforms)],
            max_concurrent_steps=2,
        )(lhs_gmem.at[rows, ks], rhs_gmem.at[cols, ks])
        return acc_ref[...]

    acc = pl.run_scoped(scope, plgpu.ACC((tr, tc), acc_dtype)).astype(jnp.float32)
    r_scale = lax.broadcast_in_dim(load_vector(rs_gmem.at[rows], 1, interpret), (tr, tc), [0])
    c_scale = lax.broadcast_in_dim(load_vector(cs_gmem.at[cols], 0, interpret), (tr, tc), [1])
    # The reference's order: (acc * x_scale) * w_scale.
    o_smem[...] = (acc * r_scale) * c_scale if x_is_rows else (acc * c_scale) * r_scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, rows, cols])
    plgpu.wait_smem_to_gmem(0)


def _xla(xq, xs, qvalue, ws):
    """(xq @ qvalue.T in int32 or f32) * xs * ws.T in f32, as the reference does."""
    acc_t = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    acc = lax.dot_general(xq, qvalue, _NT, preferred_element_type=acc_t).astype(jnp.float32)
    return acc * xs.astype(jnp.float32) * ws.astype(jnp.float32).T


def _validate(xq, x_scale, qvalue, w_scale) -> None:
    if xq.dtype != qvalue.dtype or jnp.dtype(xq.dtype) not in W8A8_MGPU_DTYPES:
        raise ValueError(f"W8A8 needs int8 or float8_e4m3fn xq and qvalue of the same dtype, "
                         f"got {xq.dtype} and {qvalue.dtype}")
    if xq.ndim != 2 or qvalue.ndim != 2 or xq.shape[1] != qvalue.shape[1]:
        raise ValueError(f"xq (M, K)={xq.shape} and qvalue (N, K)={qvalue.shape} disagree")
    if x_scale.shape != (xq.shape[0], 1):
        raise ValueError(f"x_scale.shape={x_scale.shape} must be {(xq.shape[0], 1)}")
    if w_scale.shape != (qvalue.shape[0], 1):
        raise ValueError(f"w_scale.shape={w_scale.shape} must be {(qvalue.shape[0], 1)} "
                         "(per-channel weight scales)")


def w8a8_matmul_mgpu(xq, x_scale, qvalue, w_scale, *, out_dtype, interpret: Any = False,
                     block_sizes: BlockSizes | None = None):
    """(xq (M, K) @ qvalue (N, K).T) * x_scale (M, 1) * w_scale (N, 1).T -> (M, N) out_dtype.

    xq and qvalue both int8 (int32 accumulation) or both float8_e4m3fn (f32 accumulation);
    scales of any float dtype, applied in f32. Any M; N and K must pass
    `unsupported_reason` (multiples of 8 and 32). Rows of N past the kernel's last whole
    tile and K past its last whole step are computed by XLA and added, so the result is
    the reference's up to the order of f32 operations. `interpret`: False (compile for
    the GPU), True or an `InterpretGPUParams` (run in the Mosaic GPU interpreter on CPU).
    `block_sizes`: explicit tiles, checked strictly (see `plan_w8a8_mgpu`); default
    `default_block_sizes(M)`.

    Raises:
      ValueError: mismatched dtypes or shapes, a problem `unsupported_reason` rejects, or
        illegal explicit block sizes.
    """
    _validate(xq, x_scale, qvalue, w_scale)
    m, k = xq.shape
    n = qvalue.shape[0]
    strict = block_sizes is not None
    plan = plan_w8a8_mgpu(m, n, k, xq.dtype, block_sizes or default_block_sizes(m),
                          strict=strict)
    return _forward(xq, x_scale, qvalue, w_scale, plan=plan, out_dtype=jnp.dtype(out_dtype),
                    interpret=interpreter_params(interpret))


@functools.partial(jax.jit, static_argnames=("plan", "out_dtype", "interpret"))
def _forward(xq, x_scale, qvalue, w_scale, *, plan: W8A8Plan, out_dtype, interpret):
    m, k = xq.shape
    n = qvalue.shape[0]
    xs = x_scale.astype(jnp.float32)
    ws = w_scale.astype(jnp.float32)
    if plan.n_main == 0 or plan.k_main == 0:
        return _xla(xq, xs, qvalue, ws).astype(out_dtype)
    xq_p = jnp.pad(xq, ((0, plan.m_pad - m), (0, 0)))
    xs_p = jnp.pad(xs.reshape(-1), (0, plan.m_pad - m))
    ws_main = ws.reshape(-1)[:plan.n_main]
    if plan.swap:
        lhs, rhs, r_scale, c_scale = qvalue, xq_p, ws_main, xs_p
        r_size, c_size = plan.n_main, plan.m_pad
    else:
        lhs, rhs, r_scale, c_scale = xq_p, qvalue, xs_p, ws_main
        r_size, c_size = plan.m_pad, plan.n_main
    acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    kernel = functools.partial(_kernel, plan=plan, acc_dtype=acc_dtype,
                               x_is_rows=not plan.swap, interpret=interpret is not None)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((plan.k_splits, r_size, c_size), jnp.float32),
        grid=(r_size // plan.tr, c_size // plan.tc, plan.k_splits),
        grid_names=("r", "c", "k"),
        scratch_types=[plgpu.SMEM((plan.tr, plan.tc), jnp.float32,
                                  transforms=tiled(plgpu.find_swizzle(plan.tc * 4 * 8), 4))]
        # interpreter only: the rhs tile transposed (see `_kernel`)
        + ([] if interpret is None else [plgpu.SMEM((plan.tk, plan.tc), xq.dtype)]),
        compiler_params=plgpu.CompilerParams(),
        # only when interpreting: a compiled call passes nothing a newer JAX might rename
        **({} if interpret is None else dict(interpret=interpret)),
    )
    out = jnp.sum(call(lhs, rhs, r_scale, c_scale), axis=0)  # (R, C) f32, scaled
    y = (out.T if plan.swap else out)[:m]  # (m, n_main)
    if plan.k_main < k:
        y = y + _xla(xq[:, plan.k_main:], xs, qvalue[:plan.n_main, plan.k_main:], ws_main[:, None])
    if plan.n_main < n:
        y = jnp.concatenate([y, _xla(xq, xs, qvalue[plan.n_main:], ws[plan.n_main:])], axis=1)
    return y.astype(out_dtype)
