"""Pallas Mosaic GPU kernel (Hopper, sm_90): weight-only W{8,4}A16 matmul with `wgmma`.

Validated only on CPU: numerics in the Mosaic GPU interpreter (`InterpretGPUParams`,
simulated GMEM / SMEM, TMA copies, barriers and `wgmma`), lowering with
`jax.export(..., platforms=["cuda"])` (a `mosaic_gpu_v2` custom call). It has never run
on a GPU: nothing here has been through ptxas or measured, so its speed is unknown and a
kernel that exports can still fail to compile on an H100.

This is the Mosaic GPU counterpart of `_gpu.py` (Triton lowering, deprecated from JAX
0.11). It takes the same inputs: the activation planes of `_formats.split_activations`
(4-bit formats: `x_lo @ W_lo.T + x_hi @ W_hi.T` over byte-aligned nibble planes; 8-bit:
one plane), `qvalue` (N, Kbytes), `scale` (N, G) and, for uint4, `zero_point` (N, G).

**Swap AB.** The kernel computes y^T (N, M) = dequant(W) (N, K) @ x^T (K, M): N (large,
the weight rows) is the 64-row wgmma M side and M (small at decode) the wgmma N side,
padded to a tile `tm` of 16..128 rows (wgmma needs N >= 8, and a bf16 x^T tile narrower
than 16 columns has no legal swizzle). The x planes are passed transposed, (Kbytes, M),
by an XLA transpose of the (small) activations.

One CTA (one warpgroup) owns a tn (multiple of 64) x tm output tile and a contiguous range
of K steps (split K: with few N tiles at decode, K is split so that about one CTA per SM
runs; the f32 partial sums are added by XLA). `plgpu.emit_pipeline` streams, per K step
of `tkb` bytes per plane, the weight tile (tn, tkb) and each x^T plane tile (tkb, tm)
GMEM -> SMEM by TMA (double-buffered). The step then:

1. loads the code tile into registers (WGMMA layout, from a swizzled SMEM tile),
2. per plane: splits nibbles and decodes them with `_formats.code_planes` / `decode` (the
   one decoder every kernel and the reference share: int4 sign, NF4 / FP4 E2M1 select
   chain, fp8 convert), applies `(code - zero_point) * scale` in f32 with the scale of
   the step's group (one (tn,) row, broadcast along K), rounds to x's dtype exactly like
   `quantized_matmul_reference`,
3. stores the bf16/f16 tile to a swizzled SMEM staging buffer, `commit_smem`, and issues
   `wgmma(acc, w_staged, x^T tile)` (both operands in SMEM), then waits for it.

A step never straddles a group: it is one group (`tkb` = group bytes) or a fraction of
one (groups over 128 bytes per plane take several steps with the same scale row).
Per-channel steps are `block_k` bytes with the single scale row.

Why the LHS is staged in SMEM rather than fed from registers (as jax's
`ops/gpu/hopper_mixed_type_matmul_mgpu.py` does): the interpreter of JAX 0.10 reads both
`wgmma` operands from simulated memory, so a register LHS cannot be checked on CPU. The
SMEM round trip costs SMEM bandwidth, not HBM bandwidth, which bounds decode. The
register variant exists as an opt-in (`plan_mgpu(..., lhs_in_registers=True)`): it lowers
for every qtype, but its numerics have not been checked anywhere.

Constraints (`unsupported_reason`): x bfloat16 or float16 (wgmma has no f32 x f32 other
than tf32, which would not match the reference's rounding); grouped weights need a group
of a power of two >= 32 bytes per plane (4-bit group sizes 64, 128, ...; 8-bit 32, ...),
so mxfp4 and nvfp4 at the block sizes they are defined with (32 and 16) stay with the
Triton kernel (mxfp4) or XLA (nvfp4), and only per-channel or >= 64-element groups of them
reach this kernel; `qvalue`'s K bytes a multiple of 32 and N a multiple of 8, because TMA
tiles the whole weight array (not just the slice read) with an (8, >= 32-byte) swizzled
tile. Within those, shapes are free: rows of N past the last whole `tn` tile are computed
by XLA inside `weight_only_matmul_mgpu`; K past `plan.kb_main` (a short last group, bytes
past the last whole step, K below one step) is left to the caller's XLA tail, as for
`_gpu.py`.

Layouts: the scale / zero-point row is loaded with `plgpu.load(..., layout=WGMMA row)`
so it broadcasts against the code tile; the interpreter of JAX 0.10 has no rule for
`plgpu.load` or `layout_cast`, so under `interpret` the same values are read with a plain
`ref[...]` (layouts are no-ops there). That is the only difference between the two paths.
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

from ._formats import (
    PACKED_QTYPES,
    QTYPES,
    code_planes,
    decode,
    dot_nt,
    floor_pow2,
    group_bytes,
    is_pow2,
    next_pow2,
    packed_k,
)
from .block_sizes import BlockSizes

# Facts of the Mosaic GPU target that `_mgpu_w8a8.py` shares (imported from here).
MGPU_CUSTOM_CALL = "mosaic_gpu_v2"
WGMMA_ROWS = 64  # rows of one warpgroup's wgmma accumulator
SMEM_BUDGET = 200 * 1024  # of the 227 KiB an H100 block may use
NUM_SMS = 132  # H100 SXM; only sets how far K is split at decode
MIN_STEPS_PER_SPLIT = 4  # K steps a CTA of a split K runs at least

MGPU_X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MIN_TM, MAX_TM = 16, 128  # tile of M: >= 16 for a legal x^T swizzle, <= 128 (registers)
MIN_STEP, MAX_STEP = 32, 128  # bytes of K per plane per step (swizzle >= 32, registers)
_TILE_ELEMS = 64 * 128  # f32 elements of one register tile per warpgroup (64 per thread)


class MgpuPlan(NamedTuple):
    """Static tiling of one call; `kb_main` bytes of K go to the kernel, the rest to XLA."""

    tn: int  # rows of N per CTA (multiple of 64)
    tm: int  # rows of M per CTA (power of two, 16..128)
    tkb: int  # bytes of K per plane per step
    kb_main: int  # bytes per plane the kernel covers
    n_main: int  # rows of N the kernel covers (multiple of tn); XLA does the rest
    m_pad: int  # M padded to a multiple of tm
    k_splits: int  # CTAs along K; partial sums added by XLA
    steps_per_group: int  # K steps sharing one scale row (1 unless a group > MAX_STEP)
    lhs_in_registers: bool = False  # see `plan_mgpu`










def unsupported_reason(qtype: str, k: int, group_size: int | None, *, x_dtype: Any = None,
                       n: int | None = None) -> str | None:
    """Why the Mosaic GPU kernel cannot take this problem, or None if it can.

    `x_dtype` and `n` (rows of the stored weight) are checked when given. The rules:
    x bfloat16 or float16; a group of a power of two >= 32 bytes per plane; `qvalue`'s K
    bytes a multiple of 32 and N a multiple of 8 (TMA tiles the whole weight array with
    an (8, >= 32 byte) swizzled tile, so its dimensions must be multiples of the tile).
    """
    if qtype not in QTYPES:
        return f"unknown {qtype=}; expected one of {QTYPES}"
    if x_dtype is not None and jnp.dtype(x_dtype) not in MGPU_X_DTYPES:
        return (f"x.dtype={jnp.dtype(x_dtype)} has no Mosaic GPU kernel; use bfloat16 or "
                "float16 (wgmma takes 16-bit floats; f32 would run as tf32)")
    gb = group_bytes(qtype, k, group_size)
    if gb is not None and not (is_pow2(gb) and gb >= MIN_STEP):
        return (f"{group_size=} gives {gb} bytes per group and plane; the Mosaic GPU kernel "
                f"needs a power of two >= {MIN_STEP} (group sizes 64, 128, ... for 4-bit, "
                "32, 64, ... for 8-bit)")
    kbytes = packed_k(qtype, k, group_size)
    if kbytes % MIN_STEP:
        return (f"qvalue has {kbytes} bytes along K ({qtype=}, {k=}, {group_size=}); the "
                f"Mosaic GPU kernel needs a multiple of {MIN_STEP} (TMA swizzle tile)")
    if n is not None and n % 8:
        return f"N={n} rows of the weight; the Mosaic GPU kernel needs a multiple of 8 (TMA)"
    return None


def plan_mgpu(qtype: str, k: int, group_size: int | None, m: int, n: int,
              block_sizes: BlockSizes, *, strict: bool,
              lhs_in_registers: bool = False) -> MgpuPlan:
    """Fit `block_sizes` to the problem. `strict` (user-given sizes) raises instead of fixing.

    block_n -> tn, a multiple of 64 (one warpgroup's wgmma rows) up to 256, not above N
    rounded up to 64; block_m -> tm, a power of two in [16, 128], not above M rounded up
    to a power of two; block_k (per-channel only) -> bytes per step, a power of two in
    [32, 128], halved while it does not divide K (down to 32). Grouped steps are one
    group, or an equal share of one over 128 bytes.
    Then registers (tn x tm and tn x tkb f32 tiles of <= 8192 elements: 64 registers a
    thread each) and SMEM (<= 200 KiB) cap tm and tkb, and K is split over CTAs until
    about `NUM_SMS` CTAs run (whole groups, >= 4 steps per split).

    `lhs_in_registers=True` feeds the dequantized tile to `wgmma` straight from registers
    (as jax's `hopper_mixed_type_matmul_mgpu.py` does) instead of staging it in SMEM. It
    lowers for every qtype but the JAX 0.10 interpreter cannot run it, so its numerics
    are unchecked: opt-in, for benchmarking on a GPU.
    """
    reason = unsupported_reason(qtype, k, group_size, n=n)
    if reason is not None:
        raise ValueError(reason)
    if strict:
        if block_sizes.block_n % WGMMA_ROWS or block_sizes.block_n > 4 * WGMMA_ROWS:
            raise ValueError(f"block_n={block_sizes.block_n} must be a multiple of "
                             f"{WGMMA_ROWS} up to {4 * WGMMA_ROWS} on Mosaic GPU (wgmma rows)")
        for name in ("block_m", "block_k"):
            value = getattr(block_sizes, name)
            if not is_pow2(value):
                raise ValueError(f"{name}={value} must be a power of two on Mosaic GPU")
    tn = min(4 * WGMMA_ROWS, max(WGMMA_ROWS, block_sizes.block_n // WGMMA_ROWS * WGMMA_ROWS))
    while tn > WGMMA_ROWS and tn > n:
        tn -= WGMMA_ROWS
    # Registers: the f32 accumulator and the f32 dequantized tile, <= 64 per thread each.
    max_tm = min(MAX_TM, floor_pow2(_TILE_ELEMS // tn))
    max_step = max(MIN_STEP, min(MAX_STEP, floor_pow2(_TILE_ELEMS // tn)))
    tm = max(MIN_TM, min(max_tm, floor_pow2(block_sizes.block_m), next_pow2(m)))
    kbytes = packed_k(qtype, k, group_size)
    gb = group_bytes(qtype, k, group_size)
    if gb is not None:
        tkb = min(gb, max_step)
        kb_main = (k // group_size) * gb
    else:
        step = block_sizes.block_k // 2 if qtype in PACKED_QTYPES else block_sizes.block_k
        tkb = min(max_step, max(MIN_STEP, floor_pow2(step)))
        while tkb > MIN_STEP and (tkb > kbytes or kbytes % tkb):
            tkb //= 2  # prefer a step that divides K: no tail for XLA to read
        if kbytes % tkb:
            tkb = min(max_step, max(MIN_STEP, floor_pow2(min(step, kbytes))))
        kb_main = kbytes // tkb * tkb
    n_planes = 2 if qtype in PACKED_QTYPES else 1
    staged_planes = 0 if lhs_in_registers else n_planes
    while tm > MIN_TM and _smem_bytes(tn, tm, tkb, n_planes, staged_planes) > SMEM_BUDGET:
        tm //= 2
    steps_per_group = gb // tkb if gb is not None else 1
    n_main = n // tn * tn
    m_pad = -(-m // tm) * tm
    # Split K so that about one CTA per SM runs, in whole groups, >= 4 steps per split.
    n_steps = kb_main // tkb
    ctas = max(1, n_main // tn) * (m_pad // tm)
    k_splits = split_k(n_steps, steps_per_group, ctas)
    return MgpuPlan(tn=tn, tm=tm, tkb=tkb, kb_main=kb_main, n_main=n_main, m_pad=m_pad,
                    k_splits=k_splits, steps_per_group=steps_per_group,
                    lhs_in_registers=lhs_in_registers)


def split_k(n_steps: int, steps_per_group: int, ctas: int) -> int:
    """CTAs along K: the most that keeps about one CTA per SM (`NUM_SMS`), splits of whole
    groups of `steps_per_group` steps, and >= `MIN_STEPS_PER_SPLIT` steps per split."""
    groups = n_steps // steps_per_group
    k_splits = 1
    for s in range(1, groups + 1):
        if groups % s or n_steps // s < MIN_STEPS_PER_SPLIT or ctas * s > NUM_SMS:
            continue
        k_splits = s
    return k_splits


def _smem_bytes(tn: int, tm: int, tkb: int, n_planes: int, staged_planes: int) -> int:
    """SMEM of one CTA: double-buffered code and x^T tiles, staging tiles, output tile."""
    return (2 * tn * tkb + 2 * n_planes * tkb * tm * 2 + staged_planes * tn * tkb * 2
            + tn * tm * 4)


# ---- in-kernel pieces -------------------------------------------------------------------

def _swizzle(minor_bytes: int) -> int:
    return plgpu.find_swizzle(minor_bytes * 8)


def tiled(swizzle: int, itemsize: int) -> tuple[Any, ...]:
    """(8, swizzle bytes) tiling and the swizzle, for a tile of `itemsize`-byte elements."""
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _operand_swizzle(plan: MgpuPlan) -> int:
    """One swizzle for both wgmma operands (it must match): the staged weight tile
    (tn, tkb) and the x^T tile (tkb, tm), both 16-bit."""
    return min(_swizzle(plan.tm * 2), _swizzle(plan.tkb * 2))


def load_vector(ref, axis: int, interpret: bool):
    """A vector of scales from GMEM as f32, laid out to broadcast along `axis` of a
    WGMMA-layout tile. The JAX 0.10 interpreter has no rule for `plgpu.load`, and layouts
    are no-ops there, so under `interpret` it is a plain read."""
    if interpret:
        return ref[...].astype(jnp.float32)
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(axis),
                      optimized=False).astype(jnp.float32)


def _kernel(*refs, qtype, n_planes, plan: MgpuPlan, has_zp, grouped, interpret):
    xt_gmem = refs[:n_planes]
    w_gmem, s_gmem = refs[n_planes:n_planes + 2]
    zp_gmem = refs[n_planes + 2] if has_zp else None
    o_gmem = refs[n_planes + 2 + has_zp]
    staged = refs[n_planes + 3 + has_zp:-1]  # empty when the LHS stays in registers
    o_smem = refs[-1]
    tn, tm, tkb = plan.tn, plan.tm, plan.tkb
    x_dtype = xt_gmem[0].dtype
    steps = plan.kb_main // tkb // plan.k_splits

    ni, mi, si = lax.axis_index("n"), lax.axis_index("m"), lax.axis_index("k")
    n_rows = pl.ds(ni * tn, tn)
    k_bytes = pl.ds(si * steps * tkb, steps * tkb)

    def row(ref, t):
        return load_vector(ref.at[t, n_rows], 1, interpret)  # broadcast along K

    if not grouped:
        s0 = row(s_gmem, 0)
        zp0 = None if zp_gmem is None else row(zp_gmem, 0)

    x_transforms = tiled(_operand_swizzle(plan), 2)
    # TMA tiles the whole GMEM array, so the swizzle must divide all of qvalue's K bytes.
    w_transforms = tiled(_swizzle(math.gcd(tkb, w_gmem.shape[1])), 1)

    def scope(acc_ref):
        def body(idx, w_smem, *xt_smem):
            (t,) = idx
            if grouped:
                g = (si * steps + t) // plan.steps_per_group
                s = row(s_gmem, g)
                zp = None if zp_gmem is None else row(zp_gmem, g)
            else:
                s, zp = s0, zp0
            tiles = []
            for codes in code_planes(w_smem[...], qtype):  # int32 nibbles: no 8-bit math
                w = decode(codes, qtype)
                if zp is not None:
                    w = w - lax.broadcast_in_dim(zp, w.shape, [0])
                w = w * lax.broadcast_in_dim(s, w.shape, [0])
                tiles.append(w.astype(x_dtype))
            if plan.lhs_in_registers:
                for p in range(n_planes):
                    plgpu.wgmma(acc_ref, tiles[p], xt_smem[p])
            else:
                for p in range(n_planes):
                    staged[p][...] = tiles[p]
                plgpu.commit_smem()
                for p in range(n_planes):
                    plgpu.wgmma(acc_ref, staged[p], xt_smem[p])
            plgpu.wgmma_wait(0)  # the staging buffers are rewritten next step

        plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=(
                [plgpu.BlockSpec((tn, tkb), lambda t: (0, t), transforms=w_transforms)]
                + [plgpu.BlockSpec((tkb, tm), lambda t: (t, 0), transforms=x_transforms)
                   for _ in range(n_planes)]),
            max_concurrent_steps=2,
        )(w_gmem.at[n_rows, k_bytes],
          *[x.at[k_bytes, pl.ds(mi * tm, tm)] for x in xt_gmem])
        return acc_ref[...]

    acc = pl.run_scoped(scope, plgpu.ACC((tn, tm), jnp.float32))
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, n_rows, pl.ds(mi * tm, tm)])
    plgpu.wait_smem_to_gmem(0)


def _rows_matmul_xla(x_planes, qvalue, scale, zero_point, *, qtype, kb, steps_bytes, grouped):
    """sum_p x_p (M, kb) @ dequant(plane p of qvalue[:, :kb]).T in f32, for the rows of N
    the kernel leaves (fewer than one tile). Same rounding as the reference."""
    if grouped:
        s = jnp.repeat(scale.astype(jnp.float32)[:, :kb // steps_bytes], steps_bytes, axis=1)
        zp = None if zero_point is None else jnp.repeat(
            zero_point.astype(jnp.float32)[:, :kb // steps_bytes], steps_bytes, axis=1)
    else:
        s = scale.astype(jnp.float32)[:, :1]
        zp = None if zero_point is None else zero_point.astype(jnp.float32)[:, :1]
    y = jnp.zeros((x_planes[0].shape[0], qvalue.shape[0]), jnp.float32)
    for xp, codes in zip(x_planes, code_planes(qvalue[:, :kb], qtype)):
        w = decode(codes, qtype)
        w = ((w if zp is None else w - zp) * s).astype(xp.dtype)
        y = y + dot_nt(xp, w)
    return y


@functools.partial(jax.jit, static_argnames=(
    "plan", "qtype", "k", "group_size", "out_dtype", "interpret"))
def weight_only_matmul_mgpu(x_planes, qvalue, scale, zero_point, *, plan: MgpuPlan,
                            qtype: str, k: int, group_size: int | None, out_dtype,
                            interpret: Any = False):
    """Sum over planes p of x_planes[p] (M, kb_main) @ dequant(plane p of qvalue)[:, :kb_main].T.

    Returns (M, N) in `out_dtype`; the caller adds the part of K past `plan.kb_main`.
    Rows of N past `plan.n_main` are computed here by XLA. `interpret`: False (compile for
    the GPU), True or an `InterpretGPUParams` (run in the Mosaic GPU interpreter on CPU).
    """
    x_planes = list(x_planes)
    m, n = x_planes[0].shape[0], qvalue.shape[0]
    x_dtype = jnp.dtype(x_planes[0].dtype)
    if x_dtype not in MGPU_X_DTYPES:
        raise ValueError(f"x.dtype={x_dtype} must be bfloat16 or float16 on Mosaic GPU")
    if any(xp.shape != (m, plan.kb_main) for xp in x_planes):
        raise ValueError(f"x planes must be (M, kb_main={plan.kb_main}), got "
                         f"{[xp.shape for xp in x_planes]}")
    grouped = group_bytes(qtype, k, group_size) is not None
    gb = group_bytes(qtype, k, group_size)
    y = jnp.zeros((m, n), jnp.float32)
    if plan.n_main < n:
        y = y.at[:, plan.n_main:].set(_rows_matmul_xla(
            x_planes, qvalue[plan.n_main:], scale[plan.n_main:],
            None if zero_point is None else zero_point[plan.n_main:], qtype=qtype,
            kb=plan.kb_main, steps_bytes=gb, grouped=grouped))
    if plan.n_main == 0 or plan.kb_main == 0:
        return y.astype(out_dtype)

    n_groups = plan.kb_main // gb if grouped else 1
    # x^T planes (kb_main, m_pad); scales transposed (G, N) so a step reads one row.
    xt = [jnp.pad(xp, ((0, plan.m_pad - m), (0, 0))).T for xp in x_planes]
    rows = [scale] if zero_point is None else [scale, zero_point]
    rows = [r[:plan.n_main, :n_groups].T for r in rows]
    interpret_params = interpreter_params(interpret)
    if interpret_params is not None and plan.lhs_in_registers:
        raise ValueError("plan.lhs_in_registers has no interpreter support (JAX 0.10 reads "
                         "both wgmma operands from simulated memory); use the SMEM plan")
    n_planes = len(x_planes)
    tn, tm, tkb = plan.tn, plan.tm, plan.tkb
    x_sw = _operand_swizzle(plan)
    kernel = functools.partial(
        _kernel, qtype=qtype, n_planes=n_planes, plan=plan, has_zp=zero_point is not None,
        grouped=grouped, interpret=interpret_params is not None)
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((plan.k_splits, plan.n_main, plan.m_pad), jnp.float32),
        grid=(plan.n_main // tn, plan.m_pad // tm, plan.k_splits),
        grid_names=("n", "m", "k"),
        scratch_types=(
            [plgpu.SMEM((tn, tkb), x_dtype, transforms=tiled(x_sw, 2))
             for _ in range(0 if plan.lhs_in_registers else n_planes)]
            + [plgpu.SMEM((tn, tm), jnp.float32, transforms=tiled(_swizzle(tm * 4), 4))]),
        compiler_params=plgpu.CompilerParams(),
        # only when interpreting: a compiled call passes nothing a newer JAX might rename
        **({} if interpret_params is None else dict(interpret=interpret_params)),
    )
    yt = call(*xt, qvalue, *rows)  # (k_splits, n_main, m_pad) f32
    y = y.at[:, :plan.n_main].set(jnp.sum(yt, axis=0).T[:m])
    return y.astype(out_dtype)


def interpreter_params(interpret: Any):
    """`interpret` as the kernels' wrappers take it (False / None: compile for the GPU;
    True: default interpreter; an `InterpretGPUParams`: as given) -> the params or None."""
    if interpret is None or interpret is False:
        return None
    if interpret is True:
        # a private module of JAX 0.10, imported only when interpreting
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()
    return interpret
