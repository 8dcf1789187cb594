"""Pallas TPU (Mosaic) paged attention: block tables by scalar prefetch, one page a step.

Validated only on CPU: numerics in Pallas interpret mode, lowering with
`jax.export(..., platforms=["tpu"])` (the Pallas -> Mosaic lowering, not Mosaic's own
layout passes, so an unsupported in-kernel layout would first show on a real TPU).

Grid (rows R, kv heads, query blocks, table slots P), the table slot innermost and
"arbitrary": each step's K and V blocks are the (page_size, head_dim) matrices of one kv
head in the page that slot lists, found by the BlockSpec index map from the block table
in SMEM (`PrefetchScalarGridSpec`), so Pallas's pipeline DMAs the next page while this one
is computed. Slots outside the query block's key range ``[first, last]`` (computed per
block in the wrapper, also prefetched) map to the nearest slot in range: the block index
does not change, so no page is fetched again, and the step does no work. Online softmax
(flash) state lives in VMEM scratch; the output block is written at the last slot.

Known costs, unmeasured: a step is one page (16 positions at the engine's default), a
small DMA and a small MXU tile; jax's own paged-attention kernel instead copies several
pages per step with hand-written double-buffered DMAs (`MultiPageAsyncCopyDescriptor`),
the next step once measurements say it matters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NT = (((1,), (1,)), ((), ()))  # q (rows, D) . k (size, D) -> (rows, size)
MASKED = -1e30


def sublanes(dtype) -> int:
    """Rows of one native tile of `dtype`: 8 for 32-bit, 16 for 16-bit values."""
    return 8 if jnp.dtype(dtype).itemsize == 4 else 16


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kernel(tables_ref, first_ref, last_ref, q_ref, pos_ref, lo_ref, k_ref, v_ref, *rest,
            width, page_size, num_blocks, scale, softcap, quantized):
    if quantized:
        ks_ref, vs_ref, o_ref, m_ref, l_ref, acc_ref = rest
    else:
        o_ref, m_ref, l_ref, acc_ref = rest
    r, h, j, p = (pl.program_id(i) for i in range(4))
    block = r * num_blocks + j

    @pl.when(p == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASKED)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    page = tables_ref[r * width + p]
    live = (p >= first_ref[block]) & (p <= last_ref[block]) & (page >= 0)

    @pl.when(live)
    def _step():
        q = q_ref[...]
        dtype = q.dtype
        k = k_ref[...].astype(jnp.float32).astype(dtype)
        s = lax.dot_general(q, k, _NT, precision=_precision(dtype),
                            preferred_element_type=jnp.float32)
        if quantized:
            s = s * _head_row(ks_ref, h)
        s = s * jnp.float32(scale)
        if softcap is not None:
            s = jnp.tanh(s / jnp.float32(softcap)) * jnp.float32(softcap)
        key = p * page_size + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        mask = (key <= pos_ref[...]) & (key >= lo_ref[...])
        s = jnp.where(mask, s, jnp.float32(MASKED))
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        e = jnp.where(mask, jnp.exp(s - m_next), jnp.float32(0))
        l_ref[...] = alpha * l_ref[...] + jnp.sum(e, axis=1, keepdims=True)
        m_ref[...] = m_next
        if quantized:
            e = e * _head_row(vs_ref, h)
        v = v_ref[...].astype(jnp.float32).astype(dtype)
        acc_ref[...] = alpha * acc_ref[...] + jnp.dot(
            e.astype(dtype), v, precision=_precision(dtype), preferred_element_type=jnp.float32)

    @pl.when(p == width - 1)
    def _store():
        total = l_ref[...]
        total = jnp.where(total > 0, total, jnp.float32(1))  # no keys: zeros, not 0 / 0
        o_ref[...] = (acc_ref[...] / total).astype(o_ref.dtype)


def _head_row(ref, h) -> jax.Array:
    """Row ``h`` of a (kv_heads, page_size) scale block as f32 (1, page_size).

    The block holds every head's scales (a one-head block would break the (8, 128) rule);
    a masked sum picks the row without a dynamic sublane slice.
    """
    s = ref[...].astype(jnp.float32)
    rows = lax.broadcasted_iota(jnp.int32, s.shape, 0)
    return jnp.sum(jnp.where(rows == h, s, jnp.float32(0)), axis=0, keepdims=True)


def _page_range(pos, lo, *, block_q: int, page_size: int, width: int):
    """(first, last) table slot of each query block, flattened (R * blocks,); last < first
    when the block has no keys."""
    r = pos.shape[0]
    pos = pos.reshape(r, -1, block_q)
    lo = lo.reshape(r, -1, block_q)
    last = jnp.minimum(jnp.max(pos, axis=-1) // page_size, width - 1)
    first = jnp.clip(jnp.min(lo, axis=-1) // page_size, 0, width - 1)
    return first.reshape(-1), last.reshape(-1)


@functools.partial(jax.jit, static_argnames=(
    "block_q", "scale", "softcap", "interpret"))
def paged_attention_tpu(q, pos, lo, tables, k_pages, v_pages, k_scale, v_scale, *,
                        block_q: int, scale: float, softcap: float | None, interpret=False):
    """Attention of ``q (R, kv_heads, rows, D)`` (rows a multiple of `block_q`; row i's key
    range ``lo[r, i] .. pos[r, i]``) over the pages ``tables (R, P)`` lists in the flat
    pool ``k_pages (num_pages, kv_heads, page_size, D)`` (entries -1: no page). Returns
    ``(R, kv_heads, rows, D)`` in q's dtype."""
    r, kv_heads, rows, d = q.shape
    num_pages, _, page_size, _ = k_pages.shape
    width = tables.shape[1]
    num_blocks = rows // block_q
    quantized = k_scale is not None
    first, last = _page_range(pos, lo, block_q=block_q, page_size=page_size, width=width)

    def page_index(r_, j, p, tables_ref, first_ref, last_ref):
        b = r_ * num_blocks + j
        slot = jnp.minimum(jnp.maximum(p, first_ref[b]), jnp.maximum(last_ref[b], first_ref[b]))
        return jnp.maximum(tables_ref[r_ * width + slot], 0)

    def kv_map(r_, h, j, p, *refs):
        return (page_index(r_, j, p, *refs), h, 0, 0)

    def scale_map(r_, h, j, p, *refs):
        return (page_index(r_, j, p, *refs), 0, 0)

    rows_map = lambda r_, h, j, p, *_: (r_, j, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, block_q, d), lambda r_, h, j, p, *_: (r_, h, j, 0)),
        pl.BlockSpec((None, block_q, 1), rows_map),
        pl.BlockSpec((None, block_q, 1), rows_map),
        pl.BlockSpec((None, None, page_size, d), kv_map),
        pl.BlockSpec((None, None, page_size, d), kv_map),
    ]
    operands = [q, pos[..., None], lo[..., None], k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((None, kv_heads, page_size), scale_map)] * 2
        operands += [k_scale, v_scale]
    kernel = functools.partial(_kernel, width=width, page_size=page_size,
                               num_blocks=num_blocks, scale=scale, softcap=softcap,
                               quantized=quantized)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(r, kv_heads, num_blocks, width),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, block_q, d),
                                   lambda r_, h, j, p, *_: (r_, h, j, 0)),
            scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                            pltpu.VMEM((block_q, 1), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_attention" + ("_quantized" if quantized else ""),
    )(tables.reshape(-1), first, last, *operands)
