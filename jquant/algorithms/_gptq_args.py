"""GPTQ's ``algorithm_args`` (defaults, validation) and the host-side check of a run's
``info`` (`check_info`): what `jquant.algorithms.gptq` registers beside the algorithm."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant._checks import raise_scale_range
from jquant.algorithms.rtn import clip_search_settings

DEFAULTS = {
    "damp": 0.01,  # dampening, relative to the mean of diag(H)
    "block_size": 128,  # rows per lazy-batch block
    "act_order": True,  # process rows by descending H_kk
    "static_groups": True,  # every group's scale from the original weight, up front
    "mse": False,  # clip-ratio search per group (as rtn's clip_search: true or a mapping)
    "awq": False,  # AWQ scaling, applied by the calibration driver before gptq runs
    "refit": False,  # after rounding, each group's scale (and zero point) by least squares
}
# The largest relative dampening tried when H is not positive definite: H is then nearly
# diagonal and GPTQ is close to RTN; an H that still does not factor is corrupt.
MAX_DAMP = 10.0
AWQ_KEYS = ("grid", "clip")
# info key prefix of the scale range counts [overflowed, underflowed]; the scale dtype follows.
SCALE_RANGE = "scale_range_"


def check_args(args: Mapping[str, Any]) -> None:
    """Validates gptq's ``algorithm_args`` (see :data:`DEFAULTS`); ValueError names the key."""
    unknown = [k for k in args if k not in DEFAULTS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
    settings(args)


def settings(args: Mapping[str, Any]) -> dict[str, Any]:
    """``algorithm_args`` with defaults filled in and ``mse`` as ``(grid, max_shrink)`` or None.

    >>> settings({"act_order": False})["static_groups"]
    True
    """
    s = {**DEFAULTS, **args}
    damp = s["damp"]
    if not _is_number(damp) or not 0 < damp <= MAX_DAMP:
        raise ValueError(
            f"damp={damp!r} must be a number in (0, {MAX_DAMP:g}] (relative to "
            "the mean diagonal of the Hessian)"
        )
    block = s["block_size"]
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block_size={block!r} must be a positive integer")
    for key in ("act_order", "static_groups", "refit"):
        if not isinstance(s[key], bool):
            raise ValueError(f"{key} must be true or false, got {s[key]!r}")
    if s["act_order"] and not s["static_groups"]:
        raise ValueError(
            "act_order: true needs static_groups: true: with groups computed "
            "in act order, a row's group is not its position, and jquant's "
            "formats store no reorder (g_idx) for inference; set static_groups: "
            "true or act_order: false"
        )
    try:
        mse = clip_search_settings(s["mse"])
    except ValueError as e:  # rtn names its key clip_search; here the key is mse
        raise ValueError(str(e).replace("clip_search", "mse")) from None
    s["mse"] = None if mse is None else (mse["grid"], mse["max_shrink"])
    _check_awq(s["awq"])
    return s


def _check_awq(value) -> None:
    if isinstance(value, bool):
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"awq must be true/false or a mapping, got {value!r}")
    unknown = [k for k in value if k not in AWQ_KEYS]
    if unknown:
        raise ValueError(f"awq: unknown key(s) {unknown}; allowed: {', '.join(AWQ_KEYS)}")
    grid = value.get("grid", 1)
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise ValueError(f"awq: grid={grid!r} must be a positive integer")
    if not isinstance(value.get("clip", False), bool):
        raise ValueError(f"awq: clip={value['clip']!r} must be true or false")


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def check_info(path: str, info: Mapping[str, Any]) -> None:
    """Host-side report on a gptq run: warns if the dampening was raised, raises ValueError
    if the Hessian did not factor at all, or if the weight holds NaN/inf or its scales do
    not fit the scale dtype."""
    nonfinite = info.get("nonfinite")
    if nonfinite is not None and int(np.asarray(nonfinite)[0]):
        count, row, col = (int(v) for v in np.asarray(nonfinite))
        raise ValueError(
            f"{path}: weight holds {count} NaN/inf values (first at index [{row}, {col}]); "
            "fix the checkpoint before quantizing"
        )
    for key, counts in info.items():
        if key.startswith(SCALE_RANGE):
            overflow, underflow = (int(v) for v in np.asarray(counts))
            raise_scale_range(overflow, underflow, jnp.dtype(key[len(SCALE_RANGE) :]), name=path)
    damp, requested = float(info["damp"]), float(info.get("damp_requested", DEFAULTS["damp"]))
    if not bool(info["factored"]):
        raise ValueError(
            f"{path}: GPTQ could not factor the Hessian even at damp={damp:g} (relative to "
            "its mean diagonal): it holds NaN/inf or is far from positive semidefinite. Check "
            "this layer's calibration inputs (NaN/inf activations?), or quantize it with "
            "algorithm: rtn"
        )
    if damp > requested * (1 + 1e-4):
        warnings.warn(
            f"{path}: GPTQ Hessian not positive definite at damp={requested:g}; raised to {damp:g}",
            stacklevel=2,
        )
