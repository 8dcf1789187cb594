"""Group-wise computation along the contraction axis (K last): map, reduce, dequantize.

The geometry itself (which elements form a group, the short last group) is
``jquant.kernels._formats.group_runs``, shared with the kernels.
"""

from __future__ import annotations

import jax.numpy as jnp

from jquant.kernels._formats import group_runs


def per_group(values, group_size, fn, *group_arrays):
    """Applies ``fn(block, *per_group)`` group by group.

    ``values`` is (..., K); each of ``group_arrays`` is (..., G) or (..., 1) (one
    value for every group) and reaches ``fn`` as (..., count, 1) against blocks of
    (..., count, length). Reshapes rather than repeats, so XLA fuses the broadcast.
    """
    k = values.shape[-1]
    pieces = []
    gi = 0
    for start, length, count in group_runs(k, group_size):
        v = values[..., start : start + length * count]
        v = v.reshape(*v.shape[:-1], count, length)
        per = [a[..., :1, None] if a.shape[-1] == 1 else a[..., gi : gi + count, None]
               for a in group_arrays]
        out = fn(v, *per)
        pieces.append(out.reshape(*out.shape[:-2], count * length))
        gi += count
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def apply_groups(values, scale, zero_point, group_size):
    """The dequantization identity: ``(values - zero_point) * scale`` per group."""
    if zero_point is None:
        return per_group(values, group_size, lambda v, s: v * s, scale)
    return per_group(values, group_size, lambda v, s, z: (v - z) * s, scale, zero_point)


def group_reduce(x, group_size, fn):
    """Reduces each group of x (..., K) with fn(block, axis=-1) → (..., G)."""
    k = x.shape[-1]
    outs = []
    for start, length, count in group_runs(k, group_size):
        v = x[..., start : start + length * count].reshape(*x.shape[:-1], count, length)
        outs.append(fn(v, axis=-1))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
