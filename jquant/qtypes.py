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
from jquant.kernels._formats import NF4_CODEBOOK as NF4_CODEBOOK
from jquant.kernels._formats import codebook_select as _codebook_select
from jquant.kernels._formats import pack_width as _pack_width

Kind = Literal["int", "uint", "float", "codebook", "log"]

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
    # Codebook values for kind == "codebook".
    codebook: tuple[float, ...] | None = None
    # Formats whose quality is not yet established (int2/int3).
    experimental: bool = False

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
    try:
        return QTYPES[qtype] if qtype in QTYPES else SCALE_QTYPES[qtype]
    except (KeyError, TypeError):
        raise ValueError(f"unknown qtype {qtype!r}; known: {', '.join(QTYPES)}") from None


def encode(qtype: str | QType, x: jnp.ndarray) -> jnp.ndarray:
    """Maps already-scaled values ``x`` (float32) to codes of ``qtype``.

    Rounding is to nearest (half to even) for integers, IEEE round-to-nearest for
    float8 after saturating to the finite range, and nearest codebook entry for
    codebooks. Returns an array of ``qtype.code_dtype``.
    """
    qt = get(qtype)
    if qt.kind == "log":
        raise ValueError("log8 codes are made by jquant._scales.double_quantize only")
    x = jnp.asarray(x, jnp.float32)
    if qt.kind in ("int", "uint"):
        return jnp.clip(jnp.round(x), qt.qmin, qt.qmax).astype(qt.code_dtype)
    if qt.kind == "float":
        return jnp.clip(x, qt.qmin, qt.qmax).astype(qt.code_dtype)
    # Codebook: the nearest entry is found by comparing against the midpoints.
    book = np.asarray(qt.codebook, np.float32)
    mids = jnp.asarray((book[1:] + book[:-1]) / 2)
    return jnp.searchsorted(mids, x, side="left").astype(qt.code_dtype)


def decode(qtype: str | QType, codes: jnp.ndarray) -> jnp.ndarray:
    """Maps codes of ``qtype`` back to (unscaled) float32 values.

    For ``log8`` these are the codes themselves: the exponent, before ``QArray`` shifts,
    scales and exponentiates it."""
    qt = get(qtype)
    if qt.kind == "codebook":
        return _codebook_select(codes, qt.codebook)
    return codes.astype(jnp.float32)


def half_step(qtype: str | QType, x: np.ndarray) -> np.ndarray:
    """Worst-case |error| of encoding each scaled value in ``x`` (inside the range).

    Integers: 0.5. Float8: half the spacing of the format at ``x`` (relative
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
    if qt.kind == "float":
        info = ml_dtypes.finfo(qt.code_dtype)
        exp = np.floor(np.log2(np.maximum(np.abs(x), float(info.smallest_normal))))
        return 2.0 ** (exp - info.nmant - 1)
    book = np.asarray(qt.codebook, np.float64)
    i = np.clip(np.searchsorted(book, x, side="right") - 1, 0, len(book) - 2)
    return (book[i + 1] - book[i]) / 2
