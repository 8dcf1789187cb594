"""The compute ops: the one place where a weight may be a plain array or a QArray.

Each op takes the weight in its *logical* layout (a Dense kernel is ``(K, N)``)
whatever its storage, so the same model code runs float and quantized params.

For a QArray every op reduces to ``dot_general`` against the weight in **storage
layout** (contraction axis last, see ``jquant.qarray``), so no transposed float
copy of the weight is ever made. When the contraction is a plain matmul (one
contracted axis, no batch axes) it goes through a single internal function,
``_matmul(x2d, w2d)``, which is where fused kernels plug in; everything else
dequantizes and calls ``lax.dot_general``.

Numerics of the XLA path: the weight is dequantized to the activation dtype and
the dot accumulates in float32 (``preferred_element_type``), so bf16 inputs are
not summed in bf16. A QArray with ``activation`` set quantizes the activations
per token first (see ``jquant._act``).

Which path runs is ``"auto"`` (a fused kernel where one applies, else XLA),
``"xla"`` or ``"kernel"`` (fail rather than fall back): ``set_matmul_path`` sets it,
else the ``JQUANT_MATMUL`` environment variable, else ``"auto"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp

from jquant import _act, kernels
from jquant._dequant_dot import (
    _CPU_BLOCK_N,
    _accumulator,
    _dequant_dot,
    _dequant_dot_blocked,
    _rows_sharded,
)
from jquant.qarray import QArray

MATMUL_PATHS = ("auto", "xla", "kernel")
_matmul_path: str | None = None


def set_matmul_path(path: str | None) -> str | None:
    """Chooses how quantized matmuls run: ``"auto"``, ``"xla"`` or ``"kernel"``.

    ``None`` clears the choice (back to ``$JQUANT_MATMUL``, else ``"auto"``). The
    choice is read while tracing, so it applies to functions jitted afterwards.

    Args:
      path: ``"auto"`` (a fused kernel where one applies, else XLA), ``"xla"``
        (always dequantize-then-dot), ``"kernel"`` (a fused kernel or a ValueError).

    Returns:
      The previous setting, so a caller can restore it.

    >>> old = set_matmul_path("xla"); matmul_path()
    'xla'
    >>> _ = set_matmul_path(old)
    """
    global _matmul_path
    if path is not None and path not in MATMUL_PATHS:
        raise ValueError(f"set_matmul_path: unknown path {path!r}; use one of {MATMUL_PATHS}")
    old, _matmul_path = _matmul_path, path
    return old


def matmul_path() -> str:
    """The matmul path in effect: ``set_matmul_path``'s, else ``$JQUANT_MATMUL``, else auto."""
    path = _matmul_path or os.environ.get("JQUANT_MATMUL") or "auto"
    if path not in MATMUL_PATHS:
        raise ValueError(f"JQUANT_MATMUL={path!r} is not one of {MATMUL_PATHS}")
    return path


# ---- the dispatch hook ------------------------------------------------------------


def _device_backend() -> str:
    backend = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def _kernel_matmul(x, w: QArray, out_dtype, precision):
    """The fused Pallas kernel for ``x (M, K) @ w``, or None where none applies.

    On TPU and GPU a kernel runs when ``jquant.kernels``' ``can_use_*`` predicate accepts
    the inputs and, unless the path is forced to ``"kernel"``, when the dispatch table
    (``jquant.kernels.dispatch_table``) says it beats XLA at this M. Weight-only
    matmuls use ``quantized_matmul``; an int8 (fp8_e4m3) weight with int8 (fp8_e4m3)
    per-token activations and per-channel scales uses the W8A8 kernel. Other weights
    with activation quantization, and double-quantized scales, stay on XLA.
    Forcing the path to ``"kernel"`` on CPU runs the TPU kernel (the GPU one for fp8
    W8A8) in Pallas interpret mode: slow, but it exercises the same dispatch and the
    same kernel code as the device does, which is how it is tested without one.
    """
    del precision  # the kernels accumulate in float32 regardless
    forced, backend, m = matmul_path() == "kernel", _device_backend(), x.shape[0]
    fmt = _w8a8_format(w)
    if fmt is not None:
        return _w8a8_kernel_matmul(x, w, out_dtype, fmt, backend, forced)
    if w.activation is not None or isinstance(w.scale, QArray) or w.qtype not in kernels.QTYPES:
        return None
    n = w.qvalue.shape[0]
    scale = jnp.broadcast_to(w.scale, (n, w.scale.shape[-1]))  # per-tensor → per-row
    zp = None if w.zero_point is None else jnp.broadcast_to(w.zero_point, scale.shape)
    args, kw = (x, w.qvalue, scale, zp), dict(qtype=w.qtype, k=w.k, group_size=w.group_size)
    if backend in ("tpu", "gpu"):
        can_use = kernels.can_use_tpu_kernel if backend == "tpu" else kernels.can_use_gpu_kernel
        if (forced or kernels.prefer_kernel(backend, w.qtype, m)) and can_use(*args, **kw):
            return kernels.quantized_matmul(*args, **kw).astype(out_dtype)
        return None
    if backend == "cpu" and forced and kernels.can_use_tpu_kernel(*args, **kw, backend="tpu"):
        y = kernels.quantized_matmul(*args, **kw, backend="tpu", interpret=True)
        return y.astype(out_dtype)
    return None


def _w8a8_format(w: QArray) -> str | None:
    """``"int8"`` / ``"fp8_e4m3"`` for a W8A8 weight (same 8-bit format for activations and
    weight, per-channel scales, possibly double-quantized), else None."""
    ok = (
        w.activation is not None and w.activation == w.qtype and w.qtype in ("int8", "fp8_e4m3")
        and w.zero_point is None and w.num_groups == 1
    )  # fmt: skip
    return w.qtype if ok else None


def _w8a8_kernel_matmul(x, w: QArray, out_dtype, fmt: str, backend: str, forced: bool):
    """W8A8 through the backend's kernel (int8 on TPU and GPU, fp8 on TPU and GPU); on
    CPU, when the path is forced, the TPU int8 / GPU fp8 kernel interpreted."""
    code_dtype = jnp.int8 if fmt == "int8" else jnp.float8_e4m3fn
    xq = jax.ShapeDtypeStruct(x.shape, code_dtype)
    xs = jax.ShapeDtypeStruct((x.shape[0], 1), jnp.float32)
    scale_n = jax.ShapeDtypeStruct((w.qvalue.shape[0], 1), jnp.float32)
    matmul = _act.int8_matmul if fmt == "int8" else _act.fp8_matmul
    if backend in ("tpu", "gpu"):
        can_use = kernels.can_use_tpu_w8a8 if backend == "tpu" else kernels.can_use_gpu_w8a8
        kind = "w8a8_int8" if fmt == "int8" else "w8a8_fp8"
        if (forced or kernels.prefer_kernel(backend, kind, x.shape[0])) and can_use(
            xq, xs, w.qvalue, scale_n, backend=backend
        ):
            return matmul(x, w.qvalue, w.scales(), backend=backend).astype(out_dtype)
        return None
    if backend == "cpu" and forced:
        interp = "tpu" if fmt == "int8" else "gpu"
        return matmul(x, w.qvalue, w.scales(), backend=interp, interpret=True).astype(out_dtype)
    return None


def _matmul(x, w: QArray, *, out_dtype, precision=None):
    """``x (M, K) @ w`` for a 2-D QArray stored as ``(N, Kbytes)``: the dispatch point."""
    path = matmul_path()
    if path != "xla":
        y = _kernel_matmul(x, w, out_dtype, precision)
        if y is not None:
            return y
        if path == "kernel":
            raise ValueError(
                f"matmul path is 'kernel' but no fused kernel applies to x {tuple(x.shape)} "
                f"{jnp.dtype(x.dtype).name} @ {w!r}; use set_matmul_path('auto')"
            )
    return _matmul_xla(x, w, out_dtype=out_dtype, precision=precision)


def _matmul_xla(x, w: QArray, *, out_dtype, precision=None):
    if _w8a8_format(w) == "int8":  # int8 x int8 in XLA, exact int32 sums
        return _act.int8_matmul(x, w.qvalue, w.scales(), backend="cpu").astype(out_dtype)
    if w.activation is not None:
        x = _act.fake_quant(x, w.activation, (-1,))
    if w.qvalue.shape[0] < 2 * _CPU_BLOCK_N or _rows_sharded(w.qvalue):
        return _dequant_dot(x, w, precision).astype(out_dtype)
    y = jax.lax.platform_dependent(
        x, w, cpu=functools.partial(_dequant_dot_blocked, precision=precision),
        default=functools.partial(_dequant_dot, precision=precision),
    )  # fmt: skip
    return y.astype(out_dtype)


def _as_2d(w: QArray) -> QArray:
    """The same QArray with its non-contraction axes merged: storage ``(N, Kbytes)``."""
    if w.qvalue.ndim == 2:
        return w
    # Reshape the stored scale as it is (dtype kept, the kernels want the zero point's);
    # only a double-quantized scale, itself a QArray, cannot be reshaped, its values can.
    scale = w.scales() if isinstance(w.scale, QArray) else w.scale

    def flat(a):
        return None if a is None else a.reshape(-1, a.shape[-1])

    return dataclasses.replace(
        w, qvalue=flat(w.qvalue), scale=flat(scale), zero_point=flat(w.zero_point), axis=-2
    )


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
    if len(lc) == 1 and not lb:
        return _qdot_2d(x, w, lc[0], out_dtype, precision)
    return _qdot_general_xla(x, w, dims, out_dtype, precision)


def _qdot_2d(x, w: QArray, x_axis: int, out_dtype, precision):
    """One contracted axis, no batch: flatten to ``(M, K) @ (N, K)^T`` and dispatch."""
    x = jnp.moveaxis(x, x_axis, -1)
    free_x = x.shape[:-1]
    free_w = tuple(d for i, d in enumerate(w.shape) if i != w.ndim + w.axis)
    y = _matmul(
        x.reshape(math.prod(free_x), w.k), _as_2d(w), out_dtype=out_dtype, precision=precision
    )
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
    if isinstance(w, QArray):
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
    if not isinstance(w, QArray):
        return jnp.einsum(
            spec, x, w, precision=precision, preferred_element_type=preferred_element_type
        )
    x = _promote(x, w)
    xs, ws, outs = _parse_einsum(spec, x.ndim, w.ndim, w)
    summed = [i for i, c in enumerate(xs) if c not in ws and c not in outs]
    if summed:  # indices only x carries and the output drops: sum them out first
        x = jnp.sum(x, axis=tuple(summed))
        xs = "".join(c for c in xs if c in ws or c in outs)
    batch = [c for c in xs if c in ws and c in outs]
    contract = [c for c in xs if c in ws and c not in outs]
    dims = (
        (tuple(xs.index(c) for c in contract), tuple(ws.index(c) for c in contract)),
        (tuple(xs.index(c) for c in batch), tuple(ws.index(c) for c in batch)),
    )
    y = qdot_general(x, w, dims, precision, preferred_element_type, op=f"qeinsum({spec!r})")
    result = (
        "".join(batch)
        + "".join(c for c in xs if c not in ws)
        + "".join(c for c in ws if c not in xs)
    )
    return jnp.transpose(y, [result.index(c) for c in outs])


def _parse_einsum(spec: str, x_ndim: int, w_ndim: int, w) -> tuple[str, str, str]:
    """Splits ``spec`` into (x, w, out) index strings with ellipses expanded."""
    op = f"qeinsum({spec!r})"
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"{op}: a QArray operand needs an explicit two-operand spec 'ab,bc->ac'")
    ins, outs = spec.split("->")
    xs, ws = ins.split(",")
    terms = [xs, ws]
    if any("..." in t for t in (*terms, outs)):
        free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec]
        ell = [n - (len(t) - 3) if "..." in t else 0 for t, n in zip(terms, (x_ndim, w_ndim))]
        letters = "".join(free[: max(ell)])
        xs, ws = (t.replace("...", letters[len(letters) - e :]) for t, e in zip(terms, ell))
        outs = outs.replace("...", letters)
    for name, term, ndim in (("x", xs, x_ndim), ("w", ws, w_ndim)):
        if len(term) != ndim or len(set(term)) != len(term):
            raise ValueError(
                f"{op}: operand {name} has {ndim} axes but its indices are {term!r} "
                "(each index once per operand, one per axis)"
            )
    if dropped := [c for c in ws if c not in xs and c not in outs]:
        raise ValueError(f"{op}: cannot sum the quantized weight ({_describe(w)}) over {dropped}")
    if unknown := [c for c in outs if c not in xs and c not in ws]:
        raise ValueError(f"{op}: output indices {unknown} appear in no operand")
    return xs, ws, outs


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
    return gathered.dequantize_stored(dtype)


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
    if isinstance(table, QArray):
        if table.ndim != 2:
            raise ValueError(f"qattend: the table must be 2-D, got {_describe(table)}")
        return qdot_general(x, table, dims, precision, out_dtype, op="qattend")
    return _array_dot(x, table, dims, precision, out_dtype, op="qattend")
