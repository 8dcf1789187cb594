"""Pallas TPU (Mosaic) grouped matmul: weight-only W{8,4}A16 over a stack of experts.

Validated only on CPU: numerics in Pallas interpret mode, lowering with
`jax.export(..., platforms=["tpu"])`.

Grid (tile, N block, K block), K innermost and "arbitrary", as in `_tpu.py`, whose kernel
body this reuses: the only difference is the weight's block, chosen by the tile's expert,
which reaches the index maps by scalar prefetch (SMEM), so Pallas's pipeline DMAs the next
tile's expert weights while this one computes. A skipped tile keeps the last real tile's
expert (no new DMA) and writes zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _tpu
from ._formats import PACKED_QTYPES, is_per_channel, packed_k, split_activations
from .block_sizes import BlockSizes


def sublanes(dtype) -> int:
    """Rows of one native TPU tile of x: a tile's rows must be a multiple."""
    return _tpu._sublanes(dtype)


def plan(qtype: str, k: int, group_size: int | None, tm: int, n: int, x_dtype,
         block_sizes: BlockSizes) -> _tpu.TpuPlan | str:
    """The tiling of `_tpu.plan_tpu` with block_m = tm, or why the kernel cannot run."""
    sizes = BlockSizes(block_m=tm, block_n=block_sizes.block_n, block_k=block_sizes.block_k)
    p = _tpu.plan_tpu(qtype, k, group_size, tm, n, x_dtype, sizes, strict=False)
    if tm % sublanes(x_dtype):
        return f"{tm=} must be a multiple of {sublanes(x_dtype)} for {jnp.dtype(x_dtype)} x"
    if p.kb_main != packed_k(qtype, k, group_size):
        return (f"{k=} with {group_size=} is not whole TPU steps of whole groups (a short "
                f"last group, or K below one step); XLA takes it")
    if p.n_pad != n:
        return f"N={n} must be a multiple of 128 (or at most 2048) for the TPU kernel"
    return p


def _kernel(expert_ref, valid_ref, *refs, n_k, **kw):
    del expert_ref  # used by the index maps only
    o_ref = refs[-2]
    valid = valid_ref[pl.program_id(0)] != 0
    step = pl.program_id(2)

    @pl.when(valid)
    def _compute():
        _tpu._weight_only_kernel(*refs, n_k=n_k, step=step, **kw)

    @pl.when(jnp.logical_not(valid))
    def _skip():
        o_ref[...] = jnp.zeros_like(o_ref)


@functools.partial(jax.jit, static_argnames=("plan", "qtype", "k", "group_size", "interpret"))
def grouped_matmul_tpu(xt, qvalue, scale, zero_point, expert, valid, *, plan: _tpu.TpuPlan,
                       qtype: str, k: int, group_size: int | None, interpret=False):
    """Tile i of ``xt (tiles * tm, K)`` times ``dequantize(W[expert[i]])`` (zeros where
    ``valid[i] == 0``); returns ``(tiles * tm, N)`` in xt's dtype."""
    rows, n = xt.shape[0], qvalue.shape[1]
    tm, tiles = plan.bm, rows // plan.bm
    packed = qtype in PACKED_QTYPES
    gb = None if is_per_channel(k, group_size) else (group_size // 2 if packed else group_size)
    gpb = 1 if gb is None else plan.bkb // gb
    n_k = plan.kb_main // plan.bkb
    x_planes = split_activations(xt, qtype, k, group_size, plan.kb_main)
    blocks = jax.vmap(lambda s: _tpu._scale_blocks(s, plan.kb_main, gb, plan.bkb))
    scales = [blocks(s) for s in ([scale] if zero_point is None else [scale, zero_point])]

    def s_index(i, j, kk, e_ref, v_ref):
        return (e_ref[i], kk if gb is not None else 0, j, 0)

    in_specs = (
        [pl.BlockSpec((tm, plan.bkb), lambda i, j, kk, *_: (i, kk)) for _ in x_planes]
        + [pl.BlockSpec((None, plan.bn, plan.bkb),
                        lambda i, j, kk, e_ref, v_ref: (e_ref[i], j, kk))]
        + [pl.BlockSpec((None, None, plan.bn, gpb), s_index) for _ in scales]
    )
    kernel = functools.partial(_kernel, qtype=qtype, n_planes=len(x_planes), gpb=gpb, gb=gb,
                               has_zp=zero_point is not None, n_k=n_k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), xt.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(tiles, n // plan.bn, n_k),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, plan.bn), lambda i, j, kk, *_: (i, j)),
            scratch_shapes=[pltpu.VMEM((tm, plan.bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"grouped_matmul_{qtype}",
    )(expert, valid, *x_planes, qvalue, *scales)
