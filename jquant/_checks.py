"""Checks on what ``quantize_array`` is given: each names the tensor and the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant._act import check_format
from jquant.qtypes import QType


def validate_group_size(qtype: str | QType, group_size: int | None, *, name: str = "weight"):
    """Raises ValueError unless ``group_size`` is None or a positive multiple of the
    format's pack width; for a block-scaled format (mxfp4, nvfp4), unless it is the
    format's block size."""
    qt = qtypes.get(qtype)
    if qt.block_size is not None:
        if isinstance(group_size, bool) or group_size != qt.block_size:
            raise ValueError(
                f"{name}: group_size={group_size!r} is invalid for {qt.name}: its scales are "
                f"defined per block of {qt.block_size} elements, so group_size must be "
                f"{qt.block_size}"
            )
        return
    if group_size is None:
        return
    if (
        not isinstance(group_size, int | np.integer)
        or isinstance(group_size, bool)
        or group_size <= 0
        or group_size % qt.pack_width
    ):
        raise ValueError(
            f"{name}: group_size={group_size!r} is invalid for {qt.name}: it must be a "
            f"positive multiple of {qt.pack_width} (the codes packed per unit), or None "
            "for per-channel"
        )


@jax.jit
def nonfinite_stats(w):
    """(count, first flat index) of NaN/inf values in ``w``, as replicated scalars.

    A reduction on device: it works for sharded arrays that no one host holds whole.
    """
    bad = ~jnp.isfinite(w)
    return jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad.reshape(-1)).astype(jnp.int32)


def raise_nonfinite(count: int, first: int, shape, *, name: str):
    """The error for a weight holding ``count`` NaN/inf values, the first at flat ``first``."""
    if count:
        bad = [int(i) for i in np.unravel_index(first, tuple(shape))]
        raise ValueError(
            f"{name}: weight holds {count} NaN/inf values (first at index {bad}); fix the "
            "checkpoint before quantizing"
        )


def check_float_weight(w, *, name: str = "weight", values: bool = True):
    """Raises ValueError if ``w`` is abstract, not a float array or empty, or (``values``
    and concrete) holds NaN/inf. The value check is a reduction on device."""
    if isinstance(w, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{name}: is abstract (a ShapeDtypeStruct) and holds no values to quantize; "
            "to size a quantized tree without data, run jax.eval_shape(lambda p: "
            "jquant.quantize(p, recipe), params)"
        )
    dtype = np.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: only float weights can be quantized, got dtype {dtype.name}")
    if 0 in tuple(w.shape):
        raise ValueError(
            f"{name}: cannot quantize an empty weight of shape {tuple(w.shape)}; skip it "
            "in the recipe (skip: true) or drop the parameter"
        )
    if values and not isinstance(w, jax.core.Tracer):
        count, first = jax.device_get(nonfinite_stats(w))
        raise_nonfinite(int(count), int(first), w.shape, name=name)


def raise_scale_range(overflow: int, underflow: int, scale_dtype, *, name: str):
    """The error for scales that ``scale_dtype`` cannot hold (see ``scale_range_problems``)."""
    dtype = np.dtype(scale_dtype).name
    if overflow:
        raise ValueError(
            f"{name}: {overflow} scale(s) overflow {dtype} (largest finite "
            f"{float(jnp.finfo(scale_dtype).max):.4g}): the weights are too large for "
            f"{dtype} scales; use scale_dtype float32 or bfloat16"
        )
    if underflow:
        raise ValueError(
            f"{name}: {underflow} scale(s) underflow {dtype} (below its smallest normal "
            f"{float(jnp.finfo(scale_dtype).smallest_normal):.3g} it rounds them up by more "
            "than bfloat16 would, up to zeroing whole groups): the weights are too small for "
            f"{dtype} scales; use scale_dtype float32 or bfloat16"
        )


def check_activation(activation: str | None, *, name: str):
    """Raises ValueError (naming the tensor) unless ``activation`` is None or an
    activation format of ``jquant._act``."""
    if activation is None:
        return
    try:
        check_format(activation)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
