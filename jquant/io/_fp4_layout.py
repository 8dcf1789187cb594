"""FP4 E2M1 tensors as other libraries store them, to and from jquant's ``mxfp4`` / ``nvfp4``.

Both layouts below put two E2M1 codes in a byte, the *low* nibble first: byte ``j`` of a row
holds element ``2j`` in bits 0-3 and element ``2j + 1`` in bits 4-7. A code is jquant's own
E2M1 code (bit 3 the sign, bits 0-2 the magnitude index into 0, 0.5, 1, 1.5, 2, 3, 4, 6;
``jquant.qtypes``), so codes pass through unchanged.

* compressed-tensors ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``: ``weight_packed``
  uint8 ``(out, in/2)``; ``weight_scale`` float8_e4m3fn ``(out, in/16)`` (NVFP4) or uint8
  biased exponents ``(out, in/32)`` (MXFP4, E8M0: ``2**(e - 127)``); NVFP4 adds
  ``weight_global_scale`` float32 ``(1,)``, the *reciprocal* of jquant's per-tensor scale:
  the library dequantizes ``w = e2m1 · (e4m3 / global_scale)``, jquant
  ``w = e2m1 · (e4m3 · tensor_scale)``. The two convert by a float32 reciprocal, as the
  library's own ModelOpt converter does (``1 / weight_scale_2``); see `tensor_scale_of` and
  `global_scale_of` for exactly what that keeps.
* OpenAI gpt-oss MXFP4 (the MoE experts' ``*_blocks`` / ``*_scales``): ``blocks`` uint8
  ``(..., N, G, 16)`` (32 codes per block of 32 inputs), ``scales`` uint8 ``(..., N, G)``
  biased E8M0 exponents; transformers' ``convert_moe_packed_tensors`` dequantizes them to
  ``(..., K, N)`` with ``K = 32·G``, i.e. a kernel ``(in, out)`` whose rows are the inputs.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jquant.qarray import QArray, from_codes

_E8M0_NAN = 255  # the one E8M0 code that is not a power of two


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 codes ``(..., 2·B)`` of bytes ``(..., B)``, the low nibble first."""
    packed = np.asarray(packed, np.uint8)
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """The inverse of `unpack_nibbles`: codes ``(..., 2·B)`` in [0, 16) as bytes ``(..., B)``."""
    codes = np.asarray(codes, np.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e8m0_of_exponents(exponents: np.ndarray, name: str) -> np.ndarray:
    """Biased E8M0 exponents (uint8) as float8_e8m0fnu, refusing 255 (NaN in E8M0) by ``name``."""
    exponents = np.asarray(exponents, np.uint8)
    if exponents.size and exponents.max() == _E8M0_NAN:
        raise ValueError(f"{name} holds the E8M0 code 255 (NaN, no power of two) at "
                         f"{np.argwhere(exponents == _E8M0_NAN)[0].tolist()}")  # fmt: skip
    return exponents.view(ml_dtypes.float8_e8m0fnu)


def tensor_scale_of(global_scale, name: str) -> np.float32:
    """jquant's NVFP4 per-tensor scale for compressed-tensors' ``weight_global_scale``
    ``gs``: the float32 reciprocal ``fl(1/gs)`` (correctly rounded, as float32 division is).

    Each block scale ``fl(e4m3 · fl(1/gs))`` is then within 1 float32 ulp of the library's
    ``fl(e4m3 / gs)`` (often equal), so a dequantized value rounded to bfloat16 is equal or
    1 bfloat16 ulp apart. ValueError (naming ``name``) unless ``gs`` is one positive finite
    float32."""
    gs = np.asarray(global_scale)
    if gs.size != 1 or gs.dtype != np.float32 or not (np.isfinite(gs).all() and gs > 0).all():
        raise ValueError(f"{name} must be one positive finite float32 value, got "
                         f"{gs.dtype} of shape {gs.shape}: {gs.ravel()[:4]}")  # fmt: skip
    return np.float32(1) / gs.reshape(()).astype(np.float32)


def global_scale_of(tensor_scale) -> np.float32:
    """compressed-tensors' ``weight_global_scale`` for jquant's NVFP4 per-tensor scale ``g``:
    a float32 ``gs`` whose reciprocal rounds back to ``g`` (so `tensor_scale_of` gives ``g``
    again) — ``fl(1/g)`` when it does, else the nearest float32 within 2 ulps of it that does;
    ``fl(1/g)`` when none does (about one ``g`` in eight: reading it back gives a ``g`` 1 ulp
    away)."""
    g = np.float32(np.asarray(tensor_scale).reshape(()))
    first = np.float32(1) / g
    candidates = [first]
    for toward in (np.float32(np.inf), np.float32(0)):
        c = first
        for _ in range(2):
            c = np.nextafter(c, toward, dtype=np.float32)
            candidates.append(c)
    exact = [c for c in candidates if np.float32(1) / c == g]
    return min(exact, key=lambda c: abs(float(c) - 1.0 / float(g))) if exact else first


def from_gpt_oss(blocks, scales, *, dtype=ml_dtypes.bfloat16, name: str = "blocks"):
    """A jquant ``mxfp4`` QArray of gpt-oss MXFP4 ``blocks (..., N, G, 16)`` and
    ``scales (..., N, G)`` (uint8 both).

    Its logical shape is ``(..., K, N)`` with ``K = 32·G`` (storage ``(..., N, K)``), what
    transformers' ``convert_moe_packed_tensors`` dequantizes them to; ``dtype`` is what
    ``dequantize()`` returns (bfloat16, that function's default). Dequantized, the two agree
    bit for bit except for values or scales below float32's smallest normal (2**-126): XLA on
    CPU flushes them to zero (a block with E8M0 code 0, 2**-127, dequantizes to zeros) where
    torch keeps them subnormal.

    >>> q = from_gpt_oss(np.zeros((4, 2, 16), np.uint8), np.full((4, 2), 127, np.uint8))
    >>> q.shape, q.qtype
    ((64, 4), 'mxfp4')

    Raises:
      ValueError: shapes that do not agree or are not uint8, or an E8M0 code 255, naming
        ``name``.
    """
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if (blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.ndim < 3
            or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape):  # fmt: skip
        raise ValueError(f"{name}: gpt-oss MXFP4 needs uint8 blocks (..., N, G, 16) and uint8 "
                         f"scales (..., N, G); got blocks {blocks.dtype} {blocks.shape}, scales "
                         f"{scales.dtype} {scales.shape}")  # fmt: skip
    codes = unpack_nibbles(blocks.reshape(*blocks.shape[:-2], -1))
    scale = e8m0_of_exponents(scales, f"{name} scales")
    return from_codes(codes, scale, qtype="mxfp4", axis=-2, group_size=32, dtype=dtype)


def to_gpt_oss(q: QArray) -> tuple[np.ndarray, np.ndarray]:
    """``(blocks, scales)`` of an ``mxfp4`` QArray ``q`` (logical ``(..., K, N)``) in gpt-oss'
    layout: the inverse of `from_gpt_oss`. ValueError for any other QArray."""
    if q.qtype != "mxfp4" or q.axis != -2 or q.ndim < 2 or q.perm is not None:
        raise ValueError(f"to_gpt_oss takes an mxfp4 QArray with its contraction axis -2 and no "
                         f"input permutation, got {q.qtype} of shape {q.shape}, axis {q.axis}"
                         f"{'' if q.perm is None else ', a perm'}")  # fmt: skip
    codes = np.asarray(q.codes())
    blocks = pack_nibbles(codes).reshape(*codes.shape[:-1], q.num_groups, 16)
    scale = np.broadcast_to(np.asarray(q.scale), (*codes.shape[:-1], q.num_groups))
    return blocks, np.ascontiguousarray(scale).view(np.uint8)
