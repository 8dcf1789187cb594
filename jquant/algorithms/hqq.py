"""HQQ, Half-Quadratic Quantization (Badri & Shaji 2023): better scales and zero points
without calibration data.

Starting from RTN's parameters, each group's parameters are fitted to the weight under a
robust ``l_p`` loss (``p < 1``), by half-quadratic splitting: an auxiliary error ``W_e``
absorbs the few large residuals and the parameters fit the rest. One iteration, with the
codes ``q`` and the group's scale ``s`` and zero point ``z``::

    q   = clip(round(W / s + z))           # the codes under the current parameters
    W_r = (q - z) * s                      # their reconstruction
    W_e = s * shrink_lp((W - W_r) / s, beta, p)
    z   <- mean(q - (W - W_e) / s)         # the zero point fitting W - W_e
    beta <- beta * kappa

``shrink_lp(x, beta, p) = sign(x) * max(|x| - |x|**(p - 1) / beta, 0)`` is the generalised
soft threshold (the proximal step of ``|x|**p / beta``).

Differences from the reference implementation, and why:

* **The residual is shrunk in code units** (divided by the group's scale), so ``beta`` is
  dimensionless: quantizing ``c * W`` gives ``c`` times the same result (up to the
  rounding of the stored scales). HQQ's code
  shrinks in weight units; the two agree for ``beta_here = beta_hqq * s**p``, so HQQ's
  ``beta = 10`` on uint4 groups of typical LLM weights (``s ~ 0.005``) is ``beta ~ 0.25``
  here. Up to ``beta ~ 1`` (the default) the threshold zeroes nearly every residual and a
  step is close to a least-squares fit to the current codes; much larger values leave
  more of the error to ``W_e`` and lower the squared error less.
* **Scales are fitted too** (``optimize_scale``, default true): the last line becomes a
  least-squares fit of ``(q - z) * s`` to ``W - W_e`` in both ``s`` and ``z``. With the zero
  point alone (HQQ's default, ``optimize_scale: false``), a per-channel uint4 weight with
  heavy tails gains almost nothing, since only a scale can trade range for resolution.
  Symmetric formats (``int*``, ``fp8_*``, ``nf4``) have no zero point: their scale is
  fitted the same way, ``s <- <W - W_e, q> / <q, q>``.
* **The best iterate is kept per group**, by squared (Frobenius) error of the
  reconstruction as stored, and RTN's parameters are iterate 0: HQQ minimises an ``l_p``
  loss, not the squared error, so a group may get worse, and there RTN's parameters stay.
  Every group's squared error is therefore at most RTN's; the total is usually lower.

Scales and zero points are cast to ``scale_dtype`` in every iteration and the codes are
encoded against the cast values, so the error that picks the best iterate is the stored
weight's. Zero points are floats (stored in ``scale_dtype``, as ``from_codes`` allows),
not the integers ``quantize_array`` makes; every dequantization path handles them.

Recipe settings: ``algorithm: hqq``, ``algorithm_args: {iterations: 20, p: 0.7,
beta: 1.0, kappa: 1.01, optimize_scale: true}`` (all optional). Calibration is ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jquant import qtypes
from jquant._groups import apply_groups, group_reduce, per_group
from jquant.algorithms import register
from jquant.qarray import QArray, check_float_weight, encode_groups, from_codes, quantize_array

DEFAULTS = {"iterations": 20, "p": 0.7, "beta": 1.0, "kappa": 1.01, "optimize_scale": True}


def settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """hqq's ``algorithm_args`` with defaults filled in; ValueError naming a bad one."""
    unknown = [k for k in args if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **args}
    it = out["iterations"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        raise ValueError(f"iterations={it!r} must be a non-negative integer")
    for key, ok, want in (
        ("p", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("beta", lambda v: 0 < v < float("inf"), "a positive finite number"),
        ("kappa", lambda v: 1 <= v < float("inf"), "a finite number >= 1"),
    ):
        v = out[key]
        if not isinstance(v, int | float) or isinstance(v, bool) or not ok(v):
            raise ValueError(f"{key}={v!r} must be {want}")
        out[key] = float(v)
    if not isinstance(out["optimize_scale"], bool):
        raise ValueError(f"optimize_scale={out['optimize_scale']!r} must be true or false")
    return out


def check_args(args: Mapping[str, Any]) -> None:
    """Validates hqq's ``algorithm_args`` (see the module docstring)."""
    settings(args)


@register("hqq", check_args=check_args)
def hqq(weight, rule, *, path: str, calibration=None) -> QArray:
    """HQQ-optimised scales (and zero points) with the rule's format and groups.

    >>> from jquant.recipe import Rule
    >>> rule = Rule(pattern="w", weight="uint4", group_size=64)
    >>> hqq(jnp.ones((128, 4)), rule.resolve("w", 2), path="w").zero_point.shape
    (4, 2)
    """
    del calibration
    opts = settings(rule.algorithm_args)
    check_float_weight(weight, name=path, values=False)
    if rule.per_tensor or rule.double_quant:
        key = "per_tensor" if rule.per_tensor else "double_quant"
        raise ValueError(
            f"{path}: hqq fits per-group (or per-channel) float scales; "
            f"{key}: true is not supported with it (drop it, or use rtn)"
        )
    if rule.format.block_scale is not None:
        raise ValueError(f"{path}: hqq fits free float scales; {rule.format.name} fixes its "
                         f"scales ({rule.format.block_scale}): use rtn or gptq")
    axis = rule.axis - weight.ndim if rule.axis >= 0 else rule.axis
    # RTN is the starting point; quantize_array also checks the values (NaN/inf, scale
    # range) when called eagerly.
    start = quantize_array(
        weight, rule.weight, axis=axis, group_size=rule.group_size,
        scale_dtype=rule.jnp_scale_dtype, clip_ratio=rule.clip_ratio, name=path,
    )  # fmt: skip
    q = _hqq(weight, start.scale, start.zero_point, qtype=start.qtype, axis=axis,
             group_size=rule.group_size, **opts)  # fmt: skip
    return dataclasses.replace(q, activation=rule.activation)


@partial(jax.jit, static_argnames=("qtype", "axis", "group_size", "optimize_scale"))
def _hqq(weight, scale, zero_point, *, qtype, axis, group_size, iterations, p, beta, kappa,
         optimize_scale):  # fmt: skip
    w_t = jnp.moveaxis(weight.astype(jnp.float32), axis, -1)
    scale, zero_point = optimize(
        w_t, scale, zero_point, qtype=qtype, group_size=group_size, iterations=iterations,
        p=p, beta=beta, kappa=kappa, optimize_scale=optimize_scale,
    )  # fmt: skip
    codes = encode_groups(w_t, scale, zero_point, qtype, group_size)
    return from_codes(codes, scale, zero_point, qtype=qtype, axis=axis, group_size=group_size,
                      dtype=weight.dtype)  # fmt: skip


def shrink_lp(x, beta, p):
    """The generalised soft threshold ``sign(x) * max(|x| - |x|**(p-1) / beta, 0)``.

    For ``p = 1`` it is the soft threshold at ``1 / beta``; for ``p < 1`` small values are
    zeroed and large ones kept nearly whole (the ``1e-8`` keeps ``0**(p-1)`` finite).
    """
    a = jnp.abs(x)
    return jnp.sign(x) * jnp.maximum(a - jnp.power(a + 1e-8, p - 1.0) / beta, 0.0)


@partial(jax.jit, static_argnames=("qtype", "group_size", "optimize_scale"))
def optimize(w_t, scale, zero_point, *, qtype: str, group_size: int | None,
             iterations: int = 20, p: float = 0.7, beta: float = 1.0, kappa: float = 1.01,
             optimize_scale: bool = True):  # fmt: skip
    """HQQ's parameters for ``w_t`` (storage layout, K last), from a starting point.

    Args:
      w_t: float32 weight ``(..., K)``.
      scale: starting scales ``(..., G)`` in the dtype to store them in (RTN's).
      zero_point: starting zero points ``(..., G)`` (asymmetric formats) or None.
      qtype, group_size: the format and grouping along K.
      iterations, p, beta, kappa, optimize_scale: see the module docstring.

    Returns:
      ``(scale, zero_point)`` in the dtypes given: per group, the iterate (the start
      included) with the smallest squared error ``sum((w - dequant(w))**2)``.
    """

    def keep_better(best, params, err):  # per group
        better = err < best[2]
        return jax.tree.map(lambda n, b: jnp.where(better, n, b), (*params, err), best)

    def body(_, carry):
        (scale, zero_point, beta), best = carry
        q, deq, err = _evaluate(w_t, scale, zero_point, qtype, group_size)
        best = keep_better(best, (scale, zero_point), err)
        new = _update(w_t, scale, zero_point, q, deq, beta, group_size=group_size, p=p,
                      optimize_scale=optimize_scale)  # fmt: skip
        return (*new, beta * kappa), best

    inf = jnp.full(scale.shape, jnp.inf, jnp.float32)
    state = (scale, zero_point, jnp.asarray(beta, jnp.float32))
    (scale, zero_point, _), best = jax.lax.fori_loop(
        0, iterations, body, (state, (scale, zero_point, inf))
    )
    best = keep_better(best, (scale, zero_point),
                       _evaluate(w_t, scale, zero_point, qtype, group_size)[2])  # fmt: skip
    return best[0], best[1]


@partial(jax.jit, static_argnames=("qtype", "group_size", "optimize_scale"))
def step(w_t, scale, zero_point, beta, *, qtype: str, group_size: int | None, p: float,
         optimize_scale: bool = True):  # fmt: skip
    """One HQQ iteration: the next ``(scale, zero_point)``, cast to their stored dtypes."""
    q, deq, _ = _evaluate(w_t, scale, zero_point, qtype, group_size)
    return _update(w_t, scale, zero_point, q, deq, beta, group_size=group_size, p=p,
                   optimize_scale=optimize_scale)  # fmt: skip


def _evaluate(w_t, scale, zero_point, qtype, group_size):
    """Decoded codes, reconstruction and squared error per group (..., G), with the
    parameters as stored."""
    codes = encode_groups(w_t, scale, zero_point, qtype, group_size)
    q = qtypes.decode(qtype, codes)
    z = None if zero_point is None else zero_point.astype(jnp.float32)
    deq = apply_groups(q, scale.astype(jnp.float32), z, group_size)
    return q, deq, group_reduce(jnp.square(w_t - deq), group_size, jnp.sum)


def _update(w_t, scale, zero_point, q, deq, beta, *, group_size, p, optimize_scale):
    """The parameters fitted to ``W - W_e`` given the codes ``q`` and reconstruction ``deq``.

    A group whose fit is degenerate (all codes equal, or a non-positive or non-finite
    scale) keeps its scale and takes the zero-point-only update.
    """
    s = scale.astype(jnp.float32)
    z = None if zero_point is None else zero_point.astype(jnp.float32)
    r = per_group(w_t - deq, group_size, lambda v, s: v / s, s)  # residual, code units
    target = r - shrink_lp(r, beta, p)  # (W - W_e - W_r) / s

    def mean(x):
        return group_reduce(x, group_size, jnp.mean)

    def fitted(ratio, ok, fallback):  # s * ratio where the fit is sound, else fallback
        ok = ok & jnp.isfinite(ratio) & (ratio > 0)
        new = (s * jnp.where(ok, ratio, 1.0)).astype(scale.dtype)
        ok = ok & (new.astype(jnp.float32) > 0) & jnp.isfinite(new.astype(jnp.float32))
        return jnp.where(ok, new, fallback), ok

    if z is None:  # symmetric: s' = <W - W_e, q> / <q, q>, in units of s
        qq = group_reduce(q * q, group_size, jnp.sum)
        tq = group_reduce((target + q) * q, group_size, jnp.sum)
        new_scale, _ = fitted(tq / jnp.where(qq > 0, qq, 1.0), qq > 0, scale)
        return new_scale, None
    z_only = z - mean(target)  # HQQ's update: z <- mean(q - (W - W_e) / s)
    if not optimize_scale:
        return scale, z_only.astype(zero_point.dtype)
    # (W - W_e) / s = target + q - z ≈ (q - z') * ratio: least squares in ratio and z'.
    t = target + per_group(q, group_size, lambda v, z: v - z, z)
    mq, mt = mean(q), mean(t)
    dq = per_group(q, group_size, lambda v, m: v - m, mq)
    dt = per_group(t, group_size, lambda v, m: v - m, mt)
    var = group_reduce(dq * dq, group_size, jnp.sum)
    ratio = group_reduce(dq * dt, group_size, jnp.sum) / jnp.where(var > 0, var, 1.0)
    new_scale, ok = fitted(ratio, var > 0, scale)
    z_fit = mq - mt / jnp.where(ok, ratio, 1.0)
    return new_scale, jnp.where(ok, z_fit, z_only).astype(zero_point.dtype)
