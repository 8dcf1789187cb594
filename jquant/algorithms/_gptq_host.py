"""GPTQ's eager host path: the factorization in one ``K × K`` float32 buffer (LAPACK, in
place), and the sweep taken a chunk of output columns at a time (`sweep_columns`).

The traced factorization (``gptq._factor``) holds about seven ``K × K`` buffers at its
peak (XLA's buffer assignment for the recursive inverse, the damped copy, the retry
branch): 5.7 GB for a Llama-3-8B ``down_proj`` (``K = 14336``). Here, with the Hessian on
a CPU device, the work is one gathered copy of it, factored and inverted in place by
LAPACK (``?potrf``, ``?trtri``), then copied to the device for the sweep (XLA:CPU copies
a NumPy array it is given): the Hessian plus two buffers of its size at the peak, against
about seven in the traced factorization.

The math is ``gptq._inverse_cholesky_upper``'s: with ``J`` the reversal and ``P`` the
processing order, ``J Pᵀ H P J = L Lᵀ`` and ``U = J L⁻¹ J`` is upper with
``Uᵀ U = (Pᵀ H P)⁻¹``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms._gptq_args import MAX_DAMP, SCALE_RANGE

_CHUNK = 1 << 22  # elements swapped per step of the in-place reversal


def on_host(hessian) -> bool:
    """Whether ``hessian`` is concrete and held by CPU devices, replicated (a NumPy array
    counts when JAX's default backend is the CPU)."""
    if isinstance(hessian, np.ndarray):
        return jax.default_backend() == "cpu"
    if not isinstance(hessian, jax.Array) or isinstance(hessian, jax.core.Tracer):
        return False
    return (all(d.platform == "cpu" for d in hessian.sharding.device_set)
            and hessian.sharding.is_fully_replicated)  # fmt: skip


def local_view(hessian) -> np.ndarray:
    """A read-only NumPy view of one replica of ``hessian`` (no copy on CPU)."""
    if isinstance(hessian, np.ndarray):
        return hessian
    return np.asarray(hessian.addressable_shards[0].data)


def order(diagonal: np.ndarray, act_order: bool) -> np.ndarray:
    """The processing order: by descending ``H_kk`` (stable on ties) with ``act_order``."""
    if not act_order:
        return np.arange(diagonal.shape[0])
    return np.argsort(-diagonal, kind="stable")


def fixed_diagonal(h: np.ndarray) -> np.ndarray:
    """``diag H`` with dead inputs (``H_kk == 0``) set to 1, as GPTQ's step 1."""
    d = np.diagonal(h).astype(np.float32)
    return np.where(d == 0, np.float32(1.0), d)


def factor(h: np.ndarray, perm: np.ndarray, damp: float):
    """``(U, damp used, factored)`` for ``Pᵀ H P`` (``P`` = ``perm``), damp ×10 per failed
    try up to :data:`MAX_DAMP`, like ``gptq._factor``. ``U`` is a C-contiguous float32
    NumPy array (NaN when no try factored)."""
    from scipy.linalg import lapack

    k = h.shape[0]
    diag = fixed_diagonal(h)
    mean = np.float32(np.mean(diag, dtype=np.float32))
    rev = perm[::-1]
    tries = 1 + int(math.floor(math.log10(MAX_DAMP / damp) + 1e-9))
    idx = np.arange(k)
    for t in range(tries):
        used = np.float32(damp * 10.0**t)
        a = _gather(h, rev)  # J Pᵀ H P J
        a[idx, idx] = diag[rev] + used * mean
        # ``a`` is symmetric, so its transpose is the same matrix in Fortran order, which
        # LAPACK overwrites in place: an upper factor there is the lower L in ``a``.
        c, info = lapack.spotrf(a.T, lower=0, clean=1, overwrite_a=1)
        if info == 0:
            c, info = lapack.strtri(c, lower=0, overwrite_c=1)
        if info == 0:
            a = c.T if np.shares_memory(c, a) else np.ascontiguousarray(c.T)  # L⁻¹
            if _finite(a):
                _reverse(a)  # J L⁻¹ J, upper
                return a, used, True
        del a, c
    return np.full((k, k), np.nan, np.float32), used, False


def _gather(h: np.ndarray, rev: np.ndarray) -> np.ndarray:
    """``h[rev][:, rev]`` as a new C-contiguous float32 array, a chunk of rows at a time."""
    k = rev.shape[0]
    a = np.empty((k, k), np.float32)
    rows = max(1, _CHUNK // k)
    for i in range(0, k, rows):
        a[i : i + rows] = h[rev[i : i + rows]][:, rev]
    return a


def _finite(a: np.ndarray) -> bool:
    """Whether every entry is finite, checked a chunk of rows at a time."""
    rows = max(1, _CHUNK // a.shape[1])
    return all(np.isfinite(a[i : i + rows]).all() for i in range(0, a.shape[0], rows))


def _reverse(a: np.ndarray) -> None:
    """``a[::-1, ::-1]`` in place (a flat reversal of a C-contiguous array), a chunk at a
    time so that no second copy of ``a`` exists."""
    flat = a.reshape(-1)
    n = flat.shape[0]
    for lo in range(0, n // 2, _CHUNK):
        hi = min(lo + _CHUNK, n // 2)
        head = flat[lo:hi].copy()
        flat[lo:hi] = flat[n - hi : n - lo][::-1]
        flat[n - hi : n - lo] = head[::-1]


SWEEP_BYTES = 64 << 20
"""Float32 bytes of the weight's columns one eager sweep takes at a time (the sweep holds
about four such buffers: the rows in processing order, the running errors, the codes)."""


def sweep_columns(k: int, n: int, rule) -> int:
    """How many output columns one eager sweep takes: columns are independent given the
    factor, so a wide kernel is swept in chunks of about :data:`SWEEP_BYTES`. Formats with a
    scale shared across columns (per-tensor, double quantization, NVFP4's tensor scale)
    take every column at once."""
    if rule.per_tensor or rule.double_quant or rule.format.block_scale == "e4m3":
        return n
    return max(1, min(n, SWEEP_BYTES // (4 * k)))


def join_columns(parts):
    """One ``(QArray, info)`` from sweeps of consecutive column chunks."""
    qs, infos = zip(*parts)
    cat = lambda *xs: None if xs[0] is None else jnp.concatenate(xs, axis=0)  # noqa: E731
    q = dataclasses.replace(qs[0], qvalue=cat(*(q.qvalue for q in qs)),
                            scale=cat(*(q.scale for q in qs)),
                            zero_point=cat(*(q.zero_point for q in qs)))  # fmt: skip
    info = dict(infos[0])
    offsets = np.cumsum([0] + [int(q.shape[-1]) for q in qs[:-1]])
    bad = [(int(i["nonfinite"][0]), int(i["nonfinite"][1]), int(i["nonfinite"][2]) + int(o))
           for i, o in zip(infos, offsets)]  # fmt: skip
    first = min(((r, c) for n_bad, r, c in bad if n_bad), default=(0, 0))
    info["nonfinite"] = jnp.asarray([sum(b[0] for b in bad), *first], jnp.int32)
    for key in info:
        if key.startswith(SCALE_RANGE):
            info[key] = sum(i[key] for i in infos)
    return q, info
