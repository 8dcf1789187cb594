"""AWQ, activation-aware weight quantization (Lin et al. 2023): input-channel scales and
clipping chosen by the output error on calibration inputs.

Two searches, both scored by the **output error** of the linear layers, computed from the
calibration Hessian ``H = E[x xᵀ]`` (``jquant.calib.stats``) instead of from the inputs:
``E‖x ΔW‖² = tr(ΔWᵀ H ΔW)`` for a weight error ``ΔW (K, N)``. This is AutoAWQ's loss
(the mean squared output error over the calibration tokens) up to the constant ``1 / N``.

1. `search_scales` (run by the calibration driver before quantizing): for the matmuls
   sharing one input, a per-input-channel scale ``s = mean|x|**α`` (normalised), with ``α``
   on a grid. The fold convention is ``x' = x / s``, ``W' = diag(s) · W``: salient input
   channels (large ``mean|x|``) get their weight rows scaled up, so rounding hurts them
   less. ``α = 0`` is ``s = 1`` (plain RTN) and is tried first, so the chosen scales are
   never worse than RTN on the loss.
2. The registered ``awq`` algorithm (run on each folded weight): RTN with a clip ratio per
   (output channel, group) chosen from ``1 - max_shrink * i / clip_grid`` by the group's
   share of the output error, ``Δ_gᵀ H_gg Δ_g`` (``H_gg`` the group's diagonal block of
   ``H``; a group's share when the other groups are exact).

Recipe settings: ``algorithm: awq``, ``algorithm_args: {grid: 20, clip: true,
clip_grid: 20, max_shrink: 0.5}`` (all optional); ``grid`` is the scale search's, read
by the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant._groups import apply_groups, group_runs
from jquant.algorithms import register
from jquant.qarray import QArray, check_float_weight, compute_scale, encode_groups, quantize_array

DEFAULTS = {"grid": 20, "clip": True, "clip_grid": 20, "max_shrink": 0.5}
_HIGHEST = jax.lax.Precision.HIGHEST


def settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """awq's ``algorithm_args`` with defaults filled in; ValueError naming a bad one."""
    unknown = [k for k in args if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **args}
    for key in ("grid", "clip_grid"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{key}={v!r} must be a positive integer")
    if not isinstance(out["clip"], bool):
        raise ValueError(f"clip={out['clip']!r} must be true or false")
    shrink = out["max_shrink"]
    if not isinstance(shrink, int | float) or isinstance(shrink, bool) or not 0 <= shrink < 1:
        raise ValueError(f"max_shrink={shrink!r} must be a number in [0, 1)")
    out["max_shrink"] = float(shrink)
    return out


def check_args(args: Mapping[str, Any]) -> None:
    """Validates awq's ``algorithm_args`` (see the module docstring)."""
    settings(args)


def require_calibration(calibration, weight, *, path: str, algorithm: str):
    """Raises ValueError unless ``calibration`` holds statistics for a 2-D ``weight``'s
    inputs (``calibration.k`` equal to its contraction length)."""
    if calibration is None:
        raise ValueError(
            f"{path}: {algorithm} needs calibration statistics of this matmul's inputs and "
            "got none; run it through jquant.calib.quantize_model (or pass calibration=)"
        )
    if weight.ndim != 2 or weight.shape[0] != calibration.k:
        raise ValueError(
            f"{path}: {algorithm} quantizes a Dense kernel (K, N) with contraction axis 0 "
            f"and inputs of K channels; got a weight of shape {tuple(weight.shape)} and "
            f"calibration for K={calibration.k}"
        )


# ---- the registered per-weight algorithm ------------------------------------------------


@register("awq", check_args=check_args)
def awq(weight, rule, *, path: str, calibration=None) -> QArray:
    """RTN with AWQ's clip search scored by the calibration Hessian.

    The input scales were already folded into ``weight`` (and ``calibration``) by the
    driver; ``calibration`` is a `jquant.calib.stats.Calibration` of the folded inputs.
    """
    opts = settings(rule.algorithm_args)
    check_float_weight(weight, name=path, values=False)
    if rule.axis not in (0, -2):
        raise ValueError(
            f"{path}: awq needs the contraction axis 0 of a Dense kernel, got axis={rule.axis}"
        )
    require_calibration(calibration, weight, path=path, algorithm="awq")
    clip_ratio = rule.clip_ratio
    if opts["clip"]:
        clip_ratio = search_clip_ratios(
            weight, calibration.hessian, rule.weight, group_size=rule.group_size,
            per_tensor=rule.per_tensor, scale_dtype=rule.jnp_scale_dtype,
            clip_ratio=rule.clip_ratio, grid=opts["clip_grid"], max_shrink=opts["max_shrink"],
        )  # fmt: skip
    return quantize_array(
        weight, rule.weight, axis=0, group_size=rule.group_size, per_tensor=rule.per_tensor,
        scale_dtype=rule.jnp_scale_dtype, clip_ratio=clip_ratio,
        double_quant=rule.double_quant, activation=rule.activation, name=path,
    )  # fmt: skip


def search_clip_ratios(
    weight, hessian, qtype: str, *, group_size: int | None, per_tensor: bool = False,
    scale_dtype=jnp.bfloat16, clip_ratio: float = 1.0, grid: int = 20, max_shrink: float = 0.5,
) -> jax.Array:  # fmt: skip
    """Per (output channel, group) clip ratios minimizing ``Δ_gᵀ H_gg Δ_g``.

    Args:
      weight: float ``(K, N)`` Dense kernel.
      hessian: ``(K, K)`` ``E[x xᵀ]`` of its inputs.
      qtype, group_size, per_tensor, scale_dtype: as for ``quantize_array``.
      clip_ratio: the largest ratio tried (the rule's plain ratio).
      grid, max_shrink: the ratios are ``clip_ratio * (1 - max_shrink * i / grid)`` for
        ``i = 0..grid``; ties keep the larger ratio.

    Returns:
      float32 ratios ``(N, G)`` (``(1, 1)`` for per-tensor), for
      ``quantize_array(..., clip_ratio=...)``. The errors use the scales as stored
      (``scale_dtype``), before any double quantization of the scales.
    """
    w_t = jnp.asarray(weight, jnp.float32).T
    steps = jnp.arange(grid + 1, dtype=jnp.float32) / jnp.float32(grid)
    ratios = jnp.float32(clip_ratio) * (jnp.float32(1.0) - jnp.float32(max_shrink) * steps)
    h = jnp.asarray(hessian, jnp.float32)
    return _clip_search(w_t, h, ratios, qtypes.get(qtype).name, group_size, per_tensor,
                        jnp.dtype(scale_dtype))  # fmt: skip


@partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _clip_search(w_t, hessian, ratios, qtype, group_size, per_tensor, scale_dtype):
    def errors(ratio):
        scale, zp = compute_scale(w_t, qtype, group_size, per_tensor=per_tensor,
                                  clip_ratio=ratio, scale_dtype=scale_dtype)  # fmt: skip
        gs = None if per_tensor else group_size
        codes = encode_groups(w_t, scale, zp, qtype, gs)
        zp = None if zp is None else zp.astype(jnp.float32)
        delta = w_t - apply_groups(qtypes.decode(qtype, codes), scale.astype(jnp.float32),
                                   zp, gs)  # fmt: skip
        err = group_hessian_error(delta, hessian, group_size)
        return jnp.sum(err).reshape(1, 1) if per_tensor else err

    best = jnp.argmin(jax.lax.map(errors, ratios), axis=0)  # first minimum: largest ratio
    return ratios[best]


def group_hessian_error(delta_t, hessian, group_size: int | None):
    """``Δ_gᵀ H_gg Δ_g`` per (row, group) of ``delta_t (N, K)`` → ``(N, G)``.

    ``H_gg`` is the group's diagonal block of ``hessian (K, K)``.
    """
    out = []
    for start, length, count in group_runs(delta_t.shape[-1], group_size):
        idx = start + np.arange(count)[:, None] * length + np.arange(length)[None, :]
        blocks = hessian[idx[:, :, None], idx[:, None, :]]  # (count, L, L)
        d = delta_t[:, start : start + count * length].reshape(-1, count, length)
        hd = jnp.einsum("clm,ncm->ncl", blocks, d, precision=_HIGHEST)
        out.append(jnp.sum(d * hd, axis=-1))
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


# ---- the scale search -----------------------------------------------------------------


def output_error(weights: Sequence, rules: Sequence, hessian, s) -> jax.Array:
    """``Σ_j tr(ΔW_jᵀ H ΔW_j)`` with ``ΔW_j = W_j - diag(1/s) · Q_j(diag(s) · W_j)``.

    The mean squared output error ``E‖x W_j - (x / s) Q_j(diag(s) W_j)‖²`` over the
    calibration tokens, summed over the matmuls; ``Q_j`` is RTN with ``rules[j]``'s
    settings (format, groups, scale dtype, clip ratio, double quantization).

    Args:
      weights: float ``(K, N_j)`` Dense kernels sharing one input.
      rules: a (resolved) rule per weight.
      hessian: ``(K, K)`` ``E[x xᵀ]`` of the unscaled input.
      s: ``(K,)`` positive input-channel scales.
    """
    return _output_error(tuple(weights), hessian, s, _rtn_settings(rules))


def _rtn_settings(rules) -> tuple:
    """What RTN needs of each rule, hashable (a static argument of the jitted searches)."""
    return tuple((r.weight, r.group_size, r.per_tensor, r.jnp_scale_dtype, r.clip_ratio,
                  r.double_quant) for r in rules)  # fmt: skip


@partial(jax.jit, static_argnums=(3,))
def _output_error(weights, hessian, s, settings):
    h = jnp.asarray(hessian, jnp.float32)
    s = jnp.asarray(s, jnp.float32)
    total = jnp.float32(0.0)
    for w, (qtype, group_size, per_tensor, scale_dtype, clip_ratio, double_quant) in zip(
        weights, settings, strict=True
    ):
        w = jnp.asarray(w, jnp.float32)
        q = quantize_array(
            w * s[:, None], qtype, axis=0, group_size=group_size, per_tensor=per_tensor,
            scale_dtype=jnp.dtype(scale_dtype), clip_ratio=clip_ratio,
            double_quant=double_quant, name="awq",
        )  # fmt: skip
        delta = w - q.dequantize(jnp.float32) / s[:, None]
        total = total + jnp.sum(delta * jnp.dot(h, delta, precision=_HIGHEST))
    return total


def candidate_scales(mean_abs, alphas) -> jax.Array:
    """AutoAWQ's scales ``mean_abs**α / sqrt(max · min)`` for each ``α`` → ``(A, K)``.

    ``mean_abs`` is floored at ``1e-4`` of its largest entry (a dead channel would make
    the normalisation divide by zero), and all-zero statistics give ``s = 1``. ``α = 0``
    gives exactly 1.
    """
    m = jnp.asarray(mean_abs, jnp.float32)
    top = jnp.max(m)
    m = jnp.where(top > 0, jnp.maximum(m, top * jnp.float32(1e-4)), jnp.float32(1.0))
    s = jnp.power(m[None, :], jnp.asarray(alphas, jnp.float32)[:, None])
    return s / jnp.sqrt(jnp.max(s, axis=1, keepdims=True) * jnp.min(s, axis=1, keepdims=True))


def search_scales(
    weights: Sequence, rules: Sequence, calib, *, grid: int = 20,
    expand: Callable | None = None, reduce: Callable | None = None,
) -> jax.Array:  # fmt: skip
    """AWQ's input-channel scales for the matmuls ``weights`` sharing one input.

    For ``α`` in ``linspace(0, 1, grid)`` (``α = 0``, i.e. ``s = 1``, first), scores
    ``s = mean|x|**α`` (see `candidate_scales`) by `output_error`, the layers' output
    error computed from the Hessian (``E‖x ΔW‖² = tr(ΔWᵀ H ΔW)``), and returns the best.
    Ties keep the smaller ``α``, so the result is never worse than RTN on this loss.

    Args:
      weights: float ``(K, N_j)`` Dense kernels (contraction axis 0).
      rules: the resolved rule quantizing each weight (RTN with its settings is the ``Q``).
      calib: `jquant.calib.stats.Calibration` of the shared input (K channels).
      grid: number of ``α`` values.
      expand: optional map of a reduced scale vector ``(R,)`` onto the ``K`` input
        channels (e.g. `expand_kv_scales`: one scale per ``v_proj`` output channel,
        repeated for each query head of its group); the search is then over reduced
        vectors. Must come with ``reduce``.
      reduce: the map of a ``(K,)`` statistic to ``(R,)`` (the mean over the copies of
        each reduced channel, e.g. `reduce_kv_channels`); ``mean_abs`` is reduced by it.

    Returns:
      float32 ``s``: ``(K,)``, or ``(R,)`` with ``expand`` (the caller folds ``s`` into
      the producer and ``expand(s)`` into the weights). Fold as ``x' = x / s``,
      ``W' = diag(s) · W``.

    >>> from jquant.calib.stats import from_inputs
    >>> from jquant.recipe import Rule
    >>> rule = Rule(pattern="w", weight="int4").resolve("w", 2)
    >>> search_scales([jnp.ones((8, 4))], [rule], from_inputs(jnp.ones((3, 8))), grid=1)
    Array([1., 1., 1., 1., 1., 1., 1., 1.], dtype=float32)
    """
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"search_scales: grid={grid!r} must be a positive integer")
    if (expand is None) != (reduce is None):
        raise ValueError(
            "search_scales: expand and reduce go together (a scale map and the "
            "matching statistic map); give both or neither"
        )
    weights, rules = list(weights), list(rules)
    if not weights or len(weights) != len(rules):
        raise ValueError(
            f"search_scales: need one rule per weight and at least one weight; "
            f"got {len(weights)} weights and {len(rules)} rules"
        )
    for j, w in enumerate(weights):
        if w.ndim != 2 or w.shape[0] != calib.k:
            raise ValueError(
                f"search_scales: weights[{j}] has shape {tuple(w.shape)}; "
                f"the calibration input has K={calib.k} channels: (K, N) needed"
            )
    mean_abs = calib.mean_abs if reduce is None else reduce(calib.mean_abs)
    candidates = candidate_scales(mean_abs, jnp.linspace(0.0, 1.0, grid, dtype=jnp.float32))
    if expand is not None:
        shape = jax.eval_shape(expand, jax.ShapeDtypeStruct(mean_abs.shape, jnp.float32)).shape
        if shape != (calib.k,):
            raise ValueError(
                f"search_scales: expand maps a ({mean_abs.shape[0]},) scale to "
                f"{shape}; the weights need ({calib.k},)"
            )
    return _best(tuple(weights), calib.hessian, candidates, _rtn_settings(rules), expand)


@partial(jax.jit, static_argnums=(3, 4))
def _best(weights, hessian, candidates, settings, expand):
    def loss(s):
        return _output_error(weights, hessian, s if expand is None else expand(s), settings)

    return candidates[jnp.argmin(jax.lax.map(loss, candidates))]


def expand_kv_scales(s_kv, num_kv_heads: int, group: int, head_dim: int) -> jax.Array:
    """Scales over ``v_proj``'s output channels → over ``o_proj``'s input channels.

    Under grouped-query attention, ``o_proj``'s input channel ``c = h * head_dim + d`` holds
    channel ``(h // group) * head_dim + d`` of ``v_proj``'s output (query head ``h`` reads kv
    head ``h // group``).

    >>> expand_kv_scales(jnp.array([1.0, 2.0, 3.0, 4.0]), 2, 2, 2).tolist()
    [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
    """
    if s_kv.shape != (num_kv_heads * head_dim,):
        raise ValueError(
            f"expand_kv_scales: s_kv has shape {tuple(s_kv.shape)}; "
            f"num_kv_heads * head_dim = {num_kv_heads * head_dim} needed"
        )
    s = jnp.reshape(s_kv, (num_kv_heads, 1, head_dim))
    return jnp.broadcast_to(s, (num_kv_heads, group, head_dim)).reshape(-1)


def reduce_kv_channels(v, num_kv_heads: int, group: int, head_dim: int) -> jax.Array:
    """The mean over the query heads of each kv head: ``o_proj``'s input statistic
    ``(num_kv_heads * group * head_dim,)`` → ``(num_kv_heads * head_dim,)``."""
    v = jnp.reshape(jnp.asarray(v, jnp.float32), (num_kv_heads, group, head_dim))
    return jnp.mean(v, axis=1).reshape(-1)
