"""GGUF quantized tensors kept packed: ggml blocks as `jquant.qarray.QArray` values.

`jquant.io.load_gguf(path, packed=True)` reads each matrix stored in one of `PACKED_TYPES`
into a QArray instead of dequantizing it. ggml stores a (rows, cols) matrix row by row, each
row a run of blocks along ``cols``: exactly a QArray's storage, one row per output feature and
the contraction axis last. So a linear weight's QArray stores GGUF's rows as they are and has
the logical shape ``(in, out)`` (``axis=-2``); the token embedding ``(vocab, hidden)``, whose
rows are looked up, is a QArray along hidden (``axis=-1``), as `jquant.ops.qembed` and the
tied head (`jquant.ops.qattend`) take it. A mixture-of-experts stack ``(E, out, in)`` (ggml's
3-D ``[in, out, E]``, each expert's rows after the previous expert's) is one QArray of logical
shape ``(E, in, out)``, each expert quantized along its own ``in``, as
`jquant.models.moe.ExpertDense` takes it.

Each ggml type is written as ``w = (q - z) * s`` per group of the QArray (codes ``q``):

=====  ==================  =====  ==========================================  =====  ========
ggml   ggml's value        codes  QArray scale ``s`` / zero point ``z``        exact  bits/w
                                                                                      (file)
=====  ==================  =====  ==========================================  =====  ========
Q8_0   d·q                 int8   d (float16), group 32                        yes    8.5 (8.5)
Q4_0   d·(q − 8)           int4   d (float16), group 32                        yes    4.5 (4.5)
Q5_0   d·(q − 16)          int5   d (float16), group 32                        yes    5.5 (5.5)
Q4_1   d·q + m             uint4  d, z = −m/d (both float32), group 32         no     6 (5)
Q5_1   d·q + m             uint5  d, z = −m/d (both float32), group 32         no     7 (6)
Q6_K   d·sc·q              int6   sc (int8) × d (float16): a two-level         yes    6.5625
                                  QArray scale, group 16                              (6.5625)
Q3_K   d·sc·q              int3   likewise (sc = 6-bit − 32), group 16         yes    3.5625
                                                                                      (3.4375)
Q4_K   d·sc·q − dmin·m     uint4  d·sc, z = dmin·m/(d·sc) (float32), group 32  no     6 (4.5)
Q5_K   d·sc·q − dmin·m     uint5  likewise, group 32                           no     7 (5.5)
Q2_K   d·sc·q − dmin·m     uint2  likewise (4-bit sc and m), group 16          no     6 (2.625)
=====  ==================  =====  ==========================================  =====  ========

"exact": the QArray's ``dequantize()`` equals `gguf.quants.dequantize` bit for bit (the
products of float16 scales and small integers are exact in float32, and jquant multiplies
in the order gguf does). The affine types (a min ``m`` added) are not: ``(q + m/d)·d``
rounds twice where ``d·q + m`` rounds once. On random blocks the difference stays under one
float32 epsilon of the tensor's largest magnitude; tests/io/test_gguf_packed.py asserts at
most 4. Their scale and zero point are both float32 (a float16 ``z`` would round away most
of that precision) because jquant's fused matmul kernels want the two in one dtype.
A group whose scale ``d`` (``d·sc``) is 0 holds one constant ``c`` (``m``, or ``−dmin·m``):
it is stored exactly as codes 0, scale ``c``, zero point −1.

Not kept packed (dequantized to float32 as `load_gguf` does without ``packed``): every other
ggml type (the I-quants IQ1_S ... IQ4_XS, TQ1_0, TQ2_0, MXFP4, NVFP4, and the float types
F32, F16, BF16), and any tensor that is neither 2-D nor an expert stack (norms, biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import gguf
import numpy as np

from jquant.qarray import QArray, from_codes

Q = gguf.GGMLQuantizationType
_QK_K = 256  # elements of a K-quant super-block


class Blocks(NamedTuple):
    """One tensor's ggml blocks decoded into QArray parts, per block (``n`` blocks)."""

    qtype: str  # jquant format of the codes
    group_size: int
    codes: np.ndarray  # (n, block) integer codes
    scale: np.ndarray  # (n, groups per block) float; int8 sub-scale codes when `super` is set
    zero_point: np.ndarray | None  # (n, groups per block) float32, or None (symmetric)
    super_scale: np.ndarray | None = None  # (n, 1) float16: the scale is `scale` × this


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes as (n, 1) float16 (the block's little-endian half)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float16)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """ggml's 4-bit layout: each run of `run` bytes holds ``2 * run`` codes, byte j element j
    in its low nibble and element ``j + run`` in its high nibble. (n, bytes) -> (n, codes)."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, run) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0xF)).reshape(n, -1)


def _bits(words: np.ndarray, count: int) -> np.ndarray:
    """Bits 0..count-1 of each little-endian word: (n, 1) -> (n, count) uint8."""
    return ((words >> np.arange(count, dtype=words.dtype)) & 1).astype(np.uint8)


def _affine(codes, s, b, qtype, group_size) -> Blocks:
    """``w = s·q + b`` per group as ``(q − z)·s``, z = −b/s; constant groups (s == 0) exactly."""
    s, b = s.astype(np.float32), b.astype(np.float32)
    flat = s == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(flat, np.float32(-1), -b / s).astype(np.float32)
    codes = np.where(np.repeat(flat, group_size, axis=1), 0, codes.reshape(len(s), -1))
    return Blocks(qtype, group_size, codes, np.where(flat, b, s), z)


def _q8_0(b):
    return Blocks("int8", 32, b[:, 2:34].view(np.int8), _f16(b[:, :2]), None)


def _q4_0(b):
    return Blocks("int4", 32, _nibbles(b[:, 2:18], 16).astype(np.int8) - 8, _f16(b[:, :2]), None)


def _q5_0(b):
    q = _nibbles(b[:, 6:22], 16) | (_bits(b[:, 2:6].copy().view("<u4"), 32) << 4)
    return Blocks("int5", 32, q.astype(np.int8) - 16, _f16(b[:, :2]), None)


def _q4_1(b):
    return _affine(_nibbles(b[:, 4:20], 16), _f16(b[:, :2]), _f16(b[:, 2:4]), "uint4", 32)


def _q5_1(b):
    q = _nibbles(b[:, 8:24], 16) | (_bits(b[:, 4:8].copy().view("<u4"), 32) << 4)
    return _affine(q, _f16(b[:, :2]), _f16(b[:, 2:4]), "uint5", 32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit scales and mins of a Q4_K/Q5_K super-block from its 12 bytes."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    d, dmin = _f16(b[:, :2]).astype(np.float32), _f16(b[:, 2:4]).astype(np.float32)
    sc, m = _scale_min_k4(b[:, 4:16])
    return _affine(_nibbles(b[:, 16:144], 32), d * sc, -(dmin * m), "uint4", 32)


def _q5_k(b):
    d, dmin = _f16(b[:, :2]).astype(np.float32), _f16(b[:, 2:4]).astype(np.float32)
    sc, m = _scale_min_k4(b[:, 4:16])
    qh = b[:, 16:48].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = _nibbles(b[:, 48:176], 32) | ((qh & 1).reshape(-1, _QK_K) << 4)
    return _affine(q, d * sc, -(dmin * m), "uint5", 32)


def _q2_k(b):
    d, dmin = _f16(b[:, 80:82]).astype(np.float32), _f16(b[:, 82:84]).astype(np.float32)
    sc = b[:, :16]
    shift = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((b[:, 16:80].reshape(-1, 2, 1, 32) >> shift) & 3).reshape(-1, _QK_K)
    s, mn = (sc & 0xF).astype(np.float32), (sc >> 4).astype(np.float32)
    return _affine(q, d * s, -(dmin * mn), "uint2", 16)


def _q3_k(b):
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    lo = scales[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)
    hi = scales[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    sc = (lo.reshape(-1, 16) & 0xF) | ((hi.reshape(-1, 16) & 3) << 4)
    low = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    high = hmask.reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    q = (low.reshape(-1, _QK_K) & 3).astype(np.int8) - (((high.reshape(-1, _QK_K) & 1) ^ 1)
                                                         << 2).astype(np.int8)  # fmt: skip
    return Blocks("int3", 16, q, sc.astype(np.int8) - 32, None, _f16(b[:, 108:110]))


def _q6_k(b):
    ql = _nibbles(b[:, :128], 64)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1)  # fmt: skip
    q = (ql | ((qh & 3).reshape(-1, _QK_K) << 4)).astype(np.int8) - 32
    return Blocks("int6", 16, q, b[:, 192:208].view(np.int8), None, _f16(b[:, 208:210]))


#: ggml types kept packed, and the decoder of each one's blocks.
PACKED_TYPES: dict[Q, Callable[[np.ndarray], Blocks]] = {
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q5_0: _q5_0, Q.Q4_1: _q4_1, Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}  # fmt: skip


def qarray_from_blocks(raw: np.ndarray, ggml_type: Q, shape: tuple[int, ...], *,
                       rows: Callable[[np.ndarray], np.ndarray] | None = None,
                       embedding: bool = False, name: str = "tensor") -> QArray:  # fmt: skip
    """The QArray of a (rows, cols) matrix, or an (E, rows, cols) stack of them, stored as ggml
    blocks of `ggml_type`.

    Args:
      raw: the tensor's bytes as stored (uint8, any shape).
      ggml_type: one of `PACKED_TYPES`.
      shape: ``(rows, cols)`` or ``(E, rows, cols)``, slowest first (HF's ``(out, in)``,
        ``(vocab, hidden)``, an expert stack's ``(E, out, in)``).
      rows: a permutation of a matrix's rows (applied to codes, scales and zero points
        alike), e.g. `jquant.io.gguf.unpermute_rope_rows`; None keeps the file's order.
      embedding: make an embedding table (logical ``(rows, cols)``, ``axis=-1``) instead of a
        linear kernel (logical ``(cols, rows)``, ``axis=-2``; a stack's ``(E, cols, rows)``).
      name: what errors call the tensor.

    Returns:
      A QArray (float32 ``dtype``) whose ``dequantize()`` is the matrix, or the stack of each
      matrix's transpose (see the module docstring for which types are exact).

    Raises:
      ValueError: naming `name`, for a type not in `PACKED_TYPES`, a row that is not whole
        blocks, or a byte count that does not match `shape`.
    """
    if ggml_type not in PACKED_TYPES:
        raise ValueError(f"{name}: ggml type {Q(ggml_type).name} cannot be kept packed; "
                         f"packed types: {', '.join(t.name for t in PACKED_TYPES)}")  # fmt: skip
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    *lead, k = shape
    n = math.prod(lead)
    if k % block:
        raise ValueError(f"{name}: rows of {k} elements are not whole {ggml_type.name} blocks "
                         f"of {block}")  # fmt: skip
    want = n * k // block * type_size
    if raw.size != want:
        raise ValueError(f"{name}: {raw.size} bytes for a {ggml_type.name} tensor of shape "
                         f"{shape}, which takes {want}; the file is corrupt")  # fmt: skip
    parts = PACKED_TYPES[ggml_type](np.ascontiguousarray(raw, np.uint8).reshape(-1, type_size))
    perm = rows or (lambda a: a)

    def per_row(a):
        return None if a is None else perm(np.ascontiguousarray(a).reshape(*lead, -1))

    scale = per_row(parts.scale)
    if parts.super_scale is not None:  # two-level: int8 sub-scales times a float16 per block
        scale = from_codes(scale, per_row(parts.super_scale), qtype="int8", axis=-1,
                           group_size=block // parts.group_size, dtype=np.float32)  # fmt: skip
    return from_codes(per_row(parts.codes), scale, per_row(parts.zero_point), qtype=parts.qtype,
                      axis=-1 if embedding else -2, group_size=parts.group_size,
                      dtype=np.float32)  # fmt: skip
