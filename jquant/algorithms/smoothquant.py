"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, for W8A8.

A few input channels of an LLM's matmuls carry activations far larger than the rest, so
per-token activation quantization (one scale per token, set by its largest channel)
wastes most of its levels on them. SmoothQuant divides each input channel by

    s_k = max|x_k|**α / max_{j,n} |W_j[k, n]|**(1 - α)

and multiplies the matching weight rows by it (``x' = x / s``, ``W' = diag(s) · W``, so
``x' W' = x W``): the activation range is flattened at the cost of a wider weight range,
``α`` (0.5 by default) setting the balance. The max runs over every matmul ``W_j`` that
reads the same input (q/k/v, gate/up).

`smooth_scales` computes ``s`` (the calibration driver folds ``1 / s`` into the op that
produces ``x``, an RMSNorm); the registered ``smoothquant`` algorithm then quantizes the
folded weight by RTN. It exists so that a recipe says which weights are smoothed: it
requires calibration (without it nothing was folded) and an activation format (smoothing
only helps when the activations are quantized too).

Recipe settings: ``algorithm: smoothquant``, ``activation: int8`` (or ``fp8_*``),
``algorithm_args: {alpha: 0.5}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jquant.algorithms import register
from jquant.algorithms.awq import require_calibration
from jquant.qarray import QArray, check_float_weight, quantize_array

DEFAULTS = {"alpha": 0.5}
# SmoothQuant's floor for the weight maxima and the scales (its reference code's clamp).
FLOOR = 1e-5


def check_args(args: Mapping[str, Any]) -> None:
    """Validates smoothquant's ``algorithm_args``: only ``alpha``, a number in [0, 1]."""
    unknown = [k for k in args if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    if "alpha" in args:
        _check_alpha(args["alpha"])


def _check_alpha(alpha):
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1]")


@register("smoothquant", check_args=check_args)
def smoothquant(weight, rule, *, path: str, calibration=None) -> QArray:
    """RTN of a weight whose smoothing scales the driver has already folded in.

    Raises:
      ValueError: naming ``path``, when the rule has no ``activation`` (weight-only
        recipes gain nothing from smoothing) or when no calibration was given.
    """
    check_float_weight(weight, name=path, values=False)
    if rule.activation is None:
        raise ValueError(
            f"{path}: smoothquant is for W8A8 recipes: it balances quantized activations "
            "against weights, and this rule quantizes no activations; set activation: int8 "
            "(or fp8_e4m3) in the rule, or use rtn/awq for weight-only quantization"
        )
    require_calibration(calibration, weight, path=path, algorithm="smoothquant")
    return quantize_array(
        weight, rule.weight, axis=rule.axis, group_size=rule.group_size,
        per_tensor=rule.per_tensor, scale_dtype=rule.jnp_scale_dtype,
        clip_ratio=rule.clip_ratio, double_quant=rule.double_quant,
        activation=rule.activation, name=path,
    )  # fmt: skip


def smooth_scales(weights: Sequence, calib, *, alpha: float = 0.5) -> jax.Array:
    """SmoothQuant's input-channel scales ``s (K,)`` for the matmuls sharing one input.

    ``s_k = max|x_k|**α / max(w_k, 1e-5)**(1 - α)``, floored at ``1e-5``, with ``w_k`` the
    largest ``|W_j[k, n]|`` over every weight and output channel (SmoothQuant's reference
    code). A channel whose activations or weight rows are all zero gets ``s_k = 1``: there
    is nothing to balance.

    Args:
      weights: float ``(K, N_j)`` Dense kernels (contraction axis 0).
      calib: `jquant.calib.stats.Calibration` of the shared input (``max_abs`` is used).
      alpha: migration strength in [0, 1]: 0 leaves the activations' range alone
        (``s = 1 / w``), 1 moves it wholly into the weights (``s = max|x|``).

    Returns:
      float32 ``s``; fold as ``x' = x / s``, ``W' = diag(s) · W``.

    >>> from jquant.calib.stats import from_inputs
    >>> calib = from_inputs(jnp.array([[4.0, 0.0]]))
    >>> smooth_scales([jnp.array([[1.0], [1.0]])], calib).tolist()
    [2.0, 1.0]
    """
    if not isinstance(alpha, jax.Array):
        _check_alpha(alpha)
    weights = list(weights)
    if not weights:
        raise ValueError("smooth_scales: need at least one weight")
    for j, w in enumerate(weights):
        if w.ndim != 2 or w.shape[0] != calib.k:
            raise ValueError(
                f"smooth_scales: weights[{j}] has shape {tuple(w.shape)}; the "
                f"calibration input has K={calib.k} channels: (K, N) needed"
            )
    w_max = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1)
                               for w in weights]), axis=0)  # fmt: skip
    a_max = jnp.asarray(calib.max_abs, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    floor = jnp.float32(FLOOR)
    s = jnp.power(a_max, alpha) / jnp.power(jnp.maximum(w_max, floor), 1.0 - alpha)
    return jnp.where((a_max > 0) & (w_max > 0), jnp.maximum(s, floor), jnp.float32(1.0))
