"""Scales and zero points: how a group's range becomes a grid, and codes on that grid.

Also the second level of double quantization (the scales stored as 8-bit log-domain codes),
and the scales of the block-scaled FP4 formats (mxfp4: E8M0 powers of two; nvfp4: E4M3
codes times a per-tensor float32 scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jquant import qtypes
from jquant._groups import apply_groups, group_reduce, per_group
from jquant.qtypes import QType

# Scales per block of a double-quantized scale array (QLoRA's block size), along N.
SCALE_BLOCK = 256
# MX: the shared exponent is floor(log2(amax)) minus the exponent of the element format's
# largest value (E2M1: 6 = 1.5 * 2**2), and E8M0 holds 2**-127 .. 2**127.
_E2M1_EMAX = 2
_E8M0_BIAS = 127
# NVFP4: the largest E4M3 block scale (448) times the largest E2M1 value (6) is what the
# per-tensor scale maps the tensor's absmax onto; an E4M3 block scale that rounds to 0 is
# used as 0.125 (compressed-tensors' guard against dividing by zero).
_E4M3_MAX = 448.0
_NVFP4_ZERO_BLOCK = 0.125


def _round_up_to(x, dtype):
    """Casts positive float32 ``x`` to ``dtype`` rounding up, so |w|/scale never exceeds
    the target and the half-step bound survives the cast."""
    y = x.astype(dtype)
    return jnp.where(y.astype(jnp.float32) < x, jnp.nextafter(y, jnp.asarray(jnp.inf, dtype)), y)


def compute_scale(
    w_t, qtype: str | QType, group_size: int | None, *, per_tensor: bool = False,
    clip_ratio=1.0, scale_dtype=jnp.bfloat16,
):  # fmt: skip
    """Scales (and zero points) for a weight in storage layout ``(..., K)``.

    Symmetric formats: ``scale = clip_ratio * absmax / target`` where target is
    the largest code magnitude (``qmax``, the fp8 max, or 1.0 for nf4).
    Asymmetric formats: the range ``[lo, hi]`` is the group's min/max extended to
    hold zero, then shrunk toward zero (``lo * clip_ratio``, ``hi * clip_ratio``, as
    AWQ and GPTQ do), so it still holds zero; ``scale = (hi - lo) / qmax`` and
    ``zero_point = clip(round(-lo / scale), 0, qmax)``, an integer stored in the
    scale dtype. All-zero groups get scale 1. ``clip_ratio`` may be an array
    broadcastable to the scale shape (searched clipping).

    Returns:
      ``(scale, zero_point)``; ``zero_point`` is None for symmetric formats. Both
      have shape ``(..., G)`` (all ones for per-tensor) and dtype ``scale_dtype``.
    """
    qt = qtypes.get(qtype)
    w_t = jnp.asarray(w_t, jnp.float32)
    ratio = jnp.asarray(clip_ratio, jnp.float32)

    def reduce(fn):
        if per_tensor:
            return fn(w_t).reshape((1,) * w_t.ndim)
        return group_reduce(w_t, group_size, fn)

    if qt.block_scale is not None:
        return _block_scale(w_t, qt, group_size, ratio, scale_dtype), None

    # Multiplying by the float32 reciprocal is what XLA makes of a division by a constant
    # inside jit; writing it out keeps eager and jitted scales (and QAT's) bit-identical.
    inv_target = jnp.float32(np.float32(1) / np.float32(qt.scale_target))
    if not qt.asymmetric:
        amax = reduce(lambda v, axis=None: jnp.max(jnp.abs(v), axis=axis)) * ratio
        scale = amax * inv_target
        scale = jnp.where(scale > 0, scale, jnp.float32(1.0))  # zero (or underflowing) groups
        return _round_up_to(scale, scale_dtype), None
    # The range always includes zero (as GPTQ's quantizer does), and clipping shrinks it
    # toward zero, so the integer zero point below lies in [0, qmax] and zero itself is
    # exactly representable.
    lo = jnp.minimum(reduce(lambda v, axis=None: jnp.min(v, axis=axis)), 0.0) * ratio
    hi = jnp.maximum(reduce(lambda v, axis=None: jnp.max(v, axis=axis)), 0.0) * ratio
    scale = hi * inv_target - lo * inv_target  # not (hi - lo): that overflows near ±3e38
    scale = jnp.where(scale > 0, scale, jnp.float32(1.0))  # zero or underflowing groups
    scale = _round_up_to(scale, scale_dtype)
    # An integer zero point, as GPTQ/AWQ checkpoints and kernels use: zero is then exactly
    # representable and the round trip w -> code -> w never depends on the zero point's dtype.
    zero_point = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), qt.qmin, qt.qmax)
    return scale, zero_point.astype(scale_dtype)


def _true_divide(a, b: float):
    """``a / b`` for a Python float ``b``, a true division inside ``jit`` too: XLA turns a
    division by a constant into a multiplication by its rounded reciprocal, which can differ
    in the last bit from the division NumPy and compressed-tensors do."""
    a, den = jax.lax.optimization_barrier((a, jnp.full_like(a, b)))
    return a / den


def _block_scale(w_t, qt: QType, group_size, ratio, scale_dtype):
    """The kept scales of a block-scaled format (see ``jquant.qtypes``), exact in
    ``scale_dtype`` (the format's own, or float32)."""
    if np.dtype(scale_dtype) not in (qt.scale_dtype, np.dtype(np.float32)):
        raise ValueError(f"{qt.name} fixes its scales ({qt.block_scale}); scale_dtype="
                         f"{np.dtype(scale_dtype).name} cannot hold them: use "
                         f"{qt.scale_dtype.name}")
    if qt.block_scale == "e8m0":
        amax = group_reduce(w_t, group_size, lambda v, axis: jnp.max(jnp.abs(v), axis=axis))
        return mx_scale(amax * ratio).astype(scale_dtype)
    codes, tensor_scale = nvfp4_scale_parts(w_t, group_size, ratio)
    return (codes.astype(jnp.float32) * tensor_scale).astype(scale_dtype)


def mx_scale(amax):
    """MX (OCP v1.0) block scales ``2**X`` as ``float8_e8m0fnu``, for block absmax ``amax``:
    ``X = floor(log2(amax)) - 2`` clamped to [-127, 127]; an all-zero block gets 1."""
    _, e = jnp.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2(amax)) = e - 1
    x = jnp.clip(e - 1 - _E2M1_EMAX, -_E8M0_BIAS, _E8M0_BIAS)
    x = jnp.where(amax > 0, x, 0)
    bits = (x + _E8M0_BIAS).astype(jnp.uint8)  # E8M0 is the biased exponent itself
    return jax.lax.bitcast_convert_type(bits, ml_dtypes.float8_e8m0fnu)


def nvfp4_scale_parts(w_t, group_size, ratio=1.0):
    """NVFP4's scales of ``w_t (..., K)`` as stored: ``(codes, tensor_scale)``.

    ``tensor_scale = amax(|w_t|) / (6 * 448)`` float32 of shape ``(1, ..., 1)`` (1 for an
    all-zero tensor); ``codes`` ``(..., G)`` float8_e4m3fn are ``amax_block * ratio / 6 /
    tensor_scale`` saturated to ±448 and rounded to nearest, a 0 replaced by 0.125. A
    block's kept scale is ``codes * tensor_scale`` (float32).
    """
    w_t = jnp.asarray(w_t, jnp.float32)
    amax = jnp.max(jnp.abs(w_t)).reshape((1,) * w_t.ndim)
    tensor_scale = _true_divide(amax, 6.0 * _E4M3_MAX)
    tensor_scale = jnp.where(tensor_scale > 0, tensor_scale, jnp.float32(1.0))
    block = group_reduce(w_t, group_size, lambda v, axis: jnp.max(jnp.abs(v), axis=axis))
    block = _true_divide(block * jnp.asarray(ratio, jnp.float32), 6.0) / tensor_scale
    codes = jnp.clip(block, -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn)
    zero = codes.astype(jnp.float32) == 0
    return jnp.where(zero, jnp.float8_e4m3fn(_NVFP4_ZERO_BLOCK), codes), tensor_scale


def encode_groups(w_t, scale, zero_point, qtype: str | QType, group_size: int | None):
    """Codes of ``w_t`` (..., K) under given group scales (..., G): the inverse of
    ``apply_groups``. Scales are used as stored (after their dtype cast)."""
    qt = qtypes.get(qtype)
    w_t = jnp.asarray(w_t, jnp.float32)
    s = scale.astype(jnp.float32)

    def divide(v, s):  # true division, as references do; a zero scale encodes zeros
        return jnp.where(s != 0, v / jnp.where(s != 0, s, 1.0), 0.0)

    if zero_point is None:
        scaled = per_group(w_t, group_size, divide, s)
    else:
        zp = zero_point.astype(jnp.float32)
        scaled = per_group(w_t, group_size, lambda v, s, z: divide(v, s) + z, s, zp)
    return qtypes.encode(qt, scaled)


def scale_range_problems(exact, stored):
    """(overflowed, underflowed) group counts of scales cast to ``stored.dtype``.

    ``exact`` are the float32 scales before the cast. A scale overflows when the cast
    makes it inf. It underflows when it is a normal float32 that the scale dtype rounds up
    by more than bfloat16 would (2^-7 relative): only float16 below ~7.6e-6, where its
    subnormals keep few bits and the rounded-up scale can flush a whole group to zero.
    """
    kept = stored.astype(jnp.float32)
    overflow = jnp.sum(~jnp.isfinite(kept))
    normal = exact >= jnp.finfo(jnp.float32).smallest_normal
    underflow = jnp.sum(normal & (kept - exact > exact * jnp.float32(2**-7)))
    return overflow, underflow


def double_quantize(scale):
    """Second-level quantization of positive scales ``(..., N, G)`` to ``log8`` codes.

    Codes live in the log2 domain, so precision is relative: blocks of ``SCALE_BLOCK``
    scales along N (the output axis) share a float32 step ``d = log2(max / min) / 255`` and
    a float32 offset ``z = -log2(min) / d``, and code ``q`` stands for ``2 ** ((q - z) * d)``:
    code 0 is (a hair above) the block's smallest scale and code 255 its largest. Codes round
    **up**, so every kept scale is ``>=`` the scale it replaces (like the scale dtype cast)
    and at most a factor ``2 ** d = (max / min) ** (1 / 255)`` above it: weights are never
    clipped by the second level, and a kept scale is never 0 (a power of two of a finite
    exponent). Scales below float32's smallest normal (~1.2e-38) are first raised to it.

    Returns:
      ``(codes, step, zero_point)`` in the storage layout of a ``log8`` QArray quantized
      along axis -2 with group size ``SCALE_BLOCK``: ``(..., G, N)`` uint8 and
      ``(..., G, B)`` float32 each.
    """
    tiny = jnp.finfo(jnp.float32).smallest_normal
    s_t = jnp.maximum(jnp.moveaxis(scale.astype(jnp.float32), -1, -2), tiny)  # (..., G, N)
    e = jnp.log2(s_t)
    lo = group_reduce(e, SCALE_BLOCK, jnp.min)
    hi = group_reduce(e, SCALE_BLOCK, jnp.max)
    # Raise both ends by a few float32 ulps of the exponent, so code 0 and code 255 land at
    # or above the block's smallest and largest scales despite rounding in log2, the step
    # and exp2 (a relative change of ~1e-6 per unit of |exponent|).
    lo = lo + jnp.maximum(jnp.abs(lo), 1.0) * jnp.float32(2**-20)
    hi = hi + jnp.maximum(jnp.abs(hi), 1.0) * jnp.float32(2**-18)
    # (times the float32 reciprocal of 255, which jit and eager evaluate alike); a block of
    # equal scales gets step 1 and code 0 (lo itself).
    step = jnp.where(hi > lo, (hi - lo) * jnp.float32(np.float32(1) / np.float32(255)), 1.0)
    zero_point = -lo / step
    t = per_group(e, SCALE_BLOCK, lambda v, lo, d: (v - lo) / d, lo, step)
    codes = jnp.clip(jnp.ceil(t - jnp.float32(2**-10)), 0, 255)
    # Ceil on a rounded quotient can land a hair low: bump to the next code where the
    # dequantized value (computed exactly as QArray.dequantize does) is below the scale.
    for _ in range(2):
        kept = dequantize_log8(codes, step, zero_point)
        codes = jnp.where((kept < s_t) & (codes < 255), codes + 1, codes)
    return codes.astype(jnp.uint8), step, zero_point


def dequantize_log8(codes, step, zero_point):
    """``2 ** ((codes - zero_point) * step)`` per block of ``SCALE_BLOCK`` along axis -1:
    the values of ``log8`` codes ``(..., N)`` with steps and offsets ``(..., B)``."""
    return jnp.exp2(apply_groups(codes.astype(jnp.float32), step, zero_point, SCALE_BLOCK))
