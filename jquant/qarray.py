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
Other widths are split into power-of-two planes, low bits first, each packed as above
and the planes of a group concatenated: 3-bit codes as a 2-bit plane (``L/4`` bytes)
followed by a 1-bit plane of the high bits (``L/8`` bytes); 5-bit as 4 + 1, 6-bit as
4 + 2 (``L/2`` then ``L/4`` bytes). Signed codes are stored
in two's complement within their bits. Groups are concatenated along the last
axis. This order is the same on every platform and in every checkpoint.

An optional ``perm`` (act-order checkpoints, ``jquant._perm``) permutes the contraction axis:
the storage above is then of the inputs in the order ``perm`` (stored position ``j`` is
logical input ``perm[j]``), so groups are consecutive in stored order; ``dequantize()`` and
``jquant.ops`` undo it, the codes, scales and kernels never see it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import _perm, qtypes
from jquant._checks import check_activation, raise_nonfinite, raise_scale_range
from jquant._checks import check_float_weight as check_float_weight
from jquant._checks import validate_group_size as validate_group_size
from jquant._groups import apply_groups as _apply_groups
from jquant._groups import group_reduce as _group_reduce  # noqa: F401 (re-export)
from jquant._groups import per_group as _per_group  # noqa: F401 (re-export)
from jquant._packing import _pack_slices as _pack_slices
from jquant._packing import _packed_len as _packed_len
from jquant._packing import _unpack_slices as _unpack_slices
from jquant._packing import pack as pack
from jquant._packing import packed_length as packed_length
from jquant._packing import unpack as unpack
from jquant._scales import SCALE_BLOCK, double_quantize, nvfp4_scale_parts, scale_range_problems
from jquant._scales import _round_up_to as _round_up_to
from jquant._scales import compute_scale as compute_scale
from jquant._scales import encode_groups as encode_groups
from jquant.kernels._formats import group_runs as _segments  # noqa: F401 (re-export)
from jquant.kernels._formats import num_groups as _num_groups
from jquant.qtypes import QType

# This module is the dataclass and quantize_array. Geometry, packing, scales and checks
# live in jquant._groups, _packing, _scales and _checks; the names above are re-exported
# because jquant.ops, jquant._dequant_dot, algorithms and tests import them from here.


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
    for fp8 and a table lookup for codebook formats (nf4) and FP4 E2M1 (mxfp4, nvfp4,
    whose scales are E8M0 powers of two, or for nvfp4 a QArray of E4M3 block scales with
    a per-tensor float32 scale: see ``jquant.qtypes``); ``zero_point`` is
    present only for asymmetric (``uint*``) formats; ``quantize_array`` makes it an
    integer (stored in the scale dtype), while ``from_codes`` accepts any float.

    ``scale`` may itself be a QArray (double quantization, as in QLoRA).
    Building one from arrays checks that the parts agree with ``k``, ``axis``,
    ``group_size`` and the format's packing (ValueError naming the part, the expected
    and the actual shape); see ``_check_parts`` for what transformations skip.
    Instances are pytrees: ``qvalue``, ``scale``, ``zero_point`` and ``perm`` are leaves and
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
      perm: None, or an int32 ``(k,)`` permutation of the contraction axis (act-order
        checkpoints, see ``jquant._perm``): stored position ``j`` along K (of the codes,
        ``codes()`` and ``dequantize_stored()``) holds logical element ``perm[j]``, and the
        groups are consecutive in stored order. ``dequantize()`` returns logical order;
        ``jquant.ops`` contracts ``x[..., perm]`` with the stored weight. QArrays stacked
        along leading axes (layers, for ``lax.scan`` or ``vmap`` over them) stack their
        perms ``(*stack, k)``; a matmul takes one weight, sliced from the stack.
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
    perm: jax.Array | None = None

    def __post_init__(self):
        _check_parts(self)

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
        """True storage in bytes: packed codes + scales (+ zero points, + perm)."""
        return (_nbytes_of(self.qvalue) + _nbytes_of(self.scale) + _nbytes_of(self.zero_point)
                + _nbytes_of(self.perm))  # fmt: skip

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per logical element, scales and zero points included."""
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        if self.scale is not None and math.prod(_shape_of(self.scale)) == 1:
            g = "tensor"
        g += "" if self.perm is None else ", act-order perm"
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

        This is what matmuls want: contracting the last axis needs no transpose. With a
        ``perm``, K is in stored order (logical element ``perm[j]`` at ``j``).
        """
        values = qtypes.decode(self.qtype, self.codes())
        zp = None if self.zero_point is None else self.zero_point.astype(jnp.float32)
        out = _apply_groups(values, self.scales(), zp, self.group_size)
        if self.format.kind == "log":  # log8 (double-quantized scales): a log2-domain uint8
            out = jnp.exp2(out)
        return out.astype(dtype or self.dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """The dequantized tensor in its logical shape and order (``dtype`` defaults to the
        original)."""
        stored = self.dequantize_stored(dtype)
        if self.perm is not None:
            stored = _perm.unpermute(stored, self.perm)
        return jnp.moveaxis(stored, -1, self.axis)

    def __jax_array__(self):
        raise TypeError(
            "a QArray is not an array: call .dequantize(), or pass it to jquant.ops "
            "(qdot / qeinsum / qembed), or run the model through jquant.apply"
        )


def _concrete(x) -> bool:
    """Whether ``x`` is an array (or shape placeholder) whose shape can be checked: not a
    tracer, a sentinel or a spec that a pytree transformation put in a leaf's place."""
    if isinstance(x, QArray):
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def _check_parts(q: QArray) -> None:
    """Raises ValueError when the codes, scales or zero points disagree with ``k``, ``axis``,
    ``group_size`` and the packing of ``qtype``.

    Runs whenever a QArray is built from concrete arrays (or ShapeDtypeStructs), including
    pytree unflattening; it checks nothing when a leaf is a tracer, None where an array is
    required, or anything else a transformation substitutes (``object()``, a PartitionSpec),
    since jax rebuilds QArrays around such leaves inside ``jit``, ``vmap``, ``scan`` and
    ``tree.map``. Leading axes may be stacked (layers): they only have to agree with each
    other, and a scale or zero point may have size 1 on them (per-tensor).
    """
    leaves = [q.qvalue, q.scale, q.zero_point, q.perm]
    if q.qvalue is None or q.scale is None or not all(
        x is None or _concrete(x) for x in leaves
    ):
        return
    qt = qtypes.get(q.qtype)
    shape = _shape_of(q.qvalue)
    if len(shape) < 1:
        raise ValueError(f"QArray: qvalue must have at least one axis, got shape {shape}")
    if not isinstance(q.axis, int) or not -len(shape) <= q.axis < 0:
        raise ValueError(f"QArray: axis must be negative and at least -{len(shape)} for qvalue "
                         f"of shape {shape}, got {q.axis!r}")
    if not isinstance(q.k, int | np.integer) or q.k < 1:
        raise ValueError(f"QArray: k (the contraction length) must be a positive int, "
                         f"got {q.k!r}")
    validate_group_size(qt, q.group_size, name="QArray")
    want = (*shape[:-1], packed_length(int(q.k), qt, q.group_size))
    if shape != want:
        raise ValueError(f"QArray: qvalue has shape {shape}, expected {want} for k={q.k}, "
                         f"group_size={q.group_size}, {qt.name} ({qt.bits} bits)")
    if q.zero_point is not None and not qt.asymmetric:
        raise ValueError(f"QArray: {qt.name} is symmetric and takes no zero_point, got one of "
                         f"shape {tuple(_shape_of(q.zero_point))}")
    groups = _num_groups(int(q.k), q.group_size)
    for part in ("scale", "zero_point"):
        x = getattr(q, part)
        if x is None:
            continue
        got = x.shape if isinstance(x, QArray) else _shape_of(x)
        expected = (*shape[:-1], groups)
        ok = len(got) == len(expected) and got[-1] == groups and all(
            g in (n, 1) for g, n in zip(got[:-1], shape[:-1])
        )
        if not ok:
            raise ValueError(
                f"QArray: {part} has shape {tuple(got)}, expected {expected} (one per group "
                f"of k={q.k} with group_size={q.group_size}; size 1 on a leading axis "
                "broadcasts)"
            )
    if q.perm is not None:
        # Values only on host arrays: a device array would be copied back at every unflatten.
        _perm.check_perm(q.perm, int(q.k), shape[:-1], values=isinstance(q.perm, np.ndarray))


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["qvalue", "scale", "zero_point", "perm"],
    meta_fields=["qtype", "k", "axis", "group_size", "dtype", "activation"],
)


def is_qarray(x) -> bool:
    return isinstance(x, QArray)


# ---- making ---------------------------------------------------------------------


def quantize_array(
    w,
    qtype: str | QType,
    *,
    axis: int = 0,
    group_size: int | None = None,
    per_tensor: bool = False,
    scale_dtype=None,
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
      scale_dtype: dtype of the stored scales and zero points; None: bfloat16, or what a
        block-scaled format fixes (``mxfp4`` float8_e8m0fnu, ``nvfp4`` float32: its scale
        is a QArray of E4M3 codes with a float32 per-tensor scale), the only dtype they take.
      clip_ratio: shrink factor for the range (1.0 = absmax / min-max); a scalar
        or an array broadcastable to the scale shape ``(*other_axes, G)``.
      double_quant: store the scales themselves as 8-bit log-domain codes (``log8``:
        blocks of 256 along the output axis, each with a float32 step and offset), as
        QLoRA does for NF4 (with a linear code); see ``_scales.double_quantize``.
      activation: format for dynamic per-token activation quantization in
        ``jquant.ops`` (e.g. ``"int8"``, ``"fp8_e4m3"``), or None (weight-only).
      name: what error messages call this tensor (a parameter path).

    Returns:
      A QArray whose ``dequantize()`` approximates ``w``.

    Raises:
      ValueError: naming ``name``, for a weight that is not float, empty or holds
        NaN/inf, bad settings, or scales that ``scale_dtype`` cannot represent. The value
        checks (NaN/inf, scale range) run on device; when ``quantize_array`` is traced
        (inside ``jit``, ``vmap``, ``scan``) they are reported by a ``jax.debug.callback``
        that raises this ValueError when the compiled program runs, so the caller gets a
        ``jax.errors.JaxRuntimeError`` whose message holds it (at the call, or when the
        result is first used under asynchronous dispatch).

    >>> q = quantize_array(jnp.ones((256, 8)), "int4", group_size=128)
    >>> q.qvalue.shape, q.scale.shape
    ((8, 128), (8, 2))
    """
    qt = qtypes.get(qtype)
    if qt.kind == "log":
        raise ValueError(f"{name}: {qt.name} stores double-quantized scales only, not weights")
    if not isinstance(w, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        w = jnp.asarray(w)
    if w.ndim < 1:
        raise ValueError(f"{name}: cannot quantize a scalar")
    check_float_weight(w, name=name, values=False)  # values: checked on device below
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"{name}: axis={axis} is out of range for shape {tuple(w.shape)}")
    validate_group_size(qt, group_size, name=name)
    check_activation(activation, name=name)
    if per_tensor and group_size is not None:
        raise ValueError(f"{name}: per_tensor=True excludes group_size={group_size}")
    scale_dtype = _scale_dtype(qt, scale_dtype, name=name)
    if double_quant and qt.block_scale is not None:
        raise ValueError(f"{name}: {qt.name} stores its scales in 8 bits already "
                         f"({qt.block_scale}); double_quant does not apply")
    axis = axis - w.ndim if axis >= 0 else axis
    if double_quant and (w.ndim < 2 or per_tensor):
        raise ValueError(f"{name}: double_quant needs per-channel or per-group scales of a "
                         "weight with an output axis")
    qvalue, stored_scale, zero_point, problems = _quantize_core(
        jnp.asarray(w), jnp.asarray(clip_ratio, jnp.float32), qtype=qt.name, axis=axis,
        group_size=group_size, per_tensor=per_tensor, scale_dtype=np.dtype(scale_dtype),
        double_quant=double_quant,
    )  # fmt: skip
    report = functools.partial(_report_problems, shape=tuple(w.shape), name=name,
                               scale_dtype=np.dtype(scale_dtype))  # fmt: skip
    if not isinstance(problems, jax.core.Tracer):
        report(jax.device_get(problems))
    else:  # traced (jit, vmap, scan): the same check when the program runs
        jax.debug.callback(report, problems)
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


def _scale_dtype(qt: QType, scale_dtype, *, name: str) -> np.dtype:
    """``scale_dtype`` resolved (None: bfloat16, or the format's own); a block-scaled format
    takes only its own."""
    if scale_dtype is None:
        return qt.scale_dtype or np.dtype(jnp.bfloat16)
    scale_dtype = np.dtype(scale_dtype)
    if qt.scale_dtype is not None and scale_dtype != qt.scale_dtype:
        raise ValueError(f"{name}: {qt.name} fixes its scales ({qt.block_scale}); "
                         f"scale_dtype={scale_dtype.name} is not allowed (leave it None, or "
                         f"give {qt.scale_dtype.name})")
    return scale_dtype


def _report_problems(problems, *, shape, name, scale_dtype):
    """Raises the error for ``problems`` (``_quantize_core``'s int32 ``[NaN/inf count, first
    NaN/inf flat index, overflowed scales, underflowed scales]``, possibly batched by vmap
    as ``(..., 4)``), if any."""
    rows = np.asarray(problems).reshape(-1, 4)
    for nonfinite, first, overflow, underflow in (tuple(int(v) for v in r) for r in rows):
        raise_nonfinite(nonfinite, first, shape, name=name)
        raise_scale_range(overflow, underflow, scale_dtype, name=name)


@functools.partial(
    jax.jit,
    static_argnames=("qtype", "axis", "group_size", "per_tensor", "scale_dtype", "double_quant"),
)
def _quantize_core(w, clip_ratio, *, qtype, axis, group_size, per_tensor, scale_dtype,
                   double_quant):
    """The traced body of :func:`quantize_array`: one compilation per shape and setting.

    Also returns int32 ``[NaN/inf count, first NaN/inf flat index, overflowed scales,
    underflowed scales]``, so the weight's values are checked on device, in the same pass.
    """
    qt = qtypes.get(qtype)
    w_t = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    group = None if per_tensor else group_size
    scale, zero_point = compute_scale(
        w_t, qt, group_size, per_tensor=per_tensor, clip_ratio=clip_ratio,
        scale_dtype=scale_dtype,
    )  # fmt: skip
    exact, _ = compute_scale(
        w_t, qt, group_size, per_tensor=per_tensor, clip_ratio=clip_ratio,
        scale_dtype=jnp.float32,
    )  # fmt: skip
    bad = ~jnp.isfinite(w)
    problems = jnp.stack([
        jnp.sum(bad, dtype=jnp.int32), jnp.argmax(bad.reshape(-1)).astype(jnp.int32),
        *(p.astype(jnp.int32) for p in scale_range_problems(exact, scale)),
    ])  # fmt: skip
    stored_scale = scale
    if qt.block_scale == "e4m3":  # scale holds the same values: codes * tensor scale
        stored_scale = nvfp4_scale(w_t, group_size, clip_ratio)
    if double_quant:
        stored_scale = double_quantized_scale(scale)
        # Encode against the scales actually kept, so dequantize() is the best fit to them.
        scale = stored_scale.dequantize(jnp.float32)
    codes = encode_groups(w_t, scale, zero_point, qt, group)
    return pack(codes, qt, group_size), stored_scale, zero_point, problems


def double_quantized_scale(scale) -> QArray:
    """Scales ``(..., N, G)`` stored as a ``log8`` QArray (see ``_scales.double_quantize``)."""
    codes, step, offset = double_quantize(scale)
    return QArray(
        qvalue=codes, scale=step, zero_point=offset, qtype="log8", k=scale.shape[-2],
        axis=-2, group_size=SCALE_BLOCK, dtype=np.dtype(scale.dtype),
    )  # fmt: skip


def nvfp4_scale(w_t, group_size: int, clip_ratio=1.0) -> QArray:
    """NVFP4's scale of ``w_t (..., K)``: a QArray of logical shape ``(..., G)`` holding the
    E4M3 block scales as ``fp8_e4m3`` codes, quantized along its last axis with one float32
    per-tensor scale (``_scales.nvfp4_scale_parts``); it dequantizes to the kept scales."""
    codes, tensor_scale = nvfp4_scale_parts(w_t, group_size, clip_ratio)
    return QArray(
        qvalue=codes, scale=tensor_scale, zero_point=None, qtype="fp8_e4m3",
        k=codes.shape[-1], axis=-1, group_size=None, dtype=np.dtype(np.float32),
    )  # fmt: skip


def from_codes(
    codes, scale, zero_point=None, *, qtype: str | QType, axis: int = -2,
    group_size: int | None = None, dtype=jnp.float32, perm=None,
) -> QArray:  # fmt: skip
    """Builds a QArray from codes already in storage layout ``(*other_axes, K)``.

    For algorithms (GPTQ, AWQ, ...) that choose codes and scales themselves. With ``perm``
    (int32 ``(K,)``) the codes and groups are in stored order: position ``j`` holds logical
    element ``perm[j]`` (see the ``perm`` attribute).
    """
    qt = qtypes.get(qtype)
    validate_group_size(qt, group_size)
    if axis >= 0:
        raise ValueError(f"from_codes: axis must be negative (counted from the end), got {axis}")
    k = codes.shape[-1]
    g = _num_groups(k, group_size)
    if perm is not None:
        perm = np.asarray(perm)
        _perm.check_perm(perm, k, codes.shape[:-1], values=True)
    if scale.shape[-1] not in (1, g):
        raise ValueError(f"from_codes: scale has {scale.shape[-1]} groups; K={k} needs {g}")
    return QArray(
        qvalue=pack(codes, qt, group_size), scale=scale, zero_point=zero_point,
        qtype=qt.name, k=k, axis=axis, group_size=group_size, dtype=np.dtype(dtype),
        perm=None if perm is None else jnp.asarray(perm, jnp.int32),
    )  # fmt: skip
