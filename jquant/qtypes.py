"""The quantized formats: what a code means and how a scaled value becomes one.

A *format* (``QType``) maps a real number that has already been divided by its
scale (and shifted by its zero point) onto a finite set of codes, and back:

* ``int`` formats (``int8``, ``int6``, ``int5``, ``int4``, ``int3``, ``int2``) are symmetric:
  codes are signed integers in ``[qmin, qmax]`` with ``qmin = -2**(bits-1)`` and
  ``qmax = 2**(bits-1) - 1``; the absmax scale maps the largest magnitude to
  ``qmax`` (so ``qmin`` is reachable only by clipping).
* ``uint`` formats (``uint8``, ``uint6``, ``uint5``, ``uint4``, ``uint3``, ``uint2``) are
  asymmetric: codes in ``[0, 2**bits - 1]`` with a per-group zero point.
* ``float`` formats (``fp8_e4m3``, ``fp8_e5m2``) store a float8 value; scaling
  maps the absmax to the format's largest finite value and encoding saturates
  (never produces inf/NaN).
* ``codebook`` formats (``nf4``) store the index of the nearest codebook entry;
  the scale maps the absmax to 1.0.
* ``fp4`` formats (``mxfp4``, ``nvfp4``) store an FP4 E2M1 value (OCP MX v1.0: bit 3 the
  sign, bits 0-2 the magnitude, values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}), rounded to nearest
  (ties to even mantissa) and saturating at ±6. They are *block-scaled*: the group size is
  fixed (``block_size``) and so is how the scales are stored (``block_scale``):

  - ``mxfp4`` (OCP MX v1.0 MXFP4): blocks of 32, one E8M0 scale (a power of two
    ``2**X``) per block, ``X = floor(log2(amax)) - 2`` (2 = the exponent of E2M1's largest
    value 6), clamped to [-127, 127]. Values ``amax / 2**X`` lie in [4, 8), so the
    largest ones saturate to 6, as the spec has it. Stored as ``float8_e8m0fnu``.
  - ``nvfp4`` (NVIDIA's NVFP4): blocks of 16, one FP8 E4M3 scale per block times one
    float32 scale per tensor ``g = amax_tensor / (6 * 448)`` (NVIDIA ModelOpt's
    ``weight_scale_2``; compressed-tensors stores its reciprocal as ``weight_global_scale``):
    the block scale is ``e4m3(amax_block / 6 / g)``, an E4M3 code of 0 becomes 0.125
    (as compressed-tensors does), and the QArray's ``scale`` is itself a QArray of those
    E4M3 codes with the per-tensor ``g`` as its scale (see ``jquant._scales``).
* ``vector`` formats (``vq2``, ``vq3``) store, for each run of ``vector_dim`` consecutive
  weights along the contraction axis, the index of an entry of a learned codebook of
  ``2 ** (bits * vector_dim)`` vectors, one codebook per ``vector_tile`` of the kernel; see
  ``jquant.vq`` for their storage and ``jquant.algorithms.gptvq`` for their encoder. No
  scalar ``encode`` / ``decode`` applies to them.
* the ``log`` format ``log8`` stores only double-quantized scales (never a weight): a uint8
  code ``q`` with a per-block step ``s`` and offset ``z`` stands for ``2 ** ((q - z) * s)``,
  the uint8 identity in the log2 domain (see ``jquant._scales.double_quantize``).

Only the *storage* of sub-byte codes lives elsewhere (``jquant.qarray``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import ml_dtypes
import numpy as np

# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023), shared with the kernels.
from jquant.kernels._formats import FP4_E2M1_VALUES as FP4_E2M1_VALUES
from jquant.kernels._formats import NF4_CODEBOOK as NF4_CODEBOOK
from jquant.kernels._formats import codebook_select as _codebook_select
from jquant.kernels._formats import pack_width as _pack_width

Kind = Literal["int", "uint", "float", "fp4", "codebook", "vector", "log"]
BlockScale = Literal["e8m0", "e4m3"]

@dataclasses.dataclass(frozen=True, kw_only=True)
class QType:
    """One quantized format. Instances are constants; look them up with :func:`get`."""

    # Short name used in recipes, reports and checkpoints ("int4", "fp8_e4m3", ...).
    name: str
    # Bits of storage per weight, before scales.
    bits: int
    # How a code is interpreted (see the module docstring).
    kind: Kind
    # Smallest and largest code (int/uint/codebook kinds); for floats the finite range.
    qmin: float
    qmax: float
    # numpy dtype of an unpacked code (int8 / uint8 / float8).
    code_dtype: np.dtype
    # Codebook values for kind == "codebook" (sorted); the value of each code for "fp4".
    codebook: tuple[float, ...] | None = None
    # Formats whose quality is not yet established (int2/int3).
    experimental: bool = False
    # Block-scaled formats only: the group size they are defined with (mxfp4 32, nvfp4 16).
    block_size: int | None = None
    # Block-scaled formats only: how a block's scale is stored: "e8m0" (a power of two,
    # float8_e8m0fnu) or "e4m3" (an FP8 E4M3 code times a float32 per-tensor scale).
    block_scale: BlockScale | None = None
    # Vector formats only: weights per vector (consecutive along the contraction axis K).
    vector_dim: int | None = None
    # Vector formats only: (rows of K, columns of N) of a Dense kernel (K, N) that share one
    # codebook; K and N must be multiples of them.
    vector_tile: tuple[int, int] | None = None

    @property
    def scale_dtype(self) -> np.dtype | None:
        """The scale dtype a block-scaled format fixes (None: the caller picks one).

        ``mxfp4``: float8_e8m0fnu. ``nvfp4``: float32, the dtype of its kept scales (each
        an E4M3 code times the per-tensor float32 scale; stored as a QArray of both)."""
        if self.block_scale == "e8m0":
            return np.dtype(ml_dtypes.float8_e8m0fnu)
        if self.block_scale == "e4m3":
            return np.dtype(np.float32)
        return None

    @property
    def asymmetric(self) -> bool:
        """Whether the format carries a zero point."""
        return self.kind in ("uint", "log")

    @property
    def packed(self) -> bool:
        """Whether several codes share a byte in storage."""
        return self.bits < 8

    @property
    def pack_width(self) -> int:
        """Codes per packing unit: a group size must be a multiple of this."""
        return _pack_width(self.bits)

    @property
    def scale_target(self) -> float:
        """The code magnitude that the group's absmax (or range) is scaled onto."""
        if self.kind == "uint":
            return self.qmax - self.qmin
        if self.kind == "codebook":
            return max(abs(v) for v in self.codebook)
        return self.qmax


def _int(bits: int, **kw) -> QType:
    return QType(
        name=f"int{bits}", bits=bits, kind="int", qmin=-(2 ** (bits - 1)),
        qmax=2 ** (bits - 1) - 1, code_dtype=np.dtype(np.int8), **kw,
    )  # fmt: skip


def _uint(bits: int, **kw) -> QType:
    return QType(
        name=f"uint{bits}", bits=bits, kind="uint", qmin=0, qmax=2**bits - 1,
        code_dtype=np.dtype(np.uint8), **kw,
    )  # fmt: skip


def _fp4(name: str, block_size: int, block_scale: BlockScale) -> QType:
    return QType(
        name=name, bits=4, kind="fp4", qmin=-6.0, qmax=6.0, code_dtype=np.dtype(np.uint8),
        codebook=FP4_E2M1_VALUES, block_size=block_size, block_scale=block_scale,
    )  # fmt: skip


def _fp8(name: str, dtype) -> QType:
    fmax = float(ml_dtypes.finfo(dtype).max)
    return QType(name=name, bits=8, kind="float", qmin=-fmax, qmax=fmax, code_dtype=np.dtype(dtype))


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _int(8), _int(6), _int(5), _int(4), _int(3, experimental=True),
        _int(2, experimental=True),
        _uint(8), _uint(6), _uint(5), _uint(4), _uint(3, experimental=True),
        _uint(2, experimental=True),
        _fp8("fp8_e4m3", ml_dtypes.float8_e4m3fn), _fp8("fp8_e5m2", ml_dtypes.float8_e5m2),
        QType(name="nf4", bits=4, kind="codebook", qmin=0, qmax=15,
              code_dtype=np.dtype(np.uint8), codebook=NF4_CODEBOOK),
        _fp4("mxfp4", 32, "e8m0"), _fp4("nvfp4", 16, "e4m3"),
    )
}  # fmt: skip

# Vector-quantized formats (``jquant.vq``): 2 index bits per weight (pairs of weights, 16
# entries) and 3 (pairs, 64 entries), each codebook shared by a tile of 2048 / 4096 weights.
VECTOR_QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType(name="vq2", bits=2, kind="vector", qmin=0, qmax=15, code_dtype=np.dtype(np.uint8),
              vector_dim=2, vector_tile=(64, 32), experimental=True),
        QType(name="vq3", bits=3, kind="vector", qmin=0, qmax=63, code_dtype=np.dtype(np.uint8),
              vector_dim=2, vector_tile=(64, 64), experimental=True),
    )
}  # fmt: skip

# Formats only a double-quantized scale uses (``get`` knows them; weights never take them).
SCALE_QTYPES: dict[str, QType] = {
    "log8": QType(name="log8", bits=8, kind="log", qmin=0, qmax=255, code_dtype=np.dtype(np.uint8)),
}


def get(qtype: str | QType) -> QType:
    """Returns the format named ``qtype`` (a ``QType`` passes through).

    >>> get("int4").bits
    4
    """
    if isinstance(qtype, QType):
        return qtype
    for table in (QTYPES, VECTOR_QTYPES, SCALE_QTYPES):
        if isinstance(qtype, str) and qtype in table:
            return table[qtype]
    raise ValueError(f"unknown qtype {qtype!r}; known: {', '.join([*QTYPES, *VECTOR_QTYPES])}")


def encode(qtype: str | QType, x: jnp.ndarray) -> jnp.ndarray:
    """Maps already-scaled values ``x`` (float32) to codes of ``qtype``.

    Rounding is to nearest (half to even) for integers, IEEE round-to-nearest for
    float8 after saturating to the finite range, nearest codebook entry for
    codebooks, and for fp4 the nearest E2M1 value (ties to the even mantissa, as IEEE
    and ``ml_dtypes.float4_e2m1fn`` round) after saturating to ±6, as the E2M1 code (the
    sign of ``x`` kept, so small negative values give -0). Returns an array of
    ``qtype.code_dtype``.
    """
    qt = get(qtype)
    if qt.kind == "log":
        raise ValueError("log8 codes are made by jquant._scales.double_quantize only")
    if qt.kind == "vector":
        raise ValueError(f"{qt.name} codes index vectors: jquant.algorithms.gptvq makes them")
    x = jnp.asarray(x, jnp.float32)
    if qt.kind in ("int", "uint"):
        return jnp.clip(jnp.round(x), qt.qmin, qt.qmax).astype(qt.code_dtype)
    if qt.kind == "float":
        return jnp.clip(x, qt.qmin, qt.qmax).astype(qt.code_dtype)
    if qt.kind == "fp4":
        return _encode_e2m1(x)
    # Codebook: the nearest entry is found by comparing against the midpoints.
    book = np.asarray(qt.codebook, np.float32)
    mids = jnp.asarray((book[1:] + book[:-1]) / 2)
    return jnp.searchsorted(mids, x, side="left").astype(qt.code_dtype)


def decode(qtype: str | QType, codes: jnp.ndarray) -> jnp.ndarray:
    """Maps codes of ``qtype`` back to (unscaled) float32 values.

    For ``log8`` these are the codes themselves: the exponent, before ``QArray`` shifts,
    scales and exponentiates it."""
    qt = get(qtype)
    if qt.kind in ("codebook", "fp4"):
        return _codebook_select(codes, qt.codebook)
    return codes.astype(jnp.float32)


# Magnitudes where E2M1 rounding steps up to the next value, and whether a value exactly
# there steps up: a tie goes to the value with an even mantissa (0, 1, 2, 4, 6 are even).
_E2M1_STEPS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
               (3.5, True), (5.0, False))  # fmt: skip


def _encode_e2m1(x):
    """E2M1 codes (uint8 in [0, 16)) of float32 ``x``: round to nearest even, saturate."""
    a = jnp.abs(x)
    mag = sum(((a >= t) if up else (a > t)).astype(jnp.uint8) for t, up in _E2M1_STEPS)
    return mag | (jnp.signbit(x).astype(jnp.uint8) << 3)


def half_step(qtype: str | QType, x: np.ndarray) -> np.ndarray:
    """Worst-case |error| of encoding each scaled value in ``x`` (inside the range).

    Integers: 0.5. Float8 and FP4: half the spacing of the format at ``x`` (relative
    precision, with the subnormal floor). Codebooks: half the gap between the two
    entries around ``x`` (its own interval, so the bound is as tight as the levels
    there). Used by tests and reports to state each format's bound.
    """
    qt = get(qtype)
    if qt.kind == "log":
        raise ValueError("log8 has no absolute half step (its error is relative)")
    x = np.asarray(x, np.float64)
    if qt.kind in ("int", "uint"):
        return np.full_like(x, 0.5)
    if qt.kind in ("float", "fp4"):
        info = ml_dtypes.finfo(ml_dtypes.float4_e2m1fn if qt.kind == "fp4" else qt.code_dtype)
        exp = np.floor(np.log2(np.maximum(np.abs(x), float(info.smallest_normal))))
        return 2.0 ** (exp - info.nmant - 1)
    book = np.asarray(qt.codebook, np.float64)
    i = np.clip(np.searchsorted(book, x, side="right") - 1, 0, len(book) - 2)
    return (book[i + 1] - book[i]) / 2
