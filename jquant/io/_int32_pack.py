"""Integer codes packed into int32 words, as GPTQ, AWQ and compressed-tensors store them.

Every one of those layouts is a little-endian bit stream: along one axis, code ``i`` of
``bits`` bits occupies stream bits ``[i·bits, (i + 1)·bits)``, and word ``j`` holds stream
bits ``[32·j, 32·(j + 1))``, its least significant bit first. For 2, 4 and 8 bits that is
"``32 / bits`` codes per word, the first in the low bits"; 3-bit codes straddle words (GPTQ's
3-bit layout). The layouts differ only in the axis packed and in what the codes mean
(GPTQ's zero point offsets, AWQ's order within a word, compressed-tensors' ``+ 2^(b−1)``),
which their readers handle.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_int32", "packed_words", "unpack_int32"]


def packed_words(n: int, bits: int) -> int:
    """Words holding ``n`` codes of ``bits`` bits: ``ceil(n · bits / 32)``."""
    return -(-n * bits // 32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")


def pack_int32(codes, bits: int, axis: int = -1) -> np.ndarray:
    """``codes`` (unsigned integers below ``2**bits``) packed along ``axis`` into int32
    words, ``packed_words(n, bits)`` of them (the last padded with zero bits).

    >>> pack_int32(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 4).view(np.uint32)
    array([2271560481], dtype=uint32)
    >>> hex(_ := int(pack_int32(np.full(8, 7), 4).view(np.uint32)[0]))
    '0x77777777'
    """
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing; got "
            f"[{codes.min()}, {codes.max()}]"
        )
    moved = np.moveaxis(codes, axis, -1).astype(np.uint32)
    n = moved.shape[-1]
    words = packed_words(n, bits)
    # (..., n, bits) little-endian bits → one stream per row, padded to whole words.
    stream = ((moved[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    stream = stream.reshape(*moved.shape[:-1], n * bits)
    stream = np.concatenate(
        [stream, np.zeros((*moved.shape[:-1], words * 32 - n * bits), np.uint8)], axis=-1
    )
    packed = np.packbits(stream, axis=-1, bitorder="little")  # 4 bytes a word, low first
    out = packed.reshape(*moved.shape[:-1], words, 4).copy().view("<u4")[..., 0]
    return np.moveaxis(out.astype(np.uint32).view(np.int32), -1, axis)


def unpack_int32(words, bits: int, n: int, axis: int = -1) -> np.ndarray:
    """The ``n`` codes of ``bits`` bits packed along ``axis`` of int32 ``words`` (uint8 for
    ``bits`` ≤ 8, else uint16): the inverse of `pack_int32`.

    Raises:
      ValueError: ``words`` is not a 32-bit integer array, or holds fewer words along
        ``axis`` than ``n`` codes need (``packed_words(n, bits)``) or more than that.
    """
    _check_bits(bits)
    words = np.asarray(words)
    if words.dtype not in (np.int32, np.uint32):
        raise ValueError(f"packed words must be int32 or uint32, got {words.dtype}")
    moved = np.moveaxis(words, axis, -1)
    need = packed_words(n, bits)
    if moved.shape[-1] != need:
        raise ValueError(
            f"{n} codes of {bits} bits need {need} int32 words along the packed axis; "
            f"got {moved.shape[-1]}"
        )
    raw = np.ascontiguousarray(moved).astype("<u4").view(np.uint8)
    stream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : n * bits]
    stream = stream.reshape(*moved.shape[:-1], n, bits).astype(np.uint32)
    codes = (stream << np.arange(bits, dtype=np.uint32)).sum(axis=-1)
    return np.moveaxis(codes.astype(np.uint8 if bits <= 8 else np.uint16), -1, axis)
