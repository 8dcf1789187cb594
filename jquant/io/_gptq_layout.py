"""GPTQ and AWQ (GEMM) tensor layouts <-> jquant codes, scales and zero points (NumPy only).

A quantized linear of ``in`` inputs and ``out`` outputs, ``G`` groups of ``group_size``
consecutive inputs (the last may be short), ``b`` bits:

GPTQ (GPTQModel / AutoGPTQ, ``checkpoint_format`` ``"gptq"`` = v1, ``"gptq_v2"`` = v2)
  ``qweight`` int32 ``[ceil(in·b/32), out]``: codes packed along the input axis;
  ``qzeros`` int32 ``[G, ceil(out·b/32)]``: zero points packed along the output axis;
  ``scales`` ``[G, out]`` (float16; bfloat16 or float32 also read); ``g_idx`` int32
  ``[in]``, the group of each input: ``arange(in) // group_size``, or with act-order
  (``desc_act``) any assignment of ``group_size`` inputs to each group (the last: what is
  left), which jquant holds as the QArray's ``perm`` (`jquant._perm`).
  Both packings are `jquant.io._int32_pack`'s little-endian bit stream (3-bit codes straddle
  words). ``w = (q − z)·s``; v2 stores ``z``, v1 stores ``z − 1`` in each field. v1 is read
  field by field as AutoGPTQ's, ExLlama's and vLLM's v1 kernels read it (``z = field + 1``,
  so ``z`` lies in ``[1, 2^b]``); GPTQModel's own v1 <-> v2 conversion instead adds
  ``0x11111111``-style constants to whole words (or wraps each field mod ``2^b``), which
  agrees with this wherever ``1 ≤ z ≤ 2^b − 1`` and a zero point of 0 is not written.
AWQ GEMM (AutoAWQ / llm-awq, ``version: "gemm"``, 4-bit)
  ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[G, out/8]``, both packed along
  the output axis, the 8 codes of a word in the order ``AWQ_ORDER`` (word nibble ``i``,
  lowest first, holds output ``8·j + AWQ_ORDER[i]``); ``scales`` ``[G, out]``; ``z`` as stored.

jquant's side is the storage layout of `jquant.qarray`: codes ``(out, in)``, scale and zero
point ``(out, G)``, ``w = (q − zero_point)·scale`` per group along ``in``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jquant import _perm

from ._int32_pack import pack_int32, packed_words, unpack_int32

# Scale dtypes read as they are stored (newer bfloat16 checkpoints store bfloat16 scales).
_SCALE_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32))

__all__ = ["AWQ_ORDER", "GPTQ_BITS", "awq_to_codes", "codes_to_gptq", "gptq_to_codes"]

GPTQ_BITS = (2, 3, 4, 8)
# AutoAWQ's `AWQ_ORDER`: nibble i of a packed word holds output column 8·j + AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def num_groups(n_in: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-n_in // group_size)


def trivial_g_idx(n_in: int, group_size: int | None) -> np.ndarray:
    """The ``g_idx`` of groups of consecutive inputs (no act-order permutation)."""
    return _perm.to_g_idx(None, n_in, group_size)


def _need(name: str, array: np.ndarray, shape: tuple[int, ...], dtypes: tuple, what: str) -> None:
    if tuple(array.shape) != shape:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}, expected {shape} ({what}); the file "
            "does not match its quantization config"
        )
    if array.dtype not in dtypes:
        raise ValueError(
            f"{name} has dtype {array.dtype}, expected {' or '.join(map(str, dtypes))} ({what})"
        )


def _unpack(name: str, words: np.ndarray, bits: int, n: int, axis: int) -> np.ndarray:
    try:
        return unpack_int32(words, bits, n, axis=axis)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def gptq_to_codes(
    prefix: str, parts: dict[str, np.ndarray], *, bits: int, group_size: int | None,
    version: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """``(codes (out, in) uint8, scale (out, G), zero_point (out, G) float16, perm)`` of the
    GPTQ module ``prefix`` whose ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` are
    ``parts``: the codes in the file's (logical) input order, and ``perm`` the int32 order
    that sorts the inputs by group (`jquant._perm.from_g_idx`), None for a trivial or
    absent ``g_idx``.

    ``in`` is taken from ``g_idx`` (or from ``qweight``'s rows when there is none),
    ``out`` from ``scales``. Scales keep their stored dtype.

    Raises:
      ValueError: a part missing or of the wrong shape or dtype, bits outside `GPTQ_BITS`, or
        a ``g_idx`` with a group index out of range or a group of another size than
        ``group_size``, each naming the tensor.
    """
    if bits not in GPTQ_BITS:
        raise ValueError(f"{prefix}: GPTQ bits={bits!r} is not supported; jquant reads {GPTQ_BITS}")
    qweight, qzeros, scales = _three_parts(prefix, parts, "a GPTQ")
    if scales.ndim != 2:
        raise ValueError(f"{prefix}.scales has shape {tuple(scales.shape)}, expected (G, out)")
    n_out = scales.shape[1]
    g_idx = parts.get("g_idx")
    has_g_idx = g_idx is not None and g_idx.ndim == 1
    n_in = g_idx.shape[0] if has_g_idx else qweight.shape[0] * 32 // bits
    groups = num_groups(n_in, group_size)
    ints = (np.dtype(np.int32), np.dtype(np.uint32))
    _need(f"{prefix}.qweight", qweight, (packed_words(n_in, bits), n_out), ints,
          f"{n_in} inputs × {n_out} outputs of {bits} bits packed along the inputs")  # fmt: skip
    _need(f"{prefix}.qzeros", qzeros, (groups, packed_words(n_out, bits)), ints,
          f"{groups} groups × {n_out} zero points of {bits} bits packed along the outputs")
    _need(f"{prefix}.scales", scales, (groups, n_out),
          _SCALE_DTYPES, f"{groups} groups × {n_out} outputs")  # fmt: skip
    perm = None
    if g_idx is not None:
        _need(f"{prefix}.g_idx", g_idx, (n_in,), ints + (np.dtype(np.int64),), "one per input")
        perm = _perm.from_g_idx(g_idx, n_in, group_size, f"{prefix}.g_idx")
    codes = _unpack(f"{prefix}.qweight", qweight, bits, n_in, axis=0).T  # (out, in)
    zeros = _unpack(f"{prefix}.qzeros", qzeros, bits, n_out, axis=1).T.astype(np.float16)
    if version == 1:
        zeros += 1
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales.T), zeros, perm


def _three_parts(prefix: str, parts: dict[str, np.ndarray], module: str):
    """``parts``' qweight, qzeros and scales; ValueError naming the first one missing."""
    for part in ("qweight", "qzeros", "scales"):
        if part not in parts:
            raise ValueError(f"{prefix}.{part} is missing ({module} module needs qweight, "
                             "qzeros and scales)")  # fmt: skip
    return parts["qweight"], parts["qzeros"], parts["scales"]


def awq_to_codes(
    prefix: str, parts: dict[str, np.ndarray], *, group_size: int | None, bits: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes (out, in) uint8, scale (out, G), zero_point (out, G) float16)`` of the AWQ
    GEMM module ``prefix`` whose ``qweight``, ``qzeros`` and ``scales`` are ``parts``.

    Raises:
      ValueError: a part missing or of the wrong shape or dtype, or bits other than 4.
    """
    if bits != 4:
        raise ValueError(f"{prefix}: AWQ GEMM bits={bits!r} is not supported; jquant reads 4")
    qweight, qzeros, scales = _three_parts(prefix, parts, "an AWQ")
    if scales.ndim != 2 or qweight.ndim != 2:
        raise ValueError(f"{prefix}: scales {tuple(scales.shape)} and qweight "
                         f"{tuple(qweight.shape)} must both be 2-D")  # fmt: skip
    n_in, n_out = qweight.shape[0], scales.shape[1]
    if n_out % 8:
        raise ValueError(f"{prefix}.scales has {n_out} outputs, not a multiple of 8 (AWQ GEMM)")
    groups = num_groups(n_in, group_size)
    ints = (np.dtype(np.int32), np.dtype(np.uint32))
    _need(f"{prefix}.qweight", qweight, (n_in, n_out // 8), ints,
          f"{n_in} inputs × {n_out} outputs of 4 bits packed along the outputs")  # fmt: skip
    _need(f"{prefix}.qzeros", qzeros, (groups, n_out // 8), ints,
          f"{groups} groups × {n_out} zero points of 4 bits packed along the outputs")
    _need(f"{prefix}.scales", scales, (groups, n_out),
          _SCALE_DTYPES, f"{groups} groups × {n_out} outputs")  # fmt: skip
    order = np.argsort(AWQ_ORDER)  # output 8·j + c sits in nibble argsort(AWQ_ORDER)[c]

    def unpack(name: str, words: np.ndarray) -> np.ndarray:
        fields = _unpack(name, words, 4, n_out, axis=1).reshape(-1, n_out // 8, 8)
        return fields[..., order].reshape(-1, n_out)

    codes = unpack(f"{prefix}.qweight", qweight).T  # (out, in)
    zeros = unpack(f"{prefix}.qzeros", qzeros).T.astype(np.float16)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales.T), zeros


def codes_to_gptq(
    codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *, bits: int,
    group_size: int | None, version: int, perm: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """GPTQ ``qweight``, ``qzeros``, ``scales`` (float16) and ``g_idx`` of jquant codes
    ``(out, in)`` in logical input order with integer zero points ``(out, G)`` (v2: in
    ``[0, 2^b − 1]``; v1: in ``[1, 2^b]``, stored minus one), the inverse of `gptq_to_codes`:
    ``g_idx`` is that of ``perm`` (None: trivial). The caller checks the zero points' range;
    scales are cast to float16 as given."""
    n_out, n_in = codes.shape
    zeros = np.asarray(zero_point, np.float64).astype(np.int64) - (1 if version == 1 else 0)
    return {
        "qweight": pack_int32(np.asarray(codes).T, bits, axis=0),
        "qzeros": pack_int32(zeros.T, bits, axis=1),
        "scales": np.ascontiguousarray(np.asarray(scale).T.astype(np.float16)),
        "g_idx": _perm.to_g_idx(perm, n_in, group_size),
    }
