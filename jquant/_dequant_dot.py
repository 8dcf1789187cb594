"""The XLA path of a quantized matmul: ``x (M, K) @ w.T`` for a QArray stored ``(N, K)``.

Two things decide its speed on CPU (measured in ``docs/cpu.md``), and both live here:

* row blocking: output rows are dequantized a block at a time inside ``lax.map``, so no
  float copy of the whole weight is written and re-read;
* 4-bit weights are contracted one nibble plane at a time, so the two halves of each
  group are never concatenated back into element order.

On GPU/TPU the same functions are the fallback where no fused kernel applies.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jquant.kernels._formats import planes_dot, split_planes
from jquant.qarray import QArray

# Output rows dequantized at a time on CPU. Dequantizing the whole (N, K) weight and
# then dotting makes XLA's CPU backend write and re-read a float copy of it (~10x
# slower than an f32 dot for a decode matvec); row blocks of 256 stay in cache and
# match or beat the f32 dot (docs/cpu.md).
_CPU_BLOCK_N = 256


def _rows_sharded(a) -> bool:
    # lax.map cannot scan over a sharded axis; a weight split over devices by its
    # output rows takes the unblocked path (sharded setups have accelerators anyway).
    spec = getattr(jax.typeof(a).sharding, "spec", None)
    return bool(spec) and spec[0] is not None


def _dequant_dot(x, w: QArray, precision=None):
    """``x (M, K) @ w.T`` for w stored ``(N, K)``, accumulated in float32."""
    if _planes_apply(w):
        return _planes_dot(_split_planes(x, w), w, precision)
    return jax.lax.dot_general(
        x, w.dequantize_stored(x.dtype), (((1,), (1,)), ((), ())), precision=precision,
        preferred_element_type=_accumulator(x.dtype),
    )  # fmt: skip


# ---- 4-bit: contract the two nibble planes separately (see kernels/_formats.py) -------


def _planes_apply(w: QArray) -> bool:
    return w.qtype in ("int4", "uint4", "nf4") and w.qvalue.ndim == 2


def _split_planes(x, w: QArray):
    return split_planes(x, w.k, w.group_size)


def _planes_dot(x_planes, w: QArray, precision=None):
    """``x @ w.T`` from :func:`_split_planes` of x, one dot per plane and run of groups."""
    zp = None if w.zero_point is None else w.zero_point.astype(jnp.float32)
    acc = _accumulator(x_planes[0][2][0].dtype)

    def dot(xp, v):
        return jax.lax.dot_general(
            xp, v, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=acc
        )

    return planes_dot(x_planes, w.qvalue, w.scales(), zp, w.qtype, dot)


def _block_rows(n: int) -> int:
    """Rows per block for ``n`` output rows: near ``_CPU_BLOCK_N`` and dividing ``n`` if
    such a size is close, because a leftover tail costs a slice, a separate dequantize and
    dot, and a concatenation of the outputs (SmolLM2's N = 576 splits as 2 x 288)."""
    nb = max(1, round(n / _CPU_BLOCK_N))
    return n // nb if n % nb == 0 else _CPU_BLOCK_N


def _dequant_dot_blocked(x, w: QArray, precision=None):
    """:func:`_dequant_dot` one block of output rows (:func:`_block_rows`) at a time."""
    n = w.qvalue.shape[0]
    bn = _block_rows(n)
    nb = n // bn
    scale = w.scales()

    def rows(a, start, stop):  # per-tensor scales (one row) serve every block
        return None if a is None else (a[start:stop] if a.shape[0] > 1 else a)

    def blocked(a):
        return None if a is None or a.shape[0] == 1 else a[: nb * bn].reshape(nb, bn, -1)

    x_planes = _split_planes(x, w) if _planes_apply(w) else None  # once, not per block

    def dot(blk):
        if x_planes is None:
            return _dequant_dot(x, blk, precision)
        return _planes_dot(x_planes, blk, precision)

    def one(blocks):
        v, s, z = blocks
        blk = dataclasses.replace(
            w, qvalue=v, scale=scale if s is None else s,
            zero_point=w.zero_point if z is None else z,
        )  # fmt: skip
        return dot(blk)

    out = jax.lax.map(one, (blocked(w.qvalue), blocked(scale), blocked(w.zero_point)))
    y = jnp.moveaxis(out, 0, 1).reshape(x.shape[0], nb * bn)
    if n % bn:
        tail = dataclasses.replace(
            w, qvalue=w.qvalue[nb * bn :], scale=rows(scale, nb * bn, n),
            zero_point=rows(w.zero_point, nb * bn, n),
        )  # fmt: skip
        y = jnp.concatenate([y, dot(tail)], axis=1)
    return y


def _accumulator(dtype):
    """float32 for 16- and 32-bit floats; wider floats and integers keep their dtype."""
    floating = jnp.issubdtype(dtype, jnp.floating)
    return jnp.float32 if floating and np.dtype(dtype).itemsize <= 4 else dtype
