"""GPTVQ (van Baalen et al. 2024): GPTQ's error-feedback sweep with vector codebooks, for the
vector formats ``vq2`` / ``vq3`` (`jquant.vq`).

Why vector codes and not a trellis (QTIP): QTIP decodes each weight from a walk through a
``2**16``-state trellis, and its encoder is a Viterbi pass costing about ``L · 2**16 · 4``
operations per ``L`` weights (256 · 65536 · 4 per 256 weights): hours for a 135M-parameter
model on a two-core CPU. A vector code's encoder is a nearest-centroid search over
``2**(bits·d)`` entries (16 or 64 here) and its decode is one gather, so the whole
Hessian-aware encoder runs in minutes, and a fused kernel needs a table lookup, not a
trellis walk.

The algorithm, on the kernel ``W (K, N)`` and ``H = E[x xᵀ]`` of one layer:

1. ``U``, the upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹``, as GPTQ makes it
   (dead inputs ``H_kk = 0`` get ``H_kk = 1``, damp raised ×10 while it does not factor;
   the same helpers, on the host with LAPACK or traced).
2. The rows are swept a row of tiles (``tile_k`` rows) at a time. On reaching one, its
   tiles' codebooks are fitted to its rows as updated so far: k-means on each tile's vectors
   (`jquant.vq.vectors`) weighted per coordinate by the Hessian diagonal ``H_kk`` of the
   coordinate's row (an error in row ``k`` costs about ``H_kk`` times its square), started
   as GPTVQ's Mahalanobis initialisation is, with the covariance's diagonal only (the
   vectors sorted by their standardized distance to the weighted mean, ``E`` of them taken
   at evenly spaced ranks), then stored as int8 with a bfloat16 scale
   (`jquant.vq.quantize_codebook`); the rows are assigned against the stored values.
3. Rows ``S = {i, .., i+d-1}`` in turn (``d`` = the vector length): with
   ``A = U_SS⁻ᵀ``, each column's vector ``w_S`` takes the entry ``c`` minimising
   ``‖A (w_S - c)‖²`` (= ``Δᵀ (H⁻¹_SS)⁻¹ Δ``, GPTQ's loss of changing those rows by ``Δ``,
   so the metric of the inverse Hessian's ``d × d`` block), ``e = A (w_S - c)`` and every
   later row ``j`` gets ``w_j -= U_Sjᵀ e``. With ``d = 1`` this is GPTQ's step exactly.
   Updates to later blocks are batched as GPTQ batches them (blocks of whole tile rows,
   about ``block_size`` rows).

With ``H = I`` every off-diagonal ``U_ij`` is 0, nothing is fed forward, the codebooks are
those of the original rows and step 3 is a plain nearest-centroid assignment
(`jquant.vq.assign`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import vq
from jquant.algorithms import _gptq_host, register
from jquant.algorithms._gptq_args import MAX_DAMP
from jquant.algorithms._gptq_args import check_info as check_info
from jquant.algorithms.gptq import _dead_fixed, _factor, _like
from jquant.qarray import check_float_weight

_HIGHEST = jax.lax.Precision.HIGHEST

DEFAULTS = {
    "damp": 0.01,  # dampening, relative to the mean of diag(H)
    "block_size": 128,  # rows per lazy-batch block (made a divisor of K)
    "kmeans_iters": 25,  # Lloyd iterations of the codebook k-means
}


def settings(args) -> dict[str, Any]:
    """gptvq's ``algorithm_args`` with defaults filled in; ValueError naming a bad key.

    >>> settings({"kmeans_iters": 10})["damp"]
    0.01
    """
    unknown = [k for k in args if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    s = {**DEFAULTS, **args}
    damp = s["damp"]
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not 0 < damp <= MAX_DAMP:
        raise ValueError(f"damp={damp!r} must be a number in (0, {MAX_DAMP:g}]")
    for key in ("block_size", "kmeans_iters"):
        v = s[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{key}={v!r} must be a positive integer")
    return s


def check_args(args) -> None:
    """Validates gptvq's ``algorithm_args`` (see :data:`DEFAULTS`)."""
    settings(args)


@register("gptvq", check_args=check_args, check_info=check_info, eager=True)
def gptvq(weight, rule, *, path: str, calibration=None):
    """GPTVQ for a Dense kernel ``(K, N)`` into the rule's vector format.

    Args:
      weight: float ``(K, N)`` kernel, contracted on axis 0.
      rule: the resolved :class:`jquant.recipe.Rule` (``weight: vq2`` or ``vq3``);
        ``algorithm_args`` as :func:`settings`.
      path: the parameter path, for messages.
      calibration: a :class:`jquant.calib.stats.Calibration` (its ``hessian (K, K)``).

    Returns:
      ``(vqarray, info)``: the :class:`jquant.vq.VQArray` and gptq's info arrays
      (``damp``, ``factored``, ``damp_requested``, ``nonfinite``) for :func:`check_info`.

    Raises:
      ValueError: naming ``path``: no calibration, a format that is not a vector one, a
        kernel that is not 2-D on axis 0 or not whole tiles, a Hessian of the wrong shape.
    """
    if calibration is None:
        raise ValueError(f"{path}: gptvq needs calibration data (the inputs' Hessian): use "
                         "jquant.calib to collect it")  # fmt: skip
    check_float_weight(weight, name=path, values=False)
    qt = vq.check_kernel(rule.weight, weight.shape, name=path)
    if rule.axis not in (0, -2):
        raise ValueError(f"{path}: gptvq quantizes kernels contracted on axis 0, got "
                         f"axis={rule.axis}")  # fmt: skip
    k = weight.shape[0]
    hessian = getattr(calibration, "hessian", None)
    if hessian is None or tuple(hessian.shape) != (k, k):
        got = None if hessian is None else tuple(hessian.shape)
        raise ValueError(f"{path}: calibration Hessian has shape {got}; K={k} needs {(k, k)}")
    s = settings(rule.algorithm_args)
    damp = float(s["damp"])
    if _gptq_host.on_host(hessian) and not isinstance(weight, jax.core.Tracer):
        h = _gptq_host.local_view(hessian)
        u, used, factored = _gptq_host.factor(h, np.arange(k), damp)
        u, used, factored = (_like(a, like=hessian) for a in (u, used, np.bool_(factored)))
    else:
        u, used, factored = _factor_traced(jnp.asarray(hessian), damp)
    q = encode(jnp.asarray(weight), jnp.asarray(hessian), u, qtype=qt.name,
               block_size=s["block_size"], iters=s["kmeans_iters"])  # fmt: skip
    bad = ~jnp.isfinite(weight)
    first = jnp.argmax(bad.reshape(-1)).astype(jnp.int32)
    n = weight.shape[1]
    info = {"damp": used, "factored": factored, "damp_requested": jnp.float32(damp),
            "nonfinite": jnp.stack([jnp.sum(bad, dtype=jnp.int32), first // n, first % n])}
    return q, info


@partial(jax.jit, static_argnames=("damp",))
def _factor_traced(hessian, damp: float):
    return _factor(_dead_fixed(hessian), damp)


def encode(weight, hessian, u, *, qtype, block_size: int = 128, iters: int = 25):
    """The VQArray of ``weight (K, N)`` by :func:`sweep` with ``u`` (upper, ``UᵀU = H⁻¹``
    damped) and the importance ``diag(hessian)``."""
    qt = vq.check_kernel(qtype, weight.shape)
    importance = jnp.diagonal(_dead_fixed(hessian))
    idx, codes, scale = sweep(weight, u, importance, qtype=qt, block_size=block_size,
                              iters=iters)  # fmt: skip
    return vq.from_indices(idx, codes, scale, qtype=qt, k=weight.shape[0], dtype=weight.dtype)


@partial(jax.jit, static_argnames=("qtype", "iters"))
def fit_codebooks(weight, importance, *, qtype, iters: int):
    """Stored codebooks ``(int8 (Tk, Tn, E, d), bfloat16 (Tk, Tn))`` of ``weight (K, N)``:
    weighted k-means per tile, each coordinate weighted by ``importance (K,)`` of its row."""
    qt = vq.vector_format(qtype)
    d, e = qt.vector_dim, 2 ** (qt.bits * qt.vector_dim)
    w = weight.astype(jnp.float32)
    points = vq.vectors(w, qt.vector_tile, d)
    weights = vq.vectors(jnp.broadcast_to(importance.astype(jnp.float32)[:, None], w.shape),
                         qt.vector_tile, d)  # fmt: skip
    t_k, t_n = points.shape[:2]
    books = kmeans(points.reshape(t_k * t_n, -1, d), weights.reshape(t_k * t_n, -1, d), e, iters)
    return vq.quantize_codebook(books.reshape(t_k, t_n, e, d))


def kmeans(points, weights, entries: int, iters: int):
    """Weighted k-means: centroids ``(T, E, d)`` of ``points (T, P, d)``, the distance of a
    point to a centroid ``Σ_i weights_i (x_i - c_i)²``; a centroid that loses all its points
    stays where it was. The start: the points at ``E`` evenly spaced ranks of their
    distance to the weighted mean, each coordinate in units of its weighted spread."""
    t, p, d = points.shape
    total = jnp.sum(weights, axis=1, keepdims=True)
    mean = jnp.sum(weights * points, axis=1, keepdims=True) / total
    var = jnp.sum(weights * (points - mean) ** 2, axis=1, keepdims=True) / total
    spread = jnp.sum((points - mean) ** 2 / jnp.maximum(var, 1e-30), axis=-1)
    ranks = jnp.round(jnp.linspace(0, p - 1, entries)).astype(jnp.int32)
    order = jnp.argsort(spread, axis=1)[:, ranks]  # (T, E)
    books = jnp.take_along_axis(points, order[..., None], axis=1)
    wx = weights * points

    def step(books, _):
        dist = jnp.sum(weights[:, :, None] * (points[:, :, None] - books[:, None]) ** 2, axis=-1)
        mine = jnp.argmin(dist, axis=-1)[..., None] == jnp.arange(entries)  # (T, P, E)
        # sums over P of broadcast products: XLA:CPU runs these faster than a batch of
        # (E, P) @ (P, d) matmuls or a scatter-add
        num, den = (jnp.sum(jnp.where(mine[..., None], a[:, :, None], 0.0), axis=1)
                    for a in (wx, weights))  # fmt: skip
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), books), None

    return jax.lax.scan(step, books, None, length=iters)[0]


@partial(jax.jit, static_argnames=("qtype", "block_size", "iters"))
def sweep(weight, u, importance, *, qtype, block_size: int = 128, iters: int = 25):
    """GPTVQ's steps 1 and 3 (module docstring) on ``weight (K, N)`` with ``u`` upper,
    ``UᵀU = H⁻¹``: ``(indices (N, K / d), int8 codebooks (Tk, Tn, E, d), their bfloat16
    scales (Tk, Tn))``. Each row of tiles gets its codebooks when the sweep reaches it, from
    its rows as updated by then, so they fit the weights they are assigned to."""
    qt = vq.vector_format(qtype)
    k, n = weight.shape
    d, (tile_k, tile_n) = qt.vector_dim, qt.vector_tile
    t_n = n // tile_n
    block = tile_k * math.gcd(k // tile_k, max(1, block_size // tile_k))  # whole tile rows
    w = weight.astype(jnp.float32)
    u = u.astype(jnp.float32)
    importance = importance.astype(jnp.float32)
    dot = partial(jnp.dot, precision=_HIGHEST)

    def one_vector(u1, book, s, carry):
        w1, codes, errs = carry
        r = s * d
        rows = jax.lax.dynamic_slice_in_dim(u1, r, d)  # (d, block)
        a = jax.scipy.linalg.solve_triangular(
            jax.lax.dynamic_slice_in_dim(rows, r, d, axis=1), jnp.eye(d), lower=False).T
        ws = jax.lax.dynamic_slice_in_dim(w1, r, d)  # (d, N)
        aw = dot(a, ws).reshape(d, t_n, tile_n).transpose(1, 2, 0)  # (Tn, tile_n, d)
        ac = dot(book, a.T)  # (Tn, E, d)
        dist = jnp.sum((aw[:, :, None, :] - ac[:, None, :, :]) ** 2, axis=-1)
        idx = jnp.argmin(dist, axis=-1)  # (Tn, tile_n)
        q = jnp.take_along_axis(book, idx[..., None], axis=1).reshape(n, d).T
        err = dot(a, ws - q)
        w1 = w1 - dot(rows.T, err)  # rows before S get 0 (U upper); S becomes q
        codes = codes.at[s].set(idx.reshape(n).astype(jnp.uint8))
        return w1, codes, jax.lax.dynamic_update_slice_in_dim(errs, err, r, axis=0)

    def one_tile_row(u1, t, carry):
        # the codebooks of tile row t from its rows as updated so far
        rows = jax.lax.dynamic_slice_in_dim(carry[0], t * tile_k, tile_k)
        imp = jax.lax.dynamic_slice_in_dim(carry[3], t * tile_k, tile_k)
        codes, scale = fit_codebooks(rows, imp, qtype=qt, iters=iters)
        book = vq.lookup_table(codes, scale)[0]
        first = t * tile_k // d
        w1, idx, errs = jax.lax.fori_loop(first, first + tile_k // d,
                                          partial(one_vector, u1, book), carry[:3])
        return w1, idx, errs, carry[3], carry[4].at[t].set(codes[0]), carry[5].at[t].set(scale[0])

    def one_block(errors, i1):
        u_cols = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=1)  # (K, block)
        w1 = jax.lax.dynamic_slice_in_dim(w, i1, block) - dot(u_cols.T, errors)
        u1 = jax.lax.dynamic_slice_in_dim(u_cols, i1, block)
        rows = block // tile_k
        carry = (w1, jnp.zeros((block // d, n), jnp.uint8), jnp.zeros((block, n), jnp.float32),
                 jax.lax.dynamic_slice_in_dim(importance, i1, block),
                 jnp.zeros((rows, t_n, 2 ** (qt.bits * d), d), vq.CODEBOOK_DTYPE),
                 jnp.zeros((rows, t_n), vq.CODEBOOK_SCALE_DTYPE))  # fmt: skip
        _, idx, errs, _, codes, scale = jax.lax.fori_loop(0, rows, partial(one_tile_row, u1),
                                                          carry)  # fmt: skip
        return jax.lax.dynamic_update_slice_in_dim(errors, errs, i1, axis=0), (idx, codes, scale)

    errors = jnp.zeros((k, n), jnp.float32)
    _, (idx, codes, scale) = jax.lax.scan(one_block, errors, jnp.arange(k // block) * block)
    return (idx.reshape(k // d, n).T, codes.reshape(-1, *codes.shape[2:]),
            scale.reshape(-1, t_n))
