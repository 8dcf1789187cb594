"""Sub-byte storage: packing codes per group into bytes, and back.

The byte order is the storage contract in ``jquant.qarray``'s module docstring; the
lengths come from ``jquant.kernels._formats`` (shared with the kernels).
"""

from __future__ import annotations

import jax.numpy as jnp

from jquant import qtypes
from jquant.kernels._formats import bit_planes, group_runs, packed_group_bytes
from jquant.kernels._formats import packed_length as _packed_length_bits
from jquant.qtypes import QType


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
    return packed_group_bytes(length, qt.bits)


def packed_length(k: int, qtype: str | QType, group_size: int | None) -> int:
    """Bytes per row (last axis of ``qvalue``) for ``k`` codes."""
    return _packed_length_bits(k, qtypes.get(qtype).bits, group_size)


def pack(codes, qtype: str | QType, group_size: int | None):
    """Packs codes ``(..., K)`` of a sub-byte format into ``(..., Kbytes)`` uint8.

    Byte-wide formats pass through unchanged. See ``jquant.qarray`` for the order.
    """
    qt = qtypes.get(qtype)
    if not qt.packed:
        return codes.astype(qt.code_dtype)
    mask = 2**qt.bits - 1
    u = (codes.astype(jnp.int32) & mask).astype(jnp.uint8)  # two's complement within bits
    k = u.shape[-1]
    pieces = []
    for start, length, count in group_runs(k, group_size):
        v = u[..., start : start + length * count].reshape(*u.shape[:-1], count, length)
        pad = -length % qt.pack_width
        if pad:
            v = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)])
        planes, shift = [], 0
        for w in bit_planes(qt.bits):  # low bits first (3 = 2 + 1, 6 = 4 + 2, ...)
            planes.append(_pack_slices((v >> shift) & (2**w - 1), w))
            shift += w
        p = planes[0] if len(planes) == 1 else jnp.concatenate(planes, axis=-1)
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
    for _, length, count in group_runs(k, group_size):
        nbytes = _packed_len(length, qt)
        b = packed[..., offset : offset + count * nbytes]
        b = b.reshape(*packed.shape[:-1], count, nbytes)
        codes = nbytes * 8 // qt.bits  # the group's length padded to the pack width
        v, at, shift = None, 0, 0
        for w in bit_planes(qt.bits):
            part = _unpack_slices(b[..., at : at + codes * w // 8], w) << shift
            v = part if v is None else v | part
            at, shift = at + codes * w // 8, shift + w
        pieces.append(v[..., :length].reshape(*packed.shape[:-1], count * length))
        offset += count * nbytes
    u = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
    if qt.kind == "int":  # sign-extend from `bits`
        s = jnp.int8(8 - qt.bits)
        return (u.astype(jnp.int8) << s) >> s
    return u
