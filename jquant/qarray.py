"""QArray: a packed quantized tensor, and the functions that make and unmake it.

Terminology
-----------
* **contraction axis** (``axis``): the axis of the logical weight that a matmul
  sums over (``K`` of a Dense kernel of shape ``(K, N)``). Scales vary along it
  only group by group.
* **group**: ``group_size`` consecutive elements along the contraction axis that
  share one scale (and zero point). ``group_size=None`` means one group spanning
  the whole axis (per-channel); a per-tensor QArray has one group and a scale
  that is broadcast over every other axis too.
* **short last group**: when ``group_size`` does not divide ``K``, groups
  ``0..G-2`` hold ``group_size`` elements and the last one holds ``K % group_size``;
  its scale is computed from those elements alone (no padding enters the
  statistics). ``G = ceil(K / group_size)``.

Storage layout (a contract for kernels and checkpoints)
-------------------------------------------------------
``qvalue`` holds the codes with the contraction axis moved **last**: a ``(K, N)``
Dense kernel is stored as ``(N, Kbytes)``. ``scale`` and ``zero_point`` have shape
``(*other_axes, G)`` (all ones for per-tensor). Keeping K contiguous is what lets a
row of weights (one output channel) stream through a CPU, GPU or TPU kernel.

Sub-byte codes are packed **per group, in slices**: a group of ``L`` codes (``L``
padded with zero codes up to a multiple of the pack width, which only an odd short
last group ever needs) is split into ``8 // bits`` equal slices, and byte ``j`` of
the group holds element ``j + i * L * bits / 8`` of the group in bits
``[i * bits, (i + 1) * bits)``. For 4-bit formats: byte ``j`` holds element ``j``
in the low nibble and element ``j + L/2`` in the high nibble, so unpacking a
block of whole groups is ``concat([b & 0xF, b >> 4])`` with no interleaving.
3-bit codes are stored as a 2-bit plane (``L/4`` bytes, as above) followed by a
1-bit plane of the high bits (``L/8`` bytes), per group. Signed codes are stored
in two's complement within their bits. Groups are concatenated along the last
axis. This order is the same on every platform and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant.qtypes import QType


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _nbytes_of(x) -> int:
    if x is None:
        return 0
    if isinstance(x, QArray):
        return x.nbytes
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized tensor: packed codes, scales and optional zero points.

    The dequantization identity, per group ``g`` of the contraction axis::

        w ≈ (decode(q) - zero_point[g]) * scale[g]

    where ``decode`` is the identity for integer formats, a float8 → float cast
    for fp8 and a table lookup for codebook formats (nf4); ``zero_point`` is
    present only for asymmetric (``uint*``) formats; ``quantize_array`` makes it an
    integer (stored in the scale dtype), while ``from_codes`` accepts any float.

    ``scale`` may itself be a QArray (double quantization, as in QLoRA).
    Instances are pytrees: ``qvalue``, ``scale`` and ``zero_point`` are leaves and
    every other field is static, so QArrays pass through ``jit``, ``vmap`` (over
    axes before the contraction axis), ``scan`` and ``device_put``.

    Attributes:
      qvalue: codes in the storage layout of the module docstring.
      scale: per-group scales, shape ``(*other_axes, G)``.
      zero_point: per-group zero points (asymmetric formats) or None.
      qtype: the format's name (see ``jquant.qtypes``).
      k: logical length of the contraction axis.
      axis: the contraction axis of the logical tensor, counted from the end (< 0).
      group_size: elements per group along the axis, or None for one group.
      dtype: dtype that ``dequantize()`` returns by default (the original's).
      activation: format that ``jquant.ops`` quantizes the activations into before
        a matmul with this weight (dynamic, per token: W8A8-style recipes), or None.
    """

    qvalue: jax.Array
    scale: Any
    zero_point: jax.Array | None
    qtype: str = dataclasses.field(metadata=dict(static=True), default="int8")
    k: int = dataclasses.field(metadata=dict(static=True), default=0)
    axis: int = dataclasses.field(metadata=dict(static=True), default=-2)
    group_size: int | None = dataclasses.field(metadata=dict(static=True), default=None)
    dtype: Any = dataclasses.field(metadata=dict(static=True), default=np.dtype(np.float32))
    activation: str | None = dataclasses.field(metadata=dict(static=True), default=None)

    # ---- shape and size ----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape."""
        rest = _shape_of(self.qvalue)[:-1]
        pos = len(rest) + 1 + self.axis
        return (*rest[:pos], self.k, *rest[pos:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def format(self) -> QType:
        return qtypes.get(self.qtype)

    @property
    def num_groups(self) -> int:
        return _num_groups(self.k, self.group_size)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes + scales (+ zero points)."""
        return _nbytes_of(self.qvalue) + _nbytes_of(self.scale) + _nbytes_of(self.zero_point)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per logical element, scales and zero points included."""
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        if self.scale is not None and math.prod(_shape_of(self.scale)) == 1:
            g = "tensor"
        return (
            f"QArray({self.qtype}, shape={self.shape}, axis={self.axis}, {g}, "
            f"{self.bits_per_weight:.3f} bits/weight, dtype={np.dtype(self.dtype).name})"
        )

    # ---- unmaking ----------------------------------------------------------------

    def codes(self) -> jax.Array:
        """Unpacked codes in the storage layout ``(*other_axes, K)``."""
        return unpack(self.qvalue, self.qtype, self.k, self.group_size)

    def scales(self) -> jax.Array:
        """The scales as a float32 array (dequantized if double-quantized)."""
        s = self.scale
        return (s.dequantize(jnp.float32) if isinstance(s, QArray) else s).astype(jnp.float32)

    def dequantize_stored(self, dtype=None) -> jax.Array:
        """Dequantized values in the storage layout ``(*other_axes, K)`` (K last).

        This is what matmuls want: contracting the last axis needs no transpose.
        """
        values = qtypes.decode(self.qtype, self.codes())
        zp = None if self.zero_point is None else self.zero_point.astype(jnp.float32)
        out = _apply_groups(values, self.scales(), zp, self.group_size)
        return out.astype(dtype or self.dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """The dequantized tensor in its logical shape (``dtype`` defaults to the original)."""
        return jnp.moveaxis(self.dequantize_stored(dtype), -1, self.axis)

    def __jax_array__(self):
        raise TypeError(
            "a QArray is not an array: call .dequantize(), or pass it to jquant.ops "
            "(qdot / qeinsum / qembed), or run the model through jquant.apply"
        )


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["qvalue", "scale", "zero_point"],
    meta_fields=["qtype", "k", "axis", "group_size", "dtype", "activation"],
)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


# ---- groups ---------------------------------------------------------------------


def _num_groups(k: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-k // group_size)


def _segments(k: int, group_size: int | None) -> list[tuple[int, int, int]]:
    """(start, length, count) runs of equal-length groups along K."""
    if group_size is None or group_size >= k:
        return [(0, k, 1)]
    full, tail = divmod(k, group_size)
    runs = [(0, group_size, full)]
    if tail:
        runs.append((full * group_size, tail, 1))
    return runs


def _per_group(values, group_size, fn, *group_arrays):
    """Applies ``fn(block, *per_group)`` group by group.

    ``values`` is (..., K); each of ``group_arrays`` is (..., G) or (..., 1) (one
    value for every group) and reaches ``fn`` as (..., count, 1) against blocks of
    (..., count, length). Reshapes rather than repeats, so XLA fuses the broadcast.
    """
    k = values.shape[-1]
    pieces = []
    gi = 0
    for start, length, count in _segments(k, group_size):
        v = values[..., start : start + length * count]
        v = v.reshape(*v.shape[:-1], count, length)
        per = [a[..., :1, None] if a.shape[-1] == 1 else a[..., gi : gi + count, None]
               for a in group_arrays]
        out = fn(v, *per)
        pieces.append(out.reshape(*out.shape[:-2], count * length))
        gi += count
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def _apply_groups(values, scale, zero_point, group_size):
    """The dequantization identity: ``(values - zero_point) * scale`` per group."""
    if zero_point is None:
        return _per_group(values, group_size, lambda v, s: v * s, scale)
    return _per_group(values, group_size, lambda v, s, z: (v - z) * s, scale, zero_point)


def _group_reduce(x, group_size, fn):
    """Reduces each group of x (..., K) with fn(block, axis=-1) → (..., G)."""
    k = x.shape[-1]
    outs = []
    for start, length, count in _segments(k, group_size):
        v = x[..., start : start + length * count].reshape(*x.shape[:-1], count, length)
        outs.append(fn(v, axis=-1))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


# ---- packing --------------------------------------------------------------------


def _pack_slices(codes, bits: int):
    """codes (..., n, L) uint8 in [0, 2**bits), L % (8//bits) == 0 → (..., n, L*bits/8)."""
    per = 8 // bits
    L = codes.shape[-1]
    sl = codes.reshape(*codes.shape[:-1], per, L // per).astype(jnp.uint8)
    out = sl[..., 0, :]
    for i in range(1, per):
        out = out | (sl[..., i, :] << (i * bits))
    return out


def _unpack_slices(packed, bits: int):
    """Inverse of ``_pack_slices``: (..., n, B) → (..., n, B * 8/bits) in [0, 2**bits)."""
    per = 8 // bits
    mask = jnp.uint8(2**bits - 1)
    return jnp.concatenate([(packed >> (i * bits)) & mask for i in range(per)], axis=-1)


def _packed_len(length: int, qt: QType) -> int:
    padded = -(-length // qt.pack_width) * qt.pack_width
    return padded * qt.bits // 8


def packed_length(k: int, qtype: str | QType, group_size: int | None) -> int:
    """Bytes per row (last axis of ``qvalue``) for ``k`` codes."""
    qt = qtypes.get(qtype)
    if not qt.packed:
        return k
    return sum(count * _packed_len(length, qt) for _, length, count in _segments(k, group_size))


def pack(codes, qtype: str | QType, group_size: int | None):
    """Packs codes ``(..., K)`` of a sub-byte format into ``(..., Kbytes)`` uint8.

    Byte-wide formats pass through unchanged. See the module docstring for the order.
    """
    qt = qtypes.get(qtype)
    if not qt.packed:
        return codes.astype(qt.code_dtype)
    mask = 2**qt.bits - 1
    u = (codes.astype(jnp.int32) & mask).astype(jnp.uint8)  # two's complement within bits
    k = u.shape[-1]
    pieces = []
    for start, length, count in _segments(k, group_size):
        v = u[..., start : start + length * count].reshape(*u.shape[:-1], count, length)
        pad = -length % qt.pack_width
        if pad:
            v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
        if qt.bits == 3:
            p = jnp.concatenate([_pack_slices(v & 3, 2), _pack_slices(v >> 2, 1)], axis=-1)
        else:
            p = _pack_slices(v, qt.bits)
        pieces.append(p.reshape(*u.shape[:-1], -1))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)


def unpack(packed, qtype: str | QType, k: int, group_size: int | None):
    """Inverse of :func:`pack`: ``(..., Kbytes)`` → codes ``(..., K)`` of ``code_dtype``."""
    qt = qtypes.get(qtype)
    if not qt.packed:
        return packed
    if packed.shape[-1] != packed_length(k, qt, group_size):
        raise ValueError(
            f"packed {qt.name} storage has {packed.shape[-1]} bytes per row; "
            f"k={k}, group_size={group_size} needs {packed_length(k, qt, group_size)}"
        )
    pieces = []
    offset = 0
    for _, length, count in _segments(k, group_size):
        nbytes = _packed_len(length, qt)
        b = packed[..., offset : offset + count * nbytes]
        b = b.reshape(*packed.shape[:-1], count, nbytes)
        if qt.bits == 3:
            n2 = nbytes * 2 // 3
            v = _unpack_slices(b[..., :n2], 2) | (_unpack_slices(b[..., n2:], 1) << 2)
        else:
            v = _unpack_slices(b, qt.bits)
        pieces.append(v[..., :length].reshape(*packed.shape[:-1], count * length))
        offset += count * nbytes
    u = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
    if qt.kind == "int":  # sign-extend from `bits`
        s = jnp.int8(8 - qt.bits)
        return (u.astype(jnp.int8) << s) >> s
    return u


# ---- making ---------------------------------------------------------------------


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
    Asymmetric formats (min/max over the group and zero):
    ``scale = clip_ratio * (max - min) / qmax`` and
    ``zero_point = clip(round(-min / scale), 0, qmax)``, an integer stored in the
    scale dtype (min/max shrink around their midpoint with ``clip_ratio``). All-zero
    groups get scale 1. ``clip_ratio`` may be an array broadcastable to the scale shape
    (searched clipping).

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
        return _group_reduce(w_t, group_size, fn)

    target = jnp.float32(qt.scale_target)
    if not qt.asymmetric:
        amax = reduce(lambda v, axis=None: jnp.max(jnp.abs(v), axis=axis)) * ratio
        scale = amax / target
        scale = jnp.where(scale > 0, scale, jnp.float32(1.0))  # zero (or underflowing) groups
        return _round_up_to(scale, scale_dtype), None
    # The range always includes zero (as GPTQ's quantizer does), so the integer zero point
    # below lies in [0, qmax] and zero itself is exactly representable.
    lo = jnp.minimum(reduce(lambda v, axis=None: jnp.min(v, axis=axis)), 0.0)
    hi = jnp.maximum(reduce(lambda v, axis=None: jnp.max(v, axis=axis)), 0.0)
    mid = (hi + lo) / 2
    lo, hi = mid + (lo - mid) * ratio, mid + (hi - mid) * ratio
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = jnp.where(hi > lo, (hi - lo) / target, amax / target)
    scale = jnp.where(scale > 0, scale, 1.0)  # constant, zero or underflowing groups
    scale = _round_up_to(scale.astype(jnp.float32), scale_dtype)
    # An integer zero point, as GPTQ/AWQ checkpoints and kernels use: zero is then exactly
    # representable and the round trip w -> code -> w never depends on the zero point's dtype.
    zero_point = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), qt.qmin, qt.qmax)
    return scale, zero_point.astype(scale_dtype)


def encode_groups(w_t, scale, zero_point, qtype: str | QType, group_size: int | None):
    """Codes of ``w_t`` (..., K) under given group scales (..., G): the inverse of
    ``_apply_groups``. Scales are used as stored (after their dtype cast)."""
    qt = qtypes.get(qtype)
    w_t = jnp.asarray(w_t, jnp.float32)
    s = scale.astype(jnp.float32)

    def divide(v, s):  # true division, as references do; a zero scale encodes zeros
        return jnp.where(s != 0, v / jnp.where(s != 0, s, 1.0), 0.0)

    if zero_point is None:
        scaled = _per_group(w_t, group_size, divide, s)
    else:
        zp = zero_point.astype(jnp.float32)
        scaled = _per_group(w_t, group_size, lambda v, s, z: divide(v, s) + z, s, zp)
    return qtypes.encode(qt, scaled)


def validate_group_size(qtype: str | QType, group_size: int | None, *, name: str = "weight"):
    """Raises ValueError unless ``group_size`` is None or a positive multiple of the
    format's pack width."""
    qt = qtypes.get(qtype)
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


def check_float_weight(w, *, name: str = "weight"):
    """Raises ValueError if ``w`` is not a float array or (when concrete) holds NaN/inf."""
    if isinstance(w, jax.ShapeDtypeStruct):
        raise ValueError(
            f"{name}: is abstract (a ShapeDtypeStruct) and holds no values to quantize; "
            "to size a quantized tree without data, run jax.eval_shape(lambda p: "
            "jquant.quantize(p, recipe), params)"
        )
    dtype = np.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: only float weights can be quantized, got dtype {dtype.name}")
    if not isinstance(w, jax.core.Tracer):
        finite = np.isfinite(np.asarray(w, np.float32))
        if not finite.all():
            bad = np.argwhere(~finite)[0].tolist()
            raise ValueError(
                f"{name}: weight holds {int((~finite).sum())} NaN/inf values "
                f"(first at index {bad}); fix the checkpoint before quantizing"
            )


def quantize_array(
    w,
    qtype: str | QType,
    *,
    axis: int = 0,
    group_size: int | None = None,
    per_tensor: bool = False,
    scale_dtype=jnp.bfloat16,
    clip_ratio=1.0,
    double_quant: bool = False,
    activation: str | None = None,
    name: str = "weight",
) -> QArray:
    """Quantizes a float tensor by round-to-nearest.

    Args:
      w: float array of any rank >= 1.
      qtype: format name, e.g. ``"int8"``, ``"int4"``, ``"uint4"``, ``"nf4"``, ``"fp8_e4m3"``.
      axis: the contraction axis (``0`` for a Dense kernel ``(K, N)``).
      group_size: elements per group along ``axis``; None for per-channel. Need not
        divide ``K`` (short last group, see the module docstring).
      per_tensor: one scale for the whole tensor (``group_size`` must be None).
      scale_dtype: dtype of the stored scales and zero points.
      clip_ratio: shrink factor for the range (1.0 = absmax / min-max); a scalar
        or an array broadcastable to the scale shape ``(*other_axes, G)``.
      double_quant: store the scales themselves as uint8 (groups of 256 along the
        output axis, float32 second-level scales), as QLoRA does for NF4.
      activation: format for dynamic per-token activation quantization in
        ``jquant.ops`` (e.g. ``"int8"``, ``"fp8_e4m3"``), or None (weight-only).
      name: what error messages call this tensor (a parameter path).

    Returns:
      A QArray whose ``dequantize()`` approximates ``w``.

    >>> q = quantize_array(jnp.ones((256, 8)), "int4", group_size=128)
    >>> q.qvalue.shape, q.scale.shape
    ((8, 128), (8, 2))
    """
    qt = qtypes.get(qtype)
    if not isinstance(w, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        w = jnp.asarray(w)
    check_float_weight(w, name=name)
    if w.ndim < 1:
        raise ValueError(f"{name}: cannot quantize a scalar")
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for shape {tuple(w.shape)}")
    validate_group_size(qt, group_size, name=name)
    if activation is not None and qtypes.get(activation).packed:
        raise ValueError(f"{name}: activation format {activation!r} must be 8-bit")
    if per_tensor and group_size is not None:
        raise ValueError(f"{name}: per_tensor=True excludes group_size={group_size}")
    axis = axis - w.ndim if axis >= 0 else axis
    if double_quant and (w.ndim < 2 or per_tensor):
        raise ValueError(f"{name}: double_quant needs per-channel or per-group scales of a "
                         "weight with an output axis")
    qvalue, stored_scale, zero_point = _quantize_core(
        jnp.asarray(w), jnp.asarray(clip_ratio, jnp.float32), qtype=qt.name, axis=axis,
        group_size=group_size, per_tensor=per_tensor, scale_dtype=np.dtype(scale_dtype),
        double_quant=double_quant,
    )  # fmt: skip
    return QArray(
        qvalue=qvalue,
        scale=stored_scale,
        zero_point=zero_point,
        qtype=qt.name,
        k=w.shape[axis],
        axis=axis,
        group_size=group_size,
        dtype=np.dtype(w.dtype),
        activation=activation,
    )


@functools.partial(
    jax.jit,
    static_argnames=("qtype", "axis", "group_size", "per_tensor", "scale_dtype", "double_quant"),
)
def _quantize_core(w, clip_ratio, *, qtype, axis, group_size, per_tensor, scale_dtype,
                   double_quant):
    """The traced body of :func:`quantize_array`: one compilation per shape and setting."""
    qt = qtypes.get(qtype)
    w_t = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    group = None if per_tensor else group_size
    scale, zero_point = compute_scale(
        w_t, qt, group_size, per_tensor=per_tensor, clip_ratio=clip_ratio,
        scale_dtype=scale_dtype,
    )  # fmt: skip
    stored_scale = scale
    if double_quant:
        stored_scale = quantize_array(
            scale.astype(jnp.float32), "uint8", axis=-2, group_size=256,
            scale_dtype=jnp.float32, name="(scales)",
        )  # fmt: skip
        stored_scale = dataclasses.replace(stored_scale, dtype=np.dtype(scale.dtype))
        # Encode against the scales actually kept, so dequantize() is the best fit to them.
        scale = stored_scale.dequantize(jnp.float32)
    codes = encode_groups(w_t, scale, zero_point, qt, group)
    return pack(codes, qt, group_size), stored_scale, zero_point


def from_codes(
    codes, scale, zero_point=None, *, qtype: str | QType, axis: int = -2,
    group_size: int | None = None, dtype=jnp.float32,
) -> QArray:  # fmt: skip
    """Builds a QArray from codes already in storage layout ``(*other_axes, K)``.

    For algorithms (GPTQ, AWQ, ...) that choose codes and scales themselves.
    """
    qt = qtypes.get(qtype)
    validate_group_size(qt, group_size)
    if axis >= 0:
        raise ValueError(f"from_codes: axis must be negative (counted from the end), got {axis}")
    k = codes.shape[-1]
    g = _num_groups(k, group_size)
    if scale.shape[-1] not in (1, g):
        raise ValueError(f"from_codes: scale has {scale.shape[-1]} groups; K={k} needs {g}")
    return QArray(
        qvalue=pack(codes, qt, group_size), scale=scale, zero_point=zero_point,
        qtype=qt.name, k=k, axis=axis, group_size=group_size, dtype=np.dtype(dtype),
    )  # fmt: skip
