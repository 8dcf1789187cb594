"""Pallas GPU (Triton lowering) paged attention: a loop over a row's pages per program.

Validated only on CPU: numerics in Pallas interpret mode, lowering with
`jax.export(..., platforms=["cuda"])` (Triton custom call allowed). It has never run on a
GPU, so its speed is unknown.

Grid (rows R, kv heads, query blocks); GPU programs run concurrently, so the pages are a
loop inside each program, from the first page any of its query rows may read to the last
(the block's largest position): a decode row reads its own length, no padding of the
table. Each iteration loads one (page_size, head_dim) K and V tile of its kv head by the
page number read from the block table, and updates an online softmax (flash) in
registers. The page pool is passed whole (pointer arithmetic, nothing is copied).

Triton tiles are powers of two and an MMA needs sides >= 16: query blocks are padded to
>= 16 rows (a decode step of a few query heads per kv head pays for 16 rows of tensor-core
work, but is bound by reading the pages), and page_size and head_dim must be powers of two
>= 16 (`unsupported_reason`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._formats import is_pow2
from ._gpu import pltr  # None in a JAX whose Pallas has no Triton backend any more

_NT = (((1,), (1,)), ((), ()))
MIN_TILE = 16  # smallest MMA side Triton accepts
MASKED = -1e30


def unsupported_reason(page_size: int, head_dim: int) -> str | None:
    """Why the GPU kernel cannot take pages of this geometry, or None."""
    if pltr is None:
        return f"this JAX ({jax.__version__}) has no Pallas Triton backend"
    for name, value in (("page_size", page_size), ("head_dim", head_dim)):
        if not (is_pow2(value) and value >= MIN_TILE):
            return f"{name}={value} must be a power of two >= {MIN_TILE} for the GPU kernel"
    return None


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kernel(tables_ref, pos_ref, lo_ref, q_ref, k_ref, v_ref, *rest, page_size, width,
            scale, softcap, quantized):
    if quantized:
        ks_ref, vs_ref, o_ref = rest
    else:
        (o_ref,) = rest
    h = pl.program_id(1)
    q = q_ref[...]
    dtype = q.dtype
    pos, lo = pos_ref[...], lo_ref[...]
    shift = page_size.bit_length() - 1  # page_size is a power of two: >> floors, -1 stays -1
    last = jnp.minimum(jnp.max(pos) >> shift, width - 1)
    first = jnp.min(lo) >> shift
    offsets = lax.broadcasted_iota(jnp.int32, (1, page_size), 1)

    def body(slot, carry):
        m_prev, l_prev, acc = carry
        page = tables_ref[slot]
        at = jnp.maximum(page, 0)
        k = k_ref[at, h, :, :].astype(jnp.float32).astype(dtype)
        s = lax.dot_general(q, k, _NT, precision=_precision(dtype),
                            preferred_element_type=jnp.float32)
        if quantized:
            s = s * ks_ref[at, h, :].astype(jnp.float32)[None, :]
        s = s * jnp.float32(scale)
        if softcap is not None:
            s = jnp.tanh(s / jnp.float32(softcap)) * jnp.float32(softcap)
        key = slot * page_size + offsets
        mask = (key <= pos[:, None]) & (key >= lo[:, None]) & (page >= 0)
        s = jnp.where(mask, s, jnp.float32(MASKED))
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_next)
        e = jnp.where(mask, jnp.exp(s - m_next[:, None]), jnp.float32(0))
        l_next = alpha * l_prev + jnp.sum(e, axis=1)
        if quantized:
            e = e * vs_ref[at, h, :].astype(jnp.float32)[None, :]
        v = v_ref[at, h, :, :].astype(jnp.float32).astype(dtype)
        acc = alpha[:, None] * acc + jnp.dot(e.astype(dtype), v, precision=_precision(dtype),
                                             preferred_element_type=jnp.float32)
        return m_next, l_next, acc

    rows, d = q.shape
    init = (jnp.full((rows,), MASKED, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    _, total, acc = lax.fori_loop(first, last + 1, body, init)
    total = jnp.where(total > 0, total, jnp.float32(1))  # no keys: zeros, not 0 / 0
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=(
    "block_q", "scale", "softcap", "interpret"))
def paged_attention_gpu(q, pos, lo, tables, k_pages, v_pages, k_scale, v_scale, *,
                        block_q: int, scale: float, softcap: float | None, interpret=False):
    """Attention of ``q (R, kv_heads, rows, D)`` (rows a multiple of `block_q`; row i's key
    range ``lo[r, i] .. pos[r, i]``) over the pages ``tables (R, P)`` lists in the flat
    pool ``k_pages (num_pages, kv_heads, page_size, D)`` (entries -1: no page). Returns
    ``(R, kv_heads, rows, D)`` in q's dtype."""
    if pltr is None:
        raise ValueError(f"this JAX ({jax.__version__}) has no Pallas Triton backend")
    r, kv_heads, rows, d = q.shape
    page_size = k_pages.shape[2]
    width = tables.shape[1]
    quantized = k_scale is not None
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    rows_spec = pl.BlockSpec((None, block_q), lambda r_, h, j: (r_, j))
    in_specs = [
        pl.BlockSpec((None, width), lambda r_, h, j: (r_, 0)),
        rows_spec,
        rows_spec,
        pl.BlockSpec((None, None, block_q, d), lambda r_, h, j: (r_, h, j, 0)),
        whole(k_pages),
        whole(v_pages),
    ]
    operands = [tables, pos, lo, q, k_pages, v_pages]
    if quantized:
        in_specs += [whole(k_scale), whole(v_scale)]
        operands += [k_scale, v_scale]
    kernel = functools.partial(_kernel, page_size=page_size, width=width, scale=scale,
                               softcap=softcap, quantized=quantized)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(r, kv_heads, rows // block_q),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, block_q, d), lambda r_, h, j: (r_, h, j, 0)),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="paged_attention" + ("_quantized" if quantized else ""),
    )(*operands)
