"""Round-to-nearest (RTN), optionally with a per-group search for the clip ratio.

Plain RTN scales each group by its absmax (or min/max for ``uint*``) times the
rule's ``clip_ratio`` and rounds every weight to the nearest code.

Searched clipping (``algorithm_args: {clip_search: {grid: 20, max_shrink: 0.2}}``)
tries the ratios ``clip_ratio * (1 - max_shrink * i / grid)`` for ``i = 0..grid``
in every group at once and keeps, per group, the ratio with the smallest squared
reconstruction error ``sum((w - dequant(w))**2)`` over the group (ties keep the
larger ratio). ``i = 0`` is the plain ratio, so the search never does worse than
plain RTN on that measure. The error is measured with the scales as stored
(``scale_dtype``), before any double quantization of the scales.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jquant import qtypes
from jquant.algorithms import register
from jquant.qarray import (
    QArray,
    _apply_groups,
    _group_reduce,
    check_float_weight,
    compute_scale,
    encode_groups,
    quantize_array,
)

CLIP_SEARCH_DEFAULTS = {"grid": 20, "max_shrink": 0.2}


def check_args(args: Mapping[str, Any]) -> None:
    """Validates rtn's ``algorithm_args``: only ``clip_search`` (true, or a mapping)."""
    unknown = [k for k in args if k != "clip_search"]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: clip_search")
    if "clip_search" in args:
        clip_search_settings(args["clip_search"])


def clip_search_settings(value) -> dict[str, Any] | None:
    """``clip_search`` as given in a recipe → ``{"grid", "max_shrink"}`` or None (off)."""
    if value is None or value is False:
        return None
    if value is True:
        return dict(CLIP_SEARCH_DEFAULTS)
    if not isinstance(value, Mapping):
        raise ValueError(f"clip_search must be true/false or a mapping, got {value!r}")
    unknown = [k for k in value if k not in CLIP_SEARCH_DEFAULTS]
    if unknown:
        raise ValueError(f"clip_search: unknown key(s) {unknown}; allowed: grid, max_shrink")
    out = {**CLIP_SEARCH_DEFAULTS, **value}
    grid, shrink = out["grid"], out["max_shrink"]
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"clip_search: grid={grid!r} must be a positive integer")
    if not isinstance(shrink, int | float) or isinstance(shrink, bool) or not 0 <= shrink < 1:
        raise ValueError(f"clip_search: max_shrink={shrink!r} must be in [0, 1)")
    return {"grid": grid, "max_shrink": float(shrink)}


@register("rtn", check_args=check_args)
def rtn(weight, rule, *, path: str, calibration=None) -> QArray:
    """Round-to-nearest with the rule's settings (``calibration`` is ignored).

    >>> from jquant.recipe import Rule
    >>> rule = Rule(pattern="w", weight="int4", group_size=64).resolve("w", 2)
    >>> rtn(jnp.ones((128, 4)), rule, path="w").qtype
    'int4'
    """
    del calibration
    # Dtype and shape before the search; NaN/inf are counted on device by quantize_array.
    check_float_weight(weight, name=path, values=False)
    clip_ratio = rule.clip_ratio
    search = clip_search_settings(rule.algorithm_args.get("clip_search"))
    if search is not None:
        clip_ratio = search_clip_ratios(
            weight, rule.weight, axis=rule.axis, group_size=rule.group_size,
            per_tensor=rule.per_tensor, scale_dtype=rule.jnp_scale_dtype,
            clip_ratio=rule.clip_ratio, **search,
        )  # fmt: skip
    return quantize_array(
        weight, rule.weight, axis=rule.axis, group_size=rule.group_size,
        per_tensor=rule.per_tensor, scale_dtype=rule.jnp_scale_dtype, clip_ratio=clip_ratio,
        double_quant=rule.double_quant, activation=rule.activation, name=path,
    )  # fmt: skip


def search_clip_ratios(
    weight, qtype: str, *, axis: int, group_size: int | None, per_tensor: bool = False,
    scale_dtype=jnp.bfloat16, clip_ratio: float = 1.0, grid: int = 20, max_shrink: float = 0.2,
) -> jax.Array:  # fmt: skip
    """Per-group clip ratios minimizing each group's squared RTN error.

    Args:
      weight: float array; ``axis`` is its contraction axis.
      qtype, group_size, per_tensor, scale_dtype: as for ``quantize_array``.
      clip_ratio: the largest ratio tried (the rule's plain ratio).
      grid: number of shrink steps; ``grid + 1`` ratios are tried.
      max_shrink: the smallest ratio tried is ``clip_ratio * (1 - max_shrink)``.

    Returns:
      float32 ratios of the scale's shape ``(*other_axes, G)``, ready for
      ``quantize_array(..., clip_ratio=...)``.

    >>> search_clip_ratios(jnp.ones((8, 2)), "int4", axis=0, group_size=None).shape
    (2, 1)
    """
    w_t = jnp.moveaxis(jnp.asarray(weight, jnp.float32), axis, -1)
    steps = jnp.arange(grid + 1, dtype=jnp.float32) / jnp.float32(grid)
    ratios = jnp.float32(clip_ratio) * (jnp.float32(1.0) - jnp.float32(max_shrink) * steps)
    return _search(w_t, ratios, qtypes.get(qtype).name, group_size, per_tensor,
                   jnp.dtype(scale_dtype))


@partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _search(w_t, ratios, qtype, group_size, per_tensor, scale_dtype):
    errors = jax.lax.map(
        lambda r: group_sq_error(w_t, qtype, group_size, per_tensor, scale_dtype, r), ratios
    )  # (R, ..., G)
    best = jnp.argmin(errors, axis=0)  # first minimum: the largest ratio among ties
    return ratios[best]


def group_sq_error(w_t, qtype, group_size, per_tensor, scale_dtype, clip_ratio):
    """Squared RTN error per scale group of ``w_t`` (storage layout, K last) → (..., G)."""
    scale, zero_point = compute_scale(
        w_t, qtype, group_size, per_tensor=per_tensor, clip_ratio=clip_ratio,
        scale_dtype=scale_dtype,
    )  # fmt: skip
    gs = None if per_tensor else group_size
    codes = encode_groups(w_t, scale, zero_point, qtype, gs)
    zp = None if zero_point is None else zero_point.astype(jnp.float32)
    deq = _apply_groups(qtypes.decode(qtype, codes), scale.astype(jnp.float32), zp, gs)
    sq = jnp.square(w_t - deq)
    if per_tensor:
        return jnp.sum(sq).reshape(scale.shape)
    return _group_reduce(sq, group_size, jnp.sum)
