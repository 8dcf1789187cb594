"""Pallas GPU (Triton lowering) grouped matmul: weight-only W{8,4}A16 over a stack of experts.

Validated only on CPU: numerics in Pallas interpret mode, lowering with
`jax.export(..., platforms=["cuda"])` (the Triton custom call allowed, see
`_gpu.TRITON_CUSTOM_CALL`).

A program owns one (tile, N block) of the output and loops over K as `_gpu.py`'s prefill
path does (a group per step, tensor-core dots on the dequantized tile); the tile's expert
is read from the tile map in the kernel and indexes the stacked weight and scales, which
are passed whole (only the expert's rows are loaded). A skipped tile runs no step and
writes zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import _gpu
from ._formats import code_planes, decode, group_bytes, is_pow2, packed_k, split_activations
from .block_sizes import BlockSizes

MIN_TILE = _gpu._MIN_TILE  # rows of a tile: the smallest MMA operand side
_NT = (((1,), (1,)), ((), ()))


def plan(qtype: str, k: int, group_size: int | None, tm: int, n: int,
         block_sizes: BlockSizes) -> _gpu.GpuPlan | str:
    """The tiling of `_gpu.plan_gpu` with block_m = tm, or why the kernel cannot run."""
    problem = _gpu.unsupported_reason(qtype, k, group_size)
    if problem is not None:
        return problem
    if not (is_pow2(tm) and tm >= MIN_TILE):
        return f"{tm=} must be a power of two >= {MIN_TILE} on GPU (Triton tiles)"
    sizes = BlockSizes(block_m=tm, block_n=block_sizes.block_n, block_k=block_sizes.block_k)
    p = _gpu.plan_gpu(qtype, k, group_size, tm, n, sizes, strict=False)
    if p.kb_main != packed_k(qtype, k, group_size):
        return (f"{k=} with {group_size=} is not whole GPU steps of whole groups (a short "
                f"last group, or K not a multiple of the step); XLA takes it")
    if p.n_pad != n:
        return f"N={n} must be a multiple of {MIN_TILE} for the GPU kernel"
    return p


def _kernel(ids_ref, valid_ref, *refs, qtype, n_planes, step, n_steps, grouped, has_zp):
    x_refs = refs[:n_planes]
    w_ref, s_ref = refs[n_planes:n_planes + 2]
    zp_ref = refs[n_planes + 2] if has_zp else None
    o_ref = refs[-1]
    i = pl.program_id(0)
    e = ids_ref[i]
    x_dtype = x_refs[0].dtype

    def body(t, acc):
        off = pl.multiple_of(t * step, step)
        row = t if grouped else 0
        scale = s_ref[e, row, :].astype(jnp.float32)[:, None]
        zp = None if zp_ref is None else zp_ref[e, row, :].astype(jnp.float32)[:, None]
        for x_ref, codes in zip(x_refs, code_planes(w_ref[e, :, pl.ds(off, step)], qtype)):
            w = decode(codes, qtype)
            w = ((w if zp is None else w - zp) * scale).astype(x_dtype)
            acc += lax.dot_general(x_ref[:, pl.ds(off, step)], w, _NT,
                                   preferred_element_type=jnp.float32)
        return acc

    steps = jnp.where(valid_ref[i] != 0, n_steps, 0)
    acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("plan", "qtype", "k", "group_size", "interpret"))
def grouped_matmul_gpu(xt, qvalue, scale, zero_point, expert, valid, *, plan: _gpu.GpuPlan,
                       qtype: str, k: int, group_size: int | None, interpret=False):
    """Tile i of ``xt (tiles * tm, K)`` times ``dequantize(W[expert[i]])`` (zeros where
    ``valid[i] == 0``); returns ``(tiles * tm, N)`` in xt's dtype. Scales are passed
    transposed, ``(E, G, N)``, so a step reads one contiguous row of them."""
    if not _gpu.TRITON_AVAILABLE:
        raise ValueError(f"this JAX ({jax.__version__}) has no Pallas Triton backend")
    rows, (experts, n, kbytes) = xt.shape[0], qvalue.shape
    tm, tiles = plan.bm, rows // plan.bm
    grouped = group_bytes(qtype, k, group_size) is not None
    n_groups = plan.kb_main // plan.step if grouped else 1
    x_planes = split_activations(xt, qtype, k, group_size, plan.kb_main)
    scales = [jnp.swapaxes(s[:, :, :n_groups], 1, 2)
              for s in ([scale] if zero_point is None else [scale, zero_point])]
    whole = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    in_specs = (
        [whole(expert), whole(valid)]
        + [pl.BlockSpec((tm, plan.kb_main), lambda i, j: (i, 0)) for _ in x_planes]
        + [pl.BlockSpec((experts, plan.bn, kbytes), lambda i, j: (0, j, 0))]
        + [pl.BlockSpec((experts, n_groups, plan.bn), lambda i, j: (0, 0, j)) for _ in scales]
    )
    kernel = functools.partial(
        _kernel, qtype=qtype, n_planes=len(x_planes), step=plan.step,
        n_steps=plan.kb_main // plan.step, grouped=grouped, has_zp=zero_point is not None)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), xt.dtype),
        grid=(tiles, n // plan.bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, plan.bn), lambda i, j: (i, j)),
        compiler_params=_gpu.pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"grouped_matmul_{qtype}",
    )(expert, valid, *x_planes, qvalue, *scales)
