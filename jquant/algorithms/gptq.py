"""GPTQ (Frantar et al. 2023): rows rounded one at a time, each row's rounding error spread
over the rows not yet rounded, weighted by the inputs' second moments ``H = E[x xᵀ]``.

Terminology
-----------
* **row**: input channel ``k`` of a Dense kernel ``(K, N)`` (a *column* of the ``(N, K)``
  weight in GPTQ's paper and code). GPTQ rounds rows one at a time.
* **group**: as in ``jquant.qarray``: consecutive rows (original order) sharing a scale.
* **block**: ``block_size`` consecutive rows in processing order whose updates of the
  later rows are batched into one matmul (GPTQ's "lazy batch"). Within a block every
  update is applied at once, so the result equals row-by-row GPTQ up to float rounding.

The algorithm, on the kernel ``W (K, N)`` and ``H`` of one layer:

1. Dead inputs (``H_kk == 0``: never nonzero in the calibration data) get ``H_kk = 1``.
   Their weights are kept (reference GPTQ zeroes them): such a row is rounded exactly as
   RTN would, receives no update and passes none on, because calibration says nothing
   about it.
2. ``H += damp · mean(diag H) · I``; ``U`` = the upper Cholesky factor of ``H⁻¹``. While
   ``U`` is not finite (``H`` not positive definite), ``damp`` is raised ×10 and the
   factorization retried, up to :data:`MAX_DAMP` (0.01, 0.1, 1, 10 by default; inside the
   trace, a ``while_loop``). ``info`` reports the damp used and whether it factored;
   :func:`check_info` warns about the first and raises on the second.
3. With ``act_order`` rows are processed by descending ``H_kk`` (stable order on ties).
4. Row ``k`` in turn: ``q_k = quant(w_k)``, ``e = (w_k - q_k) / U_kk``, and every later row
   ``j`` gets ``w_j -= U_kj · e``.

Scales. With ``static_groups`` (the default, and required by ``act_order`` and
``double_quant``) every group's scale and zero point is computed up front from the
original ``W`` exactly as RTN computes them (``compute_scale`` with the rule's settings,
after the optional ``mse`` clip search, then double quantization as ``quantize_array``
does), and each row is encoded with its own group's scale whatever its position in the
processing order. Without static groups (``act_order: false``) a group's scale is computed
when its first row is reached, from the group's rows as updated by then (GPTQ's own
scheme); blocks are then made whole groups so that every row of the group is up to date.

With ``refit`` the codes are kept and every group's scale (and zero point) is then fitted
to them by least squares on the output error (:func:`refit_scales`).

Codes and values are jquant's: ``code = encode(w / s + z)``, ``value = (decode(code) - z) · s``
with ``s`` as stored (after the ``scale_dtype`` cast), so every format works.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant._scales import scale_range_problems
from jquant.algorithms import _gptq_host, register
from jquant.algorithms._gptq_args import (  # noqa: F401  (check_info: public here)
    DEFAULTS,
    MAX_DAMP,
    SCALE_RANGE,
    check_args,
    check_info,
    settings,
)
from jquant.algorithms.rtn import search_clip_ratios
from jquant.qarray import (
    QArray,
    _apply_groups,
    _num_groups,
    check_float_weight,
    compute_scale,
    double_quantized_scale,
    encode_groups,
    from_codes,
    nvfp4_scale,
)

_HIGHEST = jax.lax.Precision.HIGHEST


@register("gptq", check_args=check_args, check_info=check_info, eager=True)
def gptq(weight, rule, *, path: str, calibration=None) -> tuple[QArray, dict[str, Any]]:
    """GPTQ for a Dense kernel ``(K, N)`` with the rule's format and settings.

    Traceable: runs eagerly or inside ``jit`` with traced ``weight`` and ``calibration``.

    Args:
      weight: float ``(K, N)`` kernel; ``rule.axis`` must be 0 (or -2).
      rule: the resolved :class:`jquant.recipe.Rule`; ``algorithm_args`` as :func:`settings`.
      path: the parameter path, for messages.
      calibration: a :class:`jquant.calib.stats.Calibration` of the kernel's inputs
        (only ``hessian`` ``(K, K)`` is used).

    Returns:
      ``(qarray, info)``: the QArray (storage layout, ``axis=-2``, the rule's activation)
      and arrays for :func:`check_info`: scalars ``damp`` (the relative dampening used),
      ``factored`` (bool) and ``damp_requested``; ``nonfinite`` (int32 ``[NaN/inf count
      in the weight, first row, first column]``) and ``scale_range_<scale dtype>`` (int32
      ``[overflowed, underflowed]`` scale counts).

    Raises:
      ValueError: naming ``path``, without calibration, for a weight that is not a float
        2-D kernel contracted on axis 0, a Hessian of the wrong shape, or
        ``double_quant`` without static groups.

    >>> from jquant.recipe import Rule
    >>> from jquant.calib.stats import from_inputs
    >>> rule = Rule(pattern="w", weight="int4", group_size=32).resolve("w", 2)
    >>> x = jax.random.normal(jax.random.key(0), (256, 64))
    >>> q, info = gptq(jnp.ones((64, 8)), rule, path="w", calibration=from_inputs(x))
    >>> q.qtype, q.shape, bool(info["factored"])
    ('int4', (64, 8), True)
    """
    if calibration is None:
        raise ValueError(
            f"{path}: gptq needs calibration data (the inputs' statistics): use jquant.calib "
            "to collect them from sample inputs, or pass calibration={path: Calibration}"
        )
    check_float_weight(weight, name=path, values=False)
    if weight.ndim != 2 or rule.axis not in (0, -2):
        raise ValueError(
            f"{path}: gptq quantizes 2-D Dense kernels (K, N) contracted on axis 0; got shape "
            f"{tuple(weight.shape)} with axis={rule.axis}. Use algorithm: rtn for this "
            "parameter (a skip or rtn rule before the gptq one)"
        )
    k = weight.shape[0]
    hessian = getattr(calibration, "hessian", None)
    if hessian is None or tuple(hessian.shape) != (k, k):
        got = None if hessian is None else tuple(hessian.shape)
        raise ValueError(
            f"{path}: calibration Hessian has shape {got}; the kernel's K={k} "
            f"needs ({k}, {k}): is it the calibration of another layer?"
        )
    s = settings(rule.algorithm_args)
    if rule.double_quant and not s["static_groups"]:
        raise ValueError(
            f"{path}: double_quant needs static_groups: true (the scales are "
            "quantized up front, before GPTQ runs)"
        )
    if s["refit"] and (rule.double_quant or rule.per_tensor):
        raise ValueError(
            f"{path}: refit fits each group's own float scale; it cannot with "
            f"{'double_quant (quantized scales)' if rule.double_quant else 'per_tensor'}"
        )
    block_scale = rule.format.block_scale
    if s["refit"] and block_scale is not None:
        raise ValueError(f"{path}: refit fits float scales; {rule.format.name}'s are "
                         f"{block_scale} block scales: drop refit")
    if block_scale == "e4m3" and not s["static_groups"]:
        raise ValueError(f"{path}: {rule.format.name}'s block scales share a per-tensor "
                         "scale of the original weight; it needs static_groups: true")
    static = dict(
        qtype=rule.format.name, group_size=rule.group_size, per_tensor=rule.per_tensor,
        scale_dtype=np.dtype(rule.jnp_scale_dtype), clip_ratio=rule.clip_ratio,
        double_quant=rule.double_quant, block_size=s["block_size"],
        static_groups=s["static_groups"], mse=s["mse"], refit=s["refit"],
    )  # fmt: skip
    if _gptq_host.on_host(hessian) and not isinstance(weight, jax.core.Tracer):
        # Concrete on the CPU: LAPACK factors one copy of H in place (see _gptq_host).
        h = _gptq_host.local_view(hessian)
        perm = _gptq_host.order(_gptq_host.fixed_diagonal(h), s["act_order"])
        u, used, factored = _gptq_host.factor(h, perm, float(s["damp"]))
        put = partial(_like, like=hessian)
        u_device = put(u)  # a copy: XLA:CPU does not adopt NumPy's buffer
        del u  # freed once copied
        weight = jnp.asarray(weight)
        args = (hessian if isinstance(hessian, jax.Array) else put(hessian),
                put(perm.astype(np.int32)), u_device,
                put(used), put(np.bool_(factored)), put(np.float32(s["damp"])))  # fmt: skip
        n = weight.shape[1]
        step = _gptq_host.sweep_columns(k, n, rule)
        parts = [_gptq_sweep(weight if step >= n else weight[:, lo : lo + step], *args, **static)
                 for lo in range(0, n, step)]  # fmt: skip
        q, info = parts[0] if len(parts) == 1 else _gptq_host.join_columns(parts)
    else:
        q, info = _gptq_core(jnp.asarray(weight), jnp.asarray(hessian), damp=float(s["damp"]),
                             act_order=s["act_order"], **static)  # fmt: skip
    return dataclasses.replace(q, activation=rule.activation), info


def _inverse_cholesky_upper(h):
    """Upper ``U`` with ``UᵀU = h⁻¹`` (NaN where ``h`` is not positive definite).

    With ``J`` the reversal, ``J h J = L Lᵀ`` gives ``h⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)``: only
    ``L⁻¹`` is needed, not GPTQ's Cholesky, inverse and Cholesky.
    """
    return _cholesky_inverse(h[::-1, ::-1])[::-1, ::-1]


def _cholesky_inverse(h):
    """``L⁻¹`` for ``h = L Lᵀ``, by halves, ``h = [[A, Bᵀ], [B, C]]``: ``A = L₁L₁ᵀ``,
    ``L₂₁ = B L₁⁻ᵀ``, ``C - L₂₁L₂₁ᵀ = L₂L₂ᵀ`` and ``L⁻¹ = [[L₁⁻¹, 0], [-L₂⁻¹L₂₁L₁⁻¹, L₂⁻¹]]``.
    Nearly all of the work is matmuls (XLA:CPU's Cholesky and triangular solve are several
    times slower per flop); a failed factorization anywhere spreads NaN everywhere after."""
    k = h.shape[0]
    if k <= 192:
        eye = jnp.eye(k, dtype=h.dtype)
        return jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(h), eye, lower=True)
    m = k // 2
    dot = partial(jnp.dot, precision=_HIGHEST)
    inv1 = _cholesky_inverse(h[:m, :m])
    l21 = dot(h[m:, :m], inv1.T)
    inv2 = _cholesky_inverse(h[m:, m:] - dot(l21, l21.T))
    top = jnp.concatenate([inv1, jnp.zeros((m, k - m), h.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([-dot(inv2, dot(l21, inv1)), inv2], axis=1)])


def _factor(h, damp: float):
    """``(U, damp used, factored)``: damp ×10 per failed try, at most :data:`MAX_DAMP`."""
    tries = 1 + int(math.floor(math.log10(MAX_DAMP / damp) + 1e-9))
    damps = jnp.asarray([damp * 10.0**t for t in range(tries)], jnp.float32)
    shift = jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=jnp.float32)

    def retry(state):  # rare: plain Cholesky and triangular solve, quicker to compile
        t = state[0] + 1
        eye = jnp.eye(h.shape[0], dtype=jnp.float32)
        lower = jnp.linalg.cholesky((h + damps[t] * shift)[::-1, ::-1])
        u = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)[::-1, ::-1]
        return t, u, jnp.all(jnp.isfinite(u))

    # The first try outside the loop: XLA:CPU runs the factorization ~2x slower in a loop.
    u = _inverse_cholesky_upper(h + damps[0] * shift)
    t, u, ok = jax.lax.while_loop(
        lambda state: ~state[2] & (state[0] < tries - 1),
        retry,
        (jnp.int32(0), u, jnp.all(jnp.isfinite(u))),
    )
    return u, damps[t], ok


def _scales(w_t, qt, group_size, per_tensor, scale_dtype, clip_ratio, mse):
    """RTN's scales of ``w_t (N, L)`` (stored dtype), float32 ones for the range check, and
    the clip ratios used."""
    ratio = jnp.float32(clip_ratio)
    if mse is not None:
        ratio = search_clip_ratios(
            w_t, qt.name, axis=-1, group_size=group_size, per_tensor=per_tensor,
            scale_dtype=scale_dtype, clip_ratio=clip_ratio, grid=mse[0], max_shrink=mse[1],
        )  # fmt: skip
    kw = dict(per_tensor=per_tensor, clip_ratio=ratio)
    scale, zero_point = compute_scale(w_t, qt, group_size, scale_dtype=scale_dtype, **kw)
    exact, _ = compute_scale(w_t, qt, group_size, scale_dtype=jnp.float32, **kw)
    return scale, zero_point, exact, ratio


def refit_scales(w, h, values, scale, zero_point, group_size):
    """Each group's scale (and zero point) refitted to the codes GPTQ chose, by least squares.

    With the codes fixed, a group's dequantized weights ``a·v + b`` (``v`` the decoded
    codes, ``a = s``, ``b = -s·z``; ``b = 0`` for symmetric formats) are linear in
    ``(a, b)``, so the scales that minimise the output error ``(w - ŵ)ᵀ H (w - ŵ)`` of each
    output column, every group of the column at once (``H`` couples them), solve one small
    linear system of ``2·groups`` unknowns (``groups`` without zero points). A column keeps
    its old scales when the fit is not better after the cast to the stored dtype, or a
    fitted scale is not within [1/2, 2]x the old one (a group whose codes are all equal
    leaves ``(a, b)`` underdetermined).

    Args:
      w: the original kernel ``(K, N)`` float32.
      h: the (damped) Hessian ``(K, K)``.
      values: the decoded codes ``(K, N)``.
      scale, zero_point: ``(N, G)`` as stored (zero_point None for symmetric formats).
      group_size: rows per group (None: one group over K).

    Returns:
      ``(scale, zero_point)`` in the dtypes given.
    """
    k, n = w.shape
    gs = k if group_size is None else group_size
    g = -(-k // gs)
    pad = g * gs - k
    s0 = scale.astype(jnp.float32)  # (N, G)
    feats = [values] if zero_point is None else [values, jnp.ones_like(values)]
    f = jnp.pad(jnp.stack(feats, axis=1), ((0, pad), (0, 0), (0, 0)))  # (Kp, J, N)
    j = f.shape[1]
    hp = jnp.pad(h, ((0, pad), (0, pad)))
    hr = hp.reshape(g * gs, g, gs)
    dot = partial(jnp.einsum, precision=_HIGHEST)
    hw = dot("kl,ln->kn", hp, jnp.pad(w, ((0, pad), (0, 0))))  # (Kp, N)
    theta0 = [s0] if zero_point is None else [s0, -s0 * zero_point.astype(jnp.float32)]
    theta0 = jnp.stack(theta0, axis=-1).reshape(n, g * j)
    eye = jnp.eye(g * j, dtype=jnp.float32)

    # Columns in chunks of at most ~64M floats of intermediate (one chunk for a decoder
    # layer's kernels): batched einsums and one batched solve per chunk.
    chunk = max(1, min(n, (1 << 26) // (g * gs * g * j)))
    thetas = []
    for c0 in range(0, n, chunk):
        fr = f[..., c0 : c0 + chunk].reshape(g, gs, j, -1)  # (G, gs, J, C)
        t = dot("khl,hljc->khjc", hr, fr)  # (Kp, G, J, C)
        m = dot("gkic,gkhjc->cgihj", fr, t.reshape(g, gs, g, j, -1))
        m = m.reshape(-1, g * j, g * j)
        r = dot("gkic,gkc->cgi", fr, hw[:, c0 : c0 + chunk].reshape(g, gs, -1))
        r = r.reshape(-1, g * j)
        # A tiny ridge toward the old scales keeps underdetermined groups where they were.
        lam = 1e-6 * jnp.mean(jnp.diagonal(m, axis1=1, axis2=2), axis=1)[:, None]
        rhs = r + lam * theta0[c0 : c0 + chunk]
        thetas.append(_spd_solve(m + lam[:, :, None] * eye, rhs))
    theta = jnp.concatenate(thetas, axis=0)
    theta = theta.reshape(n, g, j)
    a = theta[..., 0]
    new_scale = a.astype(scale.dtype)
    new_zero = None
    if zero_point is not None:
        new_zero = (-theta[..., 1] / jnp.where(a != 0, a, 1.0)).astype(zero_point.dtype)

    def error(sc, zp):  # per column (N,): (w - ŵ)ᵀ H (w - ŵ)
        rows = jnp.repeat(sc.astype(jnp.float32).T, gs, axis=0)[:k]
        zr = 0.0 if zp is None else jnp.repeat(zp.astype(jnp.float32).T, gs, axis=0)[:k]
        e = w - (values - zr) * rows
        return jnp.sum(dot("kl,ln->kn", h, e) * e, axis=0)

    sane = jnp.all(jnp.isfinite(theta), axis=(1, 2)) & jnp.all(
        (a >= 0.5 * s0) & (a <= 2.0 * s0), axis=1
    )
    if new_zero is not None:
        sane &= jnp.all(jnp.isfinite(new_zero.astype(jnp.float32)), axis=1)
    better = sane & (error(new_scale, new_zero) < error(scale, zero_point))
    keep = better[:, None]
    out_scale = jnp.where(keep, new_scale, scale)
    out_zero = None if zero_point is None else jnp.where(keep, new_zero, zero_point)
    return out_scale, out_zero


def _spd_solve(a, b):
    """``x`` with ``a x = b`` for a batch of symmetric positive definite ``a (B, n, n)``,
    ``b (B, n)``: Gauss-Jordan without pivoting (safe for SPD), all in matmul-free
    elementwise steps. Not ``jnp.linalg.solve``: its batched LAPACK call, run a second
    time inside the calibration pass, hung XLA:CPU (0.10.2) with every thread idle."""
    n = a.shape[-1]

    def step(i, carry):
        a, b = carry
        piv = a[:, i, i]
        row = a[:, i, :] / piv[:, None]
        rb = b[:, i] / piv
        factor = a[:, :, i].at[:, i].set(0.0)
        a = (a - factor[:, :, None] * row[:, None, :]).at[:, i, :].set(row)
        b = (b - factor * rb[:, None]).at[:, i].set(rb)
        return a, b

    return jax.lax.fori_loop(0, n, step, (a, b))[1]


def _round_rows(u1, s1, z1, qt, start, stop, carry):
    """Rounds rows ``start..stop`` of a block, each with its row of ``s1``/``z1`` (B, N),
    and updates the block's later rows. ``carry`` = (rows (B, N), codes, errors)."""

    def body(i, carry):
        w1, codes, errors = carry
        row, s = w1[i][:, None], s1[i][:, None]
        z = None if z1 is None else z1[i][:, None]
        code = encode_groups(row, s, z, qt, None)
        value = _apply_groups(qtypes.decode(qt, code), s, z, None)
        err = (row - value)[:, 0] / u1[i, i]
        # u1 is upper triangular: rows before i get 0 · err, row i becomes its value.
        w1 = w1 - u1[i][:, None] * err[None, :]
        return w1, codes.at[i].set(code[:, 0]), errors.at[i].set(err)

    return jax.lax.fori_loop(start, stop, body, carry)


def _static_scales(w, perm, qt, group_size, per_tensor, scale_dtype, clip_ratio,
                   double_quant, mse):  # fmt: skip
    """Every group's scale up front from ``w (K, N)``, exactly as ``rtn``/``quantize_array``.

    Returns ``(stored, zero_point, exact, cast, rows)``: the scale as stored (a log8 QArray
    if double-quantized), the zero point, the float32 and scale-dtype scales (for the range
    check), and ``rows = (group, scales, zero points)``: ``group (K,)`` the group of each
    row in processing order ``perm`` and the kept float32 scales and zero points (after
    double quantization) ``(G + 1, N or 1)``, the last row 1 (and 0) for padded rows.
    Rows look their group up a block at a time: no ``(K, N)`` table is built.
    """
    scale, zero_point, exact, ratio = _scales(w.T, qt, group_size, per_tensor, scale_dtype,
                                              clip_ratio, mse)  # fmt: skip
    cast = stored = scale
    if qt.block_scale == "e4m3":  # the same values, stored as E4M3 codes and a tensor scale
        stored = nvfp4_scale(w.T, group_size, ratio)
    if double_quant:  # as quantize_array: encode against the scales actually kept
        stored = double_quantized_scale(scale)
        scale = stored.dequantize(jnp.float32)
    k = w.shape[0]
    row_group = jnp.zeros(k, jnp.int32) if group_size is None else perm // group_size
    tables = tuple(
        None if a is None else jnp.concatenate(
            [a.astype(jnp.float32).T, jnp.full((1, a.shape[0]), c, jnp.float32)])
        for a, c in ((scale, 1.0), (zero_point, 0.0))
    )  # fmt: skip
    return stored, zero_point, exact, cast, (row_group.astype(jnp.int32), *tables)


_STATIC = ("qtype", "group_size", "per_tensor", "scale_dtype", "clip_ratio", "double_quant",
           "block_size", "static_groups", "mse", "refit")


def _like(x, like):
    """NumPy ``x`` as a JAX array placed as ``like`` (every process passes the same ``x``)."""
    x = np.asarray(x)
    if not isinstance(like, jax.Array):
        return jnp.asarray(x)
    return jax.make_array_from_callback(x.shape, like.sharding, lambda idx: x[idx])


def _dead_fixed(hessian):
    """``H`` in float32 with dead inputs (``H_kk == 0``) given ``H_kk = 1``."""
    h = hessian.astype(jnp.float32)
    return jnp.where(jnp.diag(jnp.diagonal(h) == 0), jnp.float32(1.0), h)


@partial(jax.jit, static_argnames=(*_STATIC, "damp", "act_order"))
def _gptq_core(weight, hessian, *, damp, act_order, **static):
    """The traced GPTQ: the QArray (``axis=-2``, no activation) and the info arrays."""
    h = _dead_fixed(hessian)
    k = h.shape[0]
    perm = jnp.argsort(-jnp.diagonal(h), stable=True) if act_order else jnp.arange(k)
    u, used_damp, factored = _factor(h[perm][:, perm], damp)
    return _sweep(weight, hessian, perm, u, used_damp, factored, jnp.float32(damp), **static)


def _sweep(weight, hessian, perm, u, used_damp, factored, damp, *, qtype, group_size,
           per_tensor, scale_dtype, clip_ratio, double_quant, block_size, static_groups,
           mse, refit):  # fmt: skip
    """GPTQ's rounding sweep given ``U`` (upper, ``UᵀU = (Pᵀ H P)⁻¹``) for the order
    ``perm``: the QArray (``axis=-2``, no activation) and the info arrays.

    Rows are padded to whole blocks: a padded row is zero, has ``U_ii = 1`` and scale 1,
    so it encodes exactly and passes nothing on; zeros change no group's scale either
    (every range holds zero), so padding a short last group leaves its scale alone.
    """
    qt = qtypes.get(qtype)
    k, n = weight.shape
    w = weight.astype(jnp.float32)
    scale_args = (qt, group_size, per_tensor, scale_dtype, clip_ratio)

    # One group needs no dynamic scale: no row of it is updated before its first row.
    dynamic = not static_groups and _num_groups(k, group_size) > 1 and not per_tensor
    # Dynamic groups: blocks of whole groups, so a group is fully updated before its scale.
    block = group_size * max(1, block_size // group_size) if dynamic else min(block_size, k)
    blocks = -(-k // block)
    pad = blocks * block - k
    wp = jnp.pad(w[perm], ((0, pad), (0, 0)))
    if pad:  # a new (K + pad)² buffer, so only when K is not whole blocks
        u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(k + pad) >= k).astype(u.dtype)
    if not dynamic:
        stored, zero_point, exact, cast, (row_group, s_table, z_table) = _static_scales(
            w, perm, *scale_args, double_quant, mse
        )
        padded = s_table.shape[0] - 1  # padded rows look up the table's last row (1 and 0)
        row_group = jnp.pad(row_group, (0, pad), constant_values=padded)

    def one_block(errors, i1):
        # The block's rows after the updates of every earlier block (rows not yet rounded
        # have zero error), then rounded one by one with updates inside the block.
        u_cols = jax.lax.dynamic_slice_in_dim(u, i1, block, axis=1)  # (K + pad, block)
        w1 = jax.lax.dynamic_slice_in_dim(wp, i1, block)
        w1 = w1 - jnp.dot(u_cols.T, errors, precision=_HIGHEST)
        u1 = jax.lax.dynamic_slice_in_dim(u_cols, i1, block)
        carry = (w1, jnp.zeros((block, n), qt.code_dtype), jnp.zeros((block, n), jnp.float32))
        if not dynamic:
            g1 = jax.lax.dynamic_slice_in_dim(row_group, i1, block)
            s1, z1 = (None if a is None else jnp.broadcast_to(a[g1], (block, n))
                      for a in (s_table, z_table))  # fmt: skip
            _, codes, errs = _round_rows(u1, s1, z1, qt, 0, block, carry)
            return jax.lax.dynamic_update_slice_in_dim(errors, errs, i1, axis=0), (codes,)
        found = []
        for g1 in range(0, block, group_size):
            s, z, e, _ = _scales(carry[0][g1 : g1 + group_size].T, qt, None, False,
                                 scale_dtype, clip_ratio, mse)  # fmt: skip
            found.append((s, z, e))
            s1, z1 = (None if a is None else jnp.broadcast_to(a.astype(jnp.float32).T, (block, n))
                      for a in (s, z))  # fmt: skip
            carry = _round_rows(u1, s1, z1, qt, g1, g1 + group_size, carry)
        _, codes, errs = carry
        found = [None if parts[0] is None else jnp.concatenate(parts, axis=-1)
                 for parts in zip(*found)]  # fmt: skip
        return jax.lax.dynamic_update_slice_in_dim(errors, errs, i1, axis=0), (codes, *found)

    errors = jnp.zeros((k + pad, n), jnp.float32)
    _, (codes, *found) = jax.lax.scan(one_block, errors, jnp.arange(blocks) * block)
    if dynamic:  # (blocks, N, groups per block) → (N, G)
        groups = _num_groups(k, group_size)
        stored, zero_point, exact = (
            None if a is None else jnp.moveaxis(a, 0, 1).reshape(n, -1)[:, :groups]
            for a in found
        )  # fmt: skip
        cast = stored
    codes = codes.reshape(k + pad, n)[:k][jnp.argsort(perm)].T  # (N, K), original row order
    if refit:
        h = _dead_fixed(hessian)
        shift = used_damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=jnp.float32)
        stored, zero_point = refit_scales(w, h + shift, qtypes.decode(qt, codes).T, stored,
                                          zero_point, group_size)  # fmt: skip
    q = from_codes(codes, stored, zero_point, qtype=qt, axis=-2, group_size=group_size,
                   dtype=weight.dtype)  # fmt: skip
    bad = ~jnp.isfinite(weight)
    first = jnp.argmax(bad.reshape(-1)).astype(jnp.int32)
    nonfinite = jnp.stack([jnp.sum(bad, dtype=jnp.int32), first // n, first % n])
    # Arrays only, so that info leaves a jit; the scale dtype (for messages) is in a key.
    info = {
        "damp": used_damp, "factored": factored, "damp_requested": damp,
        "nonfinite": nonfinite,
        SCALE_RANGE + np.dtype(scale_dtype).name: jnp.stack(
            [p.astype(jnp.int32) for p in scale_range_problems(exact, cast)]
        ),
    }  # fmt: skip
    return q, info


_gptq_sweep = jax.jit(_sweep, static_argnames=_STATIC)
