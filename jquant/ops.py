"""The compute ops: the one place where a weight may be a plain array or a QArray.

Each op takes the weight in its *logical* layout (a Dense kernel is ``(K, N)``)
whatever its storage, so the same model code runs float and quantized params.

For a QArray every op reduces to ``dot_general`` against the weight in **storage
layout** (contraction axis last, see ``jquant.qarray``), so no transposed float
copy of the weight is ever made. When the contraction is a plain matmul (one
contracted axis, no batch axes) it goes through ``jquant._dispatch.matmul``, where
fused kernels plug in; everything else dequantizes and calls ``lax.dot_general``.

Numerics of the XLA path: the weight is dequantized to the activation dtype and
the dot accumulates in float32 (``preferred_element_type``), so bf16 inputs are
not summed in bf16. Integer activations are promoted with the weight's dtype first,
as ``x @ w`` would. A QArray with ``activation`` set quantizes the activations per
token first (see ``jquant._act``). A QArray with a ``perm`` (act-order) has its inputs taken
from ``x`` in stored order once, before any path (``jquant._perm``), so XLA and the kernels
see ordinary consecutive groups.

Training wrappers are weights too: an ``ActQuantized`` (QAT of W8A8 / W4A8,
``jquant.qat.fake_quantize``) fake-quantizes the activations per token and multiplies by
its float value; a ``LoRAWeight`` (QLoRA, ``jquant.qat.lora``) computes
``x @ base + scale * (x @ a) @ b`` with its base through these same ops, and a
``MultiLoRAWeight`` (serving, ``jquant.serve.adapters``) the same with each row's own adapter.
A ``VQArray`` (vector codebooks, ``jquant.vq``) has no fused kernel yet: every path
dequantizes it to the activation dtype and multiplies.

Which path runs is ``"auto"`` (a fused kernel where one applies and a measured
dispatch table allows it, else XLA), ``"xla"`` or ``"kernel"`` (fail rather than fall
back): ``set_matmul_path`` sets it, else the ``JQUANT_MATMUL`` environment variable,
else ``"auto"`` (``jquant._dispatch`` has the rules). Paged attention (the serving cache,
``jquant.kernels.paged_attention``) has its own path with the same three values:
``set_attention_path``, else ``JQUANT_ATTENTION`` (``jquant._attention_path``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jquant import _act, _dispatch, _einsum, _perm, _tap
from jquant._attention_path import ATTENTION_PATHS as ATTENTION_PATHS
from jquant._attention_path import attention_path as attention_path
from jquant._attention_path import set_attention_path as set_attention_path
from jquant._dequant_dot import _accumulator
from jquant._dispatch import MATMUL_PATHS as MATMUL_PATHS
from jquant._dispatch import matmul_path as matmul_path
from jquant._dispatch import set_matmul_path as set_matmul_path
from jquant._lora import LoRAWeight, MultiLoRAWeight
from jquant._tap import Tap
from jquant.qarray import QArray
from jquant.vq import VQArray

# ---- validation -------------------------------------------------------------------


def _promote(x, w):
    """``x`` in the dtype the dot runs in: its own if float, else JAX's promotion of its
    dtype with the weight's (``int32`` with a float32 weight -> float32), as ``x @ w``
    would; under ``jax_numpy_dtype_promotion="strict"`` that raises TypePromotionError."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return x.astype(jnp.result_type(x.dtype, w.dtype))


def _describe(w) -> str:
    if isinstance(w, QArray):
        return f"QArray {w.qtype} of shape {tuple(w.shape)} quantized along axis {w.axis}"
    return f"array of shape {tuple(w.shape)}"


def _check_dims(op, x, w, dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    for a, b in zip((*lc, *lb), (*rc, *rb)):
        if not (0 <= a < x.ndim and 0 <= b < w.ndim) or x.shape[a] != w.shape[b]:
            raise ValueError(
                f"{op}: x of shape {tuple(x.shape)} (axis {a}) does not match the weight "
                f"({_describe(w)}) on axis {b}; contracting axes {tuple(lc)}/{tuple(rc)}, "
                f"batch axes {tuple(lb)}/{tuple(rb)}"
            )
    if isinstance(w, QArray) and w.ndim + w.axis not in rc:
        raise ValueError(
            f"{op}: the weight ({_describe(w)}, i.e. axis {w.ndim + w.axis}) must be "
            f"quantized along a contracted axis, but this op contracts axes {tuple(rc)} "
            f"(x of shape {tuple(x.shape)}); re-quantize with axis set to the contraction axis"
        )


def _normalize_dims(dimension_numbers, x_ndim, w_ndim):
    (lc, rc), (lb, rb) = dimension_numbers
    return (
        (tuple(a % x_ndim for a in lc), tuple(b % w_ndim for b in rc)),
        (tuple(a % x_ndim for a in lb), tuple(b % w_ndim for b in rb)),
    )


# ---- dot_general ------------------------------------------------------------------


def qdot_general(
    x, w, dimension_numbers, precision=None, preferred_element_type=None, *, op="qdot_general"
):
    """``lax.dot_general(x, w, ...)`` where ``w`` may be a QArray: Flax's ``dot_general`` hook.

    Args:
      x: activations.
      w: weight in its logical layout: an array, or a QArray quantized along one of
        the contracted axes (``rhs_contracting``).
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: passed to ``lax.dot_general``.
      preferred_element_type: output dtype (default ``x.dtype`` for a QArray, lax's
        rule for arrays). Accumulation is float32 for a QArray whatever this is.
      op: name used in error messages.

    Returns:
      The ``lax.dot_general`` result: ``(*batch, *x_free, *w_free)``.

    >>> from jquant.qarray import quantize_array
    >>> w = quantize_array(jnp.ones((4, 3)), "int8")
    >>> qdot_general(jnp.ones((2, 4)), w, (((1,), (0,)), ((), ()))).shape
    (2, 3)
    """
    if isinstance(w, Tap):
        w, output = _resolve_tap(x, w, dimension_numbers, op)
        return output(qdot_general(x, w, dimension_numbers, precision,
                                   preferred_element_type, op=op))  # fmt: skip
    if isinstance(w, _act.ActQuantized):
        x, w = _act_quantized(x, w, dimension_numbers)
    if isinstance(w, LoRAWeight):
        return _lora_dot(x, w, dimension_numbers, precision, preferred_element_type, op)
    if isinstance(w, MultiLoRAWeight):
        return _multi_lora_dot(x, w, dimension_numbers, precision, preferred_element_type, op)
    if isinstance(w, VQArray):  # no fused kernel yet: dequantized to x's dtype, then a dot
        x = _promote(x, w)
        dims = _normalize_dims(dimension_numbers, x.ndim, w.ndim)
        return _array_dot(x, w.dequantize(x.dtype), dims, precision,
                          preferred_element_type or x.dtype, op=op)  # fmt: skip
    if not isinstance(w, QArray):
        return jax.lax.dot_general(
            x, w, dimension_numbers, precision=precision,
            preferred_element_type=preferred_element_type,
        )  # fmt: skip
    x = _promote(x, w)
    dims = _normalize_dims(dimension_numbers, x.ndim, w.ndim)
    _check_dims(op, x, w, dims)
    out_dtype = preferred_element_type or x.dtype
    (lc, rc), (lb, _) = dims
    if w.perm is not None:  # act-order: x's inputs in the weight's stored order, once
        x, w = _perm.permute_input(x, w, lc[rc.index(w.ndim + w.axis)])
    if len(lc) == 1 and not lb:
        return _qdot_2d(x, w, lc[0], out_dtype, precision)
    return _qdot_general_xla(x, w, dims, out_dtype, precision)


def _qdot_2d(x, w: QArray, x_axis: int, out_dtype, precision):
    """One contracted axis, no batch: flatten to ``(M, K) @ (N, K)^T`` and dispatch."""
    x = jnp.moveaxis(x, x_axis, -1)
    free_x = x.shape[:-1]
    free_w = tuple(d for i, d in enumerate(w.shape) if i != w.ndim + w.axis)
    y = _dispatch.matmul(
        x.reshape(math.prod(free_x), w.k), _dispatch.as_2d(w), out_dtype=out_dtype,
        precision=precision,
    )  # fmt: skip
    return y.reshape(*free_x, *free_w)


def _qdot_general_xla(x, w: QArray, dims, out_dtype, precision):
    """Several contracted axes or batch axes: dequantize in storage layout, then dot."""
    (lc, rc), (lb, rb) = dims
    if w.activation is not None:
        x = _act.fake_quant(x, w.activation, lc)
    axis = w.ndim + w.axis

    def storage(d):  # logical axis of w -> axis of the storage layout (axis moved last)
        return w.ndim - 1 if d == axis else d - (d > axis)

    y = jax.lax.dot_general(
        x, w.dequantize_stored(x.dtype),
        ((lc, tuple(map(storage, rc))), (lb, tuple(map(storage, rb)))),
        precision=precision, preferred_element_type=_accumulator(x.dtype),
    )  # fmt: skip
    return y.astype(out_dtype)


def _act_quantized(x, w: _act.ActQuantized, dimension_numbers):
    """QAT's W8A8: activations fake-quantized per token over the contracted axes."""
    (lc, _), _ = _normalize_dims(dimension_numbers, x.ndim, w.ndim)
    x = _promote(x, w)
    return _act.fake_quant(x, w.activation, tuple(lc)), w.value


def _lora_dot(x, w: LoRAWeight, dimension_numbers, precision, preferred, op):
    """``x @ base + scale * (x @ a) @ b`` (QLoRA): the base through the ops, as any weight."""
    dims = _normalize_dims(dimension_numbers, x.ndim, w.ndim)
    (lc, rc), (lb, _) = dims
    if w.ndim != 2 or len(lc) != 1 or lb or tuple(rc) != (0,):
        raise ValueError(f"{op}: a LoRA weight needs a matmul contracting the first axis of a "
                         f"2-D kernel (K, N); got a {w.ndim}-D weight and dimension numbers "
                         f"{dims}")
    y = qdot_general(x, w.base, dims, precision, preferred, op=op)
    x = _promote(x, w)
    low = jnp.moveaxis(x, lc[0], -1) @ w.a.astype(x.dtype)
    delta = (low @ w.b.astype(x.dtype)) * jnp.asarray(w.scale, x.dtype)
    return y + delta.astype(y.dtype)


def _multi_lora_dot(x, w: MultiLoRAWeight, dimension_numbers, precision, preferred, op):
    """``x @ base`` plus each row's adapter: every adapter's low-rank product is computed for
    every row, the other adapters' zeroed, then one matmul by all the ``b`` at once."""
    dims = _normalize_dims(dimension_numbers, x.ndim, w.ndim)
    (lc, rc), (lb, _) = dims
    if w.ndim != 2 or len(lc) != 1 or lb or tuple(rc) != (0,) or lc[0] == 0:
        raise ValueError(f"{op}: a multi-adapter LoRA weight needs x (rows, ..., K) contracted "
                         f"on a later axis than its rows with a 2-D kernel (K, N); got a "
                         f"{w.ndim}-D weight, x of shape {tuple(x.shape)} and dimension "
                         f"numbers {dims}")  # fmt: skip
    if w.rows is None or w.rows.shape != x.shape[:1]:
        got = None if w.rows is None else tuple(w.rows.shape)
        raise ValueError(f"{op}: a multi-adapter LoRA weight needs one adapter index per row "
                         f"of x {tuple(x.shape)}, rows of shape {x.shape[:1]}; got {got} "
                         f"(jquant.serve.adapters.bind_rows sets them)")  # fmt: skip
    y = qdot_general(x, w.base, dims, precision, preferred, op=op)
    x = jnp.moveaxis(_promote(x, w), lc[0], -1)
    num = w.a.shape[0]
    low = jnp.einsum("...k,akr->...ar", x, w.a.astype(x.dtype))
    mine = w.rows[:, None] == jnp.arange(1, num + 1, dtype=w.rows.dtype)  # (R, A)
    mine = mine.reshape(mine.shape[:1] + (1,) * (x.ndim - 2) + (num, 1))
    low = jnp.where(mine, low, jnp.zeros((), low.dtype))  # exact zeros, whatever low holds
    delta = jnp.einsum("...ar,arn->...n", low, w.b.astype(x.dtype))
    return y + delta.astype(y.dtype)


def _resolve_tap(x, tap: Tap, dimension_numbers, op: str):
    """``(weight, output function)`` a calibration handler gives for ``tap`` (`jquant._tap`)."""
    dims = _normalize_dims(dimension_numbers, x.ndim, tap.ndim)
    (lc, rc), (lb, _) = dims
    if len(lc) != 1 or lb or tuple(rc) != (0,):
        raise ValueError(
            f"{op}: calibrated quantization of {tap.path!r} needs a matmul contracting the "
            f"kernel's first axis alone (a Dense kernel (K, N)); got dimension numbers {dims}"
        )
    return _tap.resolve(x, tap, contracting_axis=lc[0])


# ---- the ops --------------------------------------------------------------------------


def _array_dot(x, w, dims, precision, out_dtype, *, op: str):
    """A float weight: the dot in the activation dtype, accumulated in float32."""
    _check_dims(op, x, w, dims)
    return jax.lax.dot_general(
        x, w.astype(x.dtype), dims, precision=precision,
        preferred_element_type=_accumulator(x.dtype),
    ).astype(out_dtype)  # fmt: skip


def qdot(x: jax.Array, w, *, precision=None, preferred_element_type=None) -> jax.Array:
    """``x @ w`` over the last axis of ``x`` and the first axis of ``w``.

    Args:
      x: activations ``(..., K)``. Integer activations are first promoted with the
        weight's dtype as ``x @ w`` would (int8 with float32 -> float32); every op here
        does the same.
      w: weight ``(K, *out)``: an array (cast to ``x.dtype``), or a QArray whose
        contraction axis is its first (``quantize_array(w, ..., axis=0)``).
      precision: passed to ``lax.dot_general``.
      preferred_element_type: output dtype (default: ``x.dtype``).

    Returns:
      ``(..., *out)`` in ``preferred_element_type`` or ``x.dtype``.

    Raises:
      ValueError: ``x``'s last axis is not ``w``'s contraction length (the message names
        both shapes), ``w`` has no axis, ``w`` is a QArray quantized along another axis
        than the contracted one, or the path is forced to ``"kernel"`` and no kernel takes
        these inputs. Where a kernel cannot take a weight (a qtype or dtype the backend
        lacks, groups its tiles cannot hold, double-quantized scales) ``"auto"`` falls
        back to XLA, which is correct for every QArray.

    >>> qdot(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """
    if w.ndim < 1:
        raise ValueError(f"qdot: the weight must have an axis to contract, got {_describe(w)}")
    x = _promote(x, w)
    out_dtype = preferred_element_type or x.dtype
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if isinstance(w, Tap):
        w, output = _resolve_tap(x, w, dims, "qdot")
        return output(qdot(x, w, precision=precision, preferred_element_type=out_dtype))
    if isinstance(w, QArray | VQArray | _act.ActQuantized | LoRAWeight | MultiLoRAWeight):
        return qdot_general(x, w, dims, precision, out_dtype, op="qdot")
    return _array_dot(x, w, dims, precision, out_dtype, op="qdot")


def qeinsum(spec: str, x, w, *, precision=None, preferred_element_type=None) -> jax.Array:
    """``jnp.einsum(spec, x, w)`` where the second operand ``w`` may be a QArray.

    A QArray must be quantized along an index that is contracted (in ``x`` and
    ``w`` but not in the output); ``spec`` must be explicit (``->``). Ellipses and
    indices that only ``x`` sums over are supported; repeated indices within one
    operand (diagonals) are not, for a QArray.

    Args:
      spec: a two-operand einsum equation, e.g. ``"btd,dhk->bthk"``.
      x: the first operand (activations).
      w: the second operand (weight) in its logical layout.
      precision: passed to the dot.
      preferred_element_type: output dtype (default ``x.dtype`` for a QArray).

    Returns:
      The einsum result.

    >>> from jquant.qarray import quantize_array
    >>> w = quantize_array(jnp.ones((4, 2, 3)), "int8", axis=0)
    >>> qeinsum("btd,dhk->bthk", jnp.ones((1, 5, 4)), w).shape
    (1, 5, 2, 3)
    """
    if not isinstance(w, QArray | VQArray | Tap | _act.ActQuantized | LoRAWeight):
        return jnp.einsum(
            spec, x, w, precision=precision, preferred_element_type=preferred_element_type
        )
    x = _promote(x, w)
    op = f"qeinsum({spec!r})"
    p = _einsum.plan(spec, x.ndim, w.ndim, op=op, w_desc=_describe(w))
    if p.x_summed:  # indices only x carries and the output drops: sum them out first
        x = jnp.sum(x, axis=p.x_summed)
    y = qdot_general(x, w, p.dims, precision, preferred_element_type, op=op)
    return jnp.transpose(y, p.perm)


def qembed(ids: jax.Array, table, *, dtype=None) -> jax.Array:
    """Rows ``table[ids]`` of an embedding table ``(V, D)`` (array or QArray).

    A QArray table must be quantized along D (``axis=-1``); only the gathered rows
    are dequantized.

    Args:
      ids: integer indices of any shape.
      table: ``(V, D)`` array or QArray.
      dtype: output dtype (default: the table's).

    Returns:
      ``(*ids.shape, D)``.

    >>> qembed(jnp.array([0, 2]), jnp.eye(3)).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if isinstance(table, _act.ActQuantized):  # a gather has no activations to quantize
        table = table.value
    if not isinstance(table, QArray):
        out = jnp.take(table, ids, axis=0)
        return out if dtype is None else out.astype(dtype)
    if table.ndim != 2 or table.axis != -1:
        raise ValueError(
            f"qembed: a quantized table must be 2-D and quantized along its feature axis "
            f"(axis=-1); got {_describe(table)}"
        )
    scale = table.scales()

    def rows(a):  # per-tensor scales (one row) broadcast to every id
        return None if a is None else (jnp.take(a, ids, axis=0) if a.shape[0] > 1 else a)

    gathered = dataclasses.replace(
        table, qvalue=jnp.take(table.qvalue, ids, axis=0), scale=rows(scale),
        zero_point=rows(table.zero_point),
    )  # fmt: skip
    out = gathered.dequantize_stored(dtype)
    return out if table.perm is None else _perm.unpermute(out, table.perm)


def qattend(x: jax.Array, table, *, precision=None, preferred_element_type=None) -> jax.Array:
    """``x @ table.T`` for a tied LM head: logits over the rows of an embedding table.

    Args:
      x: activations ``(..., D)``.
      table: ``(V, D)`` array, or QArray quantized along D (``axis=-1``), which is
        then already in matmul storage layout.
      precision: passed to the dot.
      preferred_element_type: output dtype (default: ``x.dtype``).

    Returns:
      ``(..., V)``.

    >>> qattend(jnp.ones((1, 3)), jnp.eye(3)).tolist()
    [[1.0, 1.0, 1.0]]
    """
    x = _promote(x, table)
    out_dtype = preferred_element_type or x.dtype
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if isinstance(table, _act.ActQuantized):
        return qdot_general(x, table, dims, precision, out_dtype, op="qattend")
    if isinstance(table, QArray):
        if table.ndim != 2:
            raise ValueError(f"qattend: the table must be 2-D, got {_describe(table)}")
        return qdot_general(x, table, dims, precision, out_dtype, op="qattend")
    return _array_dot(x, table, dims, precision, out_dtype, op="qattend")
