"""Fake quantization of one weight: the exact PTQ numerics forward, straight-through backward.

For a weight ``w`` quantized along ``axis`` in groups, with scales ``s`` and zero points
``z`` (asymmetric formats), the forward pass is what ``quantize_array`` followed by
``QArray.dequantize`` computes, operation for operation::

    v  = w / s + z                       # per group, s and z as stored (scale dtype)
    q  = decode(encode(v))               # round / saturate / nearest codebook entry
    fq = (q - z) * s

so the integer codes the forward pass uses are the codes ``convert`` stores. The
backward pass replaces ``decode(encode(v))`` by ``v`` inside the format's range (the
straight-through estimator); with ``ste="clipped"`` (the default) its derivative is 0
where ``v`` saturates, which is the exact derivative of the clamp. The chain rule through
``w / s`` and ``* s`` then gives LSQ's gradients for learned scales and zero points::

    dfq/dw = 1[v in range]
    dfq/ds = q - z - (w / s) * 1[v in range]
    dfq/dz = -s * 1[v not in range]

Scales (and zero points) are cast to the rule's ``scale_dtype`` in the forward pass, as
``quantize_array`` stores them, with an identity derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant._groups import apply_groups, per_group
from jquant._scales import compute_scale
from jquant.qarray import double_quantized_scale

# Forward floor of learned scales: a scale driven to zero or below by the optimizer is used
# as this value (see ``jquant.qat.convert``, which refuses such a state).
SCALE_FLOOR = 1e-12
STE_MODES = ("clipped", "identity")


def code_range(qtype: str) -> tuple[float, float]:
    """``[lo, hi]``: the decoded values a format can hold (its straight-through range)."""
    qt = qtypes.get(qtype)
    if qt.kind == "codebook":
        return float(qt.codebook[0]), float(qt.codebook[-1])
    return float(qt.qmin), float(qt.qmax)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def round_ste(v, qtype: str, ste: str = "clipped"):
    """``decode(encode(v))``, differentiated as the identity (inside the range if clipped).

    >>> round_ste(jnp.array([0.4, 9.0]), "int4").tolist()
    [0.0, 7.0]
    >>> jax.grad(lambda v: round_ste(v, "int4").sum())(jnp.array([0.4, 9.0])).tolist()
    [1.0, 0.0]
    """
    return qtypes.decode(qtype, qtypes.encode(qtype, v))


@round_ste.defjvp
def _round_ste_jvp(qtype, ste, primals, tangents):
    (v,), (t,) = primals, tangents
    y = round_ste(v, qtype, ste)
    if ste == "clipped":
        lo, hi = code_range(qtype)
        t = jnp.where((v >= lo) & (v <= hi), t, jnp.zeros_like(t))
    return y, t


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def cast_ste(x, dtype):
    """``x`` rounded through ``dtype`` and back to float32, with an identity derivative."""
    return x.astype(dtype).astype(jnp.float32)


@cast_ste.defjvp
def _cast_ste_jvp(dtype, primals, tangents):
    (x,), (t,) = primals, tangents
    return cast_ste(x, dtype), t


@jax.custom_jvp
def double_quant_ste(s):
    """Scales ``(..., N, G)`` through double quantization's second level (log8 blocks),
    with an identity derivative."""
    return double_quantized_scale(s).dequantize(jnp.float32)


@double_quant_ste.defjvp
def _double_quant_ste_jvp(primals, tangents):
    (s,), (t,) = primals, tangents
    return double_quant_ste(s), t


def _divide(v, s):  # as encode_groups divides: a zero scale encodes zeros
    return jnp.where(s != 0, v / jnp.where(s != 0, s, 1.0), 0.0)


def scaled(w_t, s, z, group_size):
    """``w / s + z`` group by group (``z`` None: symmetric), in storage layout (K last)."""
    if z is None:
        return per_group(w_t, group_size, _divide, s)
    return per_group(w_t, group_size, lambda v, s, z: _divide(v, s) + z, s, z)


def stored_scales(rule, scale, zero_point):
    """Learned float32 scales and zero points as the QArray would store them: floored,
    cast to the scale dtype (identity derivative); returns ``(s_used, s_stored, z)``, where
    ``s_used`` is what encoding and decoding use (second-level dequantized if double_quant).
    """
    s = jnp.maximum(scale, jnp.float32(SCALE_FLOOR))
    s = cast_ste(s, rule.jnp_scale_dtype)
    s_stored = s
    if rule.double_quant:
        s = double_quant_ste(s)
    z = None if zero_point is None else cast_ste(zero_point, rule.jnp_scale_dtype)
    return s, s_stored, z


def dynamic_scales(rule, w_t):
    """The scales ``quantize_array`` computes for ``w_t`` (no gradient flows through them):
    ``(s_used, z)`` in float32, after the dtype cast (and the second level)."""
    w_t = jax.lax.stop_gradient(w_t)
    scale, zp = compute_scale(w_t, rule.weight, rule.group_size, per_tensor=rule.per_tensor,
                              clip_ratio=rule.clip_ratio, scale_dtype=rule.jnp_scale_dtype)
    s = (double_quantized_scale(scale).dequantize(jnp.float32) if rule.double_quant
         else scale.astype(jnp.float32))  # fmt: skip
    return s, None if zp is None else zp.astype(jnp.float32)


def fake_quant_stored(w_t, rule, s, z, *, ste: str = "clipped"):
    """``(fq, v)``: the fake-quantized weight in storage layout and the scaled values ``v``."""
    group = None if rule.per_tensor else rule.group_size
    v = scaled(w_t, s, z, group)
    q = round_ste(v, rule.format.name, ste)
    return apply_groups(q, s, z, group), v


def fake_quantize_leaf(w, rule, learned=None, *, ste: str = "clipped"):
    """The fake-quantized ``w`` (same shape and dtype) under a resolved ``rule``.

    Args:
      w: float weight; ``rule.axis`` is its contraction axis.
      rule: a resolved `jquant.Rule` (``rule.resolve(path, ndim)``).
      learned: None (scales recomputed from ``w`` each call, as PTQ's RTN would), or a
        mapping with ``"scale"`` (and ``"zero_point"`` for asymmetric formats) in the
        QArray's scale shape ``(*other_axes, G)``, float32.
      ste: ``"clipped"`` or ``"identity"`` (see the module docstring).
    """
    w_t = jnp.moveaxis(jnp.asarray(w).astype(jnp.float32), rule.axis, -1)
    if learned is None:
        s, z = dynamic_scales(rule, w_t)
    else:
        s, _, z = stored_scales(rule, learned["scale"], learned.get("zero_point"))
    fq, _ = fake_quant_stored(w_t, rule, s, z, ste=ste)
    return jnp.moveaxis(fq, -1, rule.axis).astype(np.dtype(w.dtype))
