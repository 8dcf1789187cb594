"""The compute ops: the one place where a weight may be a plain array or a QArray.

Each op takes the weight in its *logical* layout (a Dense kernel is ``(K, N)``)
whatever its storage, so the same model code runs float and quantized params.
For a QArray the XLA path dequantizes in storage layout (contraction axis last)
and contracts there, so no transposed float copy of the weight is made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.qarray import QArray


def _check_contraction(x, w, name: str):
    k = w.shape[0]
    if x.shape[-1] != k:
        raise ValueError(
            f"{name}: x has {x.shape[-1]} features on its last axis but the weight "
            f"{'QArray' if isinstance(w, QArray) else 'array'} of shape {tuple(w.shape)} "
            f"contracts over {k}"
        )


def qdot(x: jax.Array, w, *, preferred_element_type=None) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` and the first axis of ``w``.

    Args:
      x: activations ``(..., K)``.
      w: weight ``(K, *out)``: an array, or a QArray whose contraction axis is its first.
      preferred_element_type: accumulation/output dtype (default: ``x.dtype``).

    Returns:
      ``(..., *out)`` in ``preferred_element_type`` or ``x.dtype``.

    >>> qdot(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    out_dtype = preferred_element_type or x.dtype
    _check_contraction(x, w, "qdot")
    if isinstance(w, QArray):
        if w.axis != -w.ndim:
            raise ValueError(
                f"qdot: the QArray's contraction axis is {w.axis}, but qdot contracts the "
                f"first axis of a weight of shape {w.shape}; use qeinsum"
            )
        wt = w.dequantize_stored(x.dtype)  # (*out, K)
        return jax.lax.dot_general(
            x, wt, (((x.ndim - 1,), (wt.ndim - 1,)), ((), ())),
            preferred_element_type=out_dtype,
        ).astype(out_dtype)  # fmt: skip
    return jax.lax.dot_general(
        x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=out_dtype
    ).astype(out_dtype)


def qembed(ids: jax.Array, table, *, dtype=None) -> jax.Array:
    """Rows ``table[ids]`` of an embedding table ``(V, D)`` (array or QArray).

    A QArray table must be quantized along D (``axis=-1``); only the gathered rows
    are dequantized.
    """
    if not isinstance(table, QArray):
        out = jnp.take(table, ids, axis=0)
        return out if dtype is None else out.astype(dtype)
    if table.ndim != 2 or table.axis != -1:
        raise ValueError(
            f"qembed: a quantized table must be 2-D and quantized along its feature axis "
            f"(axis=-1); got shape {table.shape}, axis={table.axis}"
        )
    scale = table.scales()
    rows = QArray(
        qvalue=jnp.take(table.qvalue, ids, axis=0),
        scale=jnp.take(scale, ids, axis=0) if scale.shape[0] > 1 else scale,
        zero_point=None if table.zero_point is None else (
            jnp.take(table.zero_point, ids, axis=0) if table.zero_point.shape[0] > 1
            else table.zero_point),
        qtype=table.qtype, k=table.k, axis=-1, group_size=table.group_size, dtype=table.dtype,
    )  # fmt: skip
    return rows.dequantize_stored(dtype)


def qattend(x: jax.Array, table, *, preferred_element_type=None) -> jax.Array:
    """``x @ table.T`` for a tied LM head: logits over the rows of an embedding table."""
    out_dtype = preferred_element_type or x.dtype
    if x.shape[-1] != table.shape[-1]:
        raise ValueError(
            f"qattend: x has {x.shape[-1]} features but the table has {table.shape[-1]}"
        )
    if isinstance(table, QArray):
        if table.axis != -1:
            raise ValueError("qattend: a quantized table must be quantized along axis=-1")
        t = table.dequantize_stored(x.dtype)
    else:
        t = table.astype(x.dtype)
    return jax.lax.dot_general(
        x, t, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=out_dtype
    ).astype(out_dtype)
