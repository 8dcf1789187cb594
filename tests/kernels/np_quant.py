"""A NumPy quantizer and dequantizer written from the kernels' storage contract (not
jquant's quantizer), so the kernels are checked against the documented layout rather than
against the library. Shared by the kernel test files, which load it by path.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from jquant.kernels import NF4_CODEBOOK

_FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0), "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0)}
FP4 = ("mxfp4", "nvfp4")
PACKED = ("int4", "uint4", "nf4", *FP4)
# FP4 E2M1 by code, as ml_dtypes reads the 4 bits (OCP MX v1.0): not jquant's table.
_E2M1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def _e2m1_codes(v):
    """float -> E2M1 code (nearest, ties to even, saturating at +-6), by ml_dtypes."""
    return np.clip(v, -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8).astype(np.int8)


# nvfp4's per-tensor scale: a fixed power of two here (any float does), so block scales of
# standard-normal weights land mid-range in E4M3.
_NVFP4_TENSOR_SCALE = np.float32(2.0 ** -6)


def _groups(k, group_size):
    g = k if group_size is None or group_size >= k else group_size
    return [(s, min(g, k - s)) for s in range(0, k, g)]


def _quantize_group(block, qtype):
    """block (N, L) float32 -> codes (N, L), scale (N,), zero point (N,) or None."""
    amax = np.maximum(np.abs(block).max(axis=1), 1e-8)
    if qtype == "int8":
        s = amax / 127
        return np.clip(np.round(block / s[:, None]), -127, 127).astype(np.int8), s, None
    if qtype == "int4":
        s = amax / 7
        return np.clip(np.round(block / s[:, None]), -8, 7).astype(np.int8), s, None
    if qtype == "uint4":
        lo, hi = block.min(axis=1), block.max(axis=1)
        s = np.maximum(hi - lo, 1e-8) / 15
        zp = -lo / s  # float, generally not an integer
        return np.clip(np.round(block / s[:, None] + zp[:, None]), 0, 15).astype(np.int8), s, zp
    if qtype == "nf4":
        book = np.asarray(NF4_CODEBOOK, np.float32)
        codes = np.abs(block[..., None] / amax[:, None, None] - book).argmin(-1)
        return codes.astype(np.int8), amax, None
    if qtype == "mxfp4":  # OCP MX: scale 2**(floor(log2 amax) - 2), 2 = E2M1's emax
        s = np.exp2(np.floor(np.log2(amax)) - 2).astype(np.float32)
        return _e2m1_codes(block / s[:, None]), s, None
    if qtype == "nvfp4":  # E4M3 block scale of amax / 6, times a per-tensor float
        s = (amax / 6 / _NVFP4_TENSOR_SCALE).astype(ml_dtypes.float8_e4m3fn)
        s = s.astype(np.float32) * _NVFP4_TENSOR_SCALE
        return _e2m1_codes(block / s[:, None]), s, None
    dtype, fmax = _FP8[qtype]
    s = amax / fmax
    return (block / s[:, None]).astype(dtype), s, None


def _pack_nibbles(codes):
    """(N, L) codes in [-8, 15] -> (N, ceil(L/2)) uint8: element j low, j + L/2 high."""
    codes = codes.astype(np.uint8) & 0xF
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    half = codes.shape[1] // 2
    return codes[:, :half] | (codes[:, half:] << 4)


def quantize_np(w, qtype, group_size, scale_dtype=np.float32):
    """Float weight (K, N) -> (qvalue (N, Kbytes), scale (N, G), zero_point or None).

    FP4 scales come out as the floats the kernels take: mxfp4's power of two, nvfp4's E4M3
    block scale times its per-tensor scale."""
    k = w.shape[0]
    wt = np.asarray(w, np.float32).T
    qs, ss, zs = [], [], []
    for start, length in _groups(k, group_size):
        codes, s, zp = _quantize_group(wt[:, start:start + length], qtype)
        qs.append(_pack_nibbles(codes) if qtype in PACKED else codes)
        ss.append(s)
        zs.append(zp)
    qvalue = np.concatenate(qs, axis=1)
    scale = np.stack(ss, axis=1).astype(scale_dtype)
    zero_point = None if zs[0] is None else np.stack(zs, axis=1).astype(scale_dtype)
    return qvalue, scale, zero_point


def dequantize_np(qvalue, scale, zero_point, qtype, k, group_size):
    """Independent NumPy dequantization, element by group, for checking the jnp reference."""
    n = qvalue.shape[0]
    out = np.zeros((n, k), np.float32)
    pos = 0
    for t, (start, length) in enumerate(_groups(k, group_size)):
        if qtype in PACKED:
            nbytes = (length + 1) // 2
            b = qvalue[:, pos:pos + nbytes]
            codes = np.concatenate([b & 0xF, b >> 4], axis=1)[:, :length].astype(np.int32)
            pos += nbytes
            if qtype == "int4":
                codes = np.where(codes >= 8, codes - 16, codes)
            if qtype == "nf4":
                vals = np.asarray(NF4_CODEBOOK, np.float32)[codes]
            elif qtype in FP4:
                vals = _E2M1[codes]
            else:
                vals = codes.astype(np.float32)
        else:
            vals = qvalue[:, pos:pos + length].astype(np.float32)
            pos += length
        if zero_point is not None:
            vals = vals - zero_point[:, t:t + 1].astype(np.float32)
        out[:, start:start + length] = vals * scale[:, t:t + 1].astype(np.float32)
    return out.T


def grad_np(x, cot, qvalue, scale, zero_point, qtype, k, group_size):
    """Gradients of sum((x @ W) * cot) in float64: (d x, d scale[, d zero_point]).

    W = (v - zero_point) * scale with v the decoded codes, so dW/dscale = v - zero_point and
    dW/dzero_point = -scale, each summed over the group's elements.
    """
    x, cot = np.asarray(x, np.float64), np.asarray(cot, np.float64)
    w = dequantize_np(qvalue, scale, zero_point, qtype, k, group_size).astype(np.float64)
    unit = np.ones_like(scale)
    v = dequantize_np(qvalue, unit, zero_point, qtype, k, group_size).astype(np.float64)
    members = np.zeros((k, scale.shape[1]))  # element k -> its group
    for t, (start, length) in enumerate(_groups(k, group_size)):
        members[start:start + length, t] = 1.0
    dw = x.T @ cot  # (K, N)
    grads = [cot @ w.T, (v * dw).T @ members]
    if zero_point is not None:
        grads.append(-np.asarray(scale, np.float64) * (dw.T @ members))
    return tuple(grads)
