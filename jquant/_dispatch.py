"""Which path a quantized matmul ``x (M, K) @ w`` takes: a fused kernel or XLA.

Every plain matmul of ``jquant.ops`` (one contracted axis, no batch axes) ends in
:func:`matmul`, with the weight flattened to storage ``(N, Kbytes)`` (:func:`as_2d`).

The path is ``"auto"``, ``"xla"`` or ``"kernel"``: ``set_matmul_path`` sets it, else the
``JQUANT_MATMUL`` environment variable, else ``"auto"``. It is read while tracing, and is
not part of any jit cache key (see :func:`set_matmul_path` for what that means).

* ``"auto"`` runs a kernel only on a TPU or GPU, only where the backend's ``can_use_*``
  predicate accepts the inputs, and only at the M a **measured** dispatch table allows
  (``jquant.kernels.dispatch_table``: one shipped for the backend, ``$JQUANT_DISPATCH_TABLE``
  or ``set_dispatch_table``). Without one it is XLA, and the log says once per backend
  how to opt in: the kernels have only run in interpret mode. On CPU it is always XLA.
* ``"xla"`` never runs a kernel (int8 W8A8 included: an int8 x int8 ``dot_general``).
* ``"kernel"`` runs one or raises ValueError. On CPU it runs the TPU kernel (the GPU one
  for fp8 W8A8) in Pallas interpret mode: slow, but the same dispatch and kernel code as
  on the device, which is how this is tested without one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from jquant import _act, kernels, settings
from jquant._dequant_dot import (
    _CPU_BLOCK_N,
    _dequant_dot,
    _dequant_dot_blocked,
    _rows_sharded,
)
from jquant.qarray import QArray

MATMUL_PATHS = ("auto", "xla", "kernel")
_matmul_path: str | None = None
_noticed: set[str] = set()  # backends whose "no measured table" notice was logged
_log = logging.getLogger("jquant")


def set_matmul_path(path: str | None) -> str | None:
    """Chooses how quantized matmuls run: ``"auto"``, ``"xla"`` or ``"kernel"``.

    ``None`` clears the choice (back to ``$JQUANT_MATMUL``, else ``"auto"``). Process-wide
    (all threads). The path is read when a matmul is **traced**, and it is not part of
    JAX's jit cache key, so:

    * a function already jitted and called keeps the path it was traced under for every
      later call with the same input shapes and dtypes, whatever the setting now;
    * it takes the new path when it is traced again: a call with new shapes/dtypes, a jit
      of a *new* Python function, or any call after ``jax.clear_caches()``. ``jax.jit(f)``
      again on the same ``f`` is not enough: JAX caches traces by ``f`` itself;
    * code run without jit traces on every call and always takes the current path.

    To switch a running program, set the path, then ``jax.clear_caches()`` (everything
    re-traces and recompiles once); or set it (or ``$JQUANT_MATMUL``) before the first
    call. ``tests/kernels/test_matmul_path.py`` shows the rule.

    Args:
      path: ``"auto"`` (a fused kernel where one applies and a measured dispatch table
        allows it, else XLA), ``"xla"`` (always dequantize-then-dot), ``"kernel"`` (a
        fused kernel or a ValueError).

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
    path = _matmul_path or settings.matmul_path() or "auto"
    if path not in MATMUL_PATHS:
        raise ValueError(f"JQUANT_MATMUL={path!r} is not one of {MATMUL_PATHS}")
    return path


def _device_backend() -> str:
    return kernels.normalize_backend(None)


def _prefer_kernel(backend: str, kind: str, m: int, forced: bool) -> bool:
    """Forced, or the dispatch table says so; says once per backend how to opt in."""
    if forced:
        return True
    if backend not in _noticed and not kernels.has_dispatch_table(backend):
        _noticed.add(backend)
        _log.warning(
            "jquant: no measured dispatch table for %s, so quantized matmuls run in XLA "
            "(jquant's Pallas kernels have not been verified on this backend). To use "
            "them, run `bash benchmarks/device.sh` on this machine and set "
            "JQUANT_DISPATCH_TABLE=device-out/kernels.json (or call "
            "jquant.kernels.set_dispatch_table); set_matmul_path('kernel') forces them.",
            backend,
        )
    return kernels.prefer_kernel(backend, kind, m)


# ---- the dispatch point -------------------------------------------------------------


def matmul(x, w: QArray, *, out_dtype, precision=None):
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


def _kernel_matmul(x, w: QArray, out_dtype, precision):
    """The fused Pallas kernel for ``x (M, K) @ w``, or None where none applies.

    Weight-only matmuls use ``quantized_matmul``; an int8 (fp8_e4m3) weight with int8
    (fp8_e4m3) per-token activations and per-channel scales uses the W8A8 kernel. The FP4
    formats (mxfp4, nvfp4) pass their scales as ``w.scales()``, float32: the kernels take
    float scales, not mxfp4's stored E8M0 nor nvfp4's E4M3 codes and per-tensor scale.
    Other weights with activation quantization, double-quantized scales and the formats no
    kernel decodes (not in ``kernels.QTYPES``: int2-int6, uint* but uint4) stay on XLA,
    which dequantizes and multiplies.
    """
    del precision  # the kernels accumulate in float32 regardless
    forced, backend, m = matmul_path() == "kernel", _device_backend(), x.shape[0]
    fmt = _w8a8_format(w)
    if fmt is not None:
        return _w8a8_kernel_matmul(x, w, out_dtype, fmt, backend, forced)
    fp4 = w.format.kind == "fp4"
    if (w.activation is not None or w.qtype not in kernels.QTYPES
            or (isinstance(w.scale, QArray) and not fp4)):
        return None
    n = w.qvalue.shape[0]
    stored = w.scales() if fp4 else w.scale
    scale = jnp.broadcast_to(stored, (n, stored.shape[-1]))  # per-tensor → per-row
    zp = None if w.zero_point is None else jnp.broadcast_to(w.zero_point, scale.shape)
    args, kw = (x, w.qvalue, scale, zp), dict(qtype=w.qtype, k=w.k, group_size=w.group_size)
    if backend in ("tpu", "gpu"):
        can_use = kernels.can_use_tpu_kernel if backend == "tpu" else kernels.can_use_gpu_kernel
        if _prefer_kernel(backend, w.qtype, m, forced) and can_use(*args, **kw):
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
    matmul_fn = _act.int8_matmul if fmt == "int8" else _act.fp8_matmul
    if backend in ("tpu", "gpu"):
        can_use = kernels.can_use_tpu_w8a8 if backend == "tpu" else kernels.can_use_gpu_w8a8
        kind = "w8a8_int8" if fmt == "int8" else "w8a8_fp8"
        if _prefer_kernel(backend, kind, x.shape[0], forced) and can_use(
            xq, xs, w.qvalue, scale_n, backend=backend
        ):
            return matmul_fn(x, w.qvalue, w.scales(), backend=backend).astype(out_dtype)
        return None
    if backend == "cpu" and forced:
        interp = "tpu" if fmt == "int8" else "gpu"
        y = matmul_fn(x, w.qvalue, w.scales(), backend=interp, interpret=True)
        return y.astype(out_dtype)
    return None


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


def as_2d(w: QArray) -> QArray:
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
