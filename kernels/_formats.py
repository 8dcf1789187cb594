"""Storage formats the kernels consume: qtypes, nibble order, group geometry, code decoding.

Terminology used across `kernels/`:

* **group**: `group_size` consecutive elements along K that share one scale (and zero
  point). The last group is short when `group_size` does not divide K. Per-channel
  quantization is one group of length K (`group_size=None`, or any value >= K).
* **plane**: packed 4-bit storage (int4, uint4, nf4 and the FP4 E2M1 formats mxfp4 and
  nvfp4) is read as two byte-aligned planes, the low nibbles and the high nibbles of
  `qvalue`. Plane p, byte b holds one element of W; `plane_indices`
  says which. 8-bit formats have a single plane (the bytes themselves).
* **block**: the tile of a kernel's grid (`block_m`, `block_n`, `block_k`), counted in
  elements of K for `block_k`. Blocks always hold whole groups, so no block straddles a
  scale boundary.

Kernels never reorder the weight: they reorder the (much smaller) activations instead, so
that activation column `plane_indices(...)[p][b]` meets weight plane p, byte b.

Only jax and numpy are imported here: `kernels/` must stay a leaf of jquant.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

# The 16 QLoRA NormalFloat-4 values, indexed by code.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# The 16 FP4 E2M1 values (OCP MX v1.0), indexed by code: bit 3 the sign, bits 0-2 the
# magnitude (exponent bits 1-2, mantissa bit 0). Codes 0 and 8 are +0 and -0.
FP4_E2M1_VALUES = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

# qtype -> storage dtype of `qvalue`.
STORAGE_DTYPES = {
    "int8": jnp.dtype(jnp.int8),
    "fp8_e4m3": jnp.dtype(jnp.float8_e4m3fn),
    "fp8_e5m2": jnp.dtype(jnp.float8_e5m2),
    "int4": jnp.dtype(jnp.uint8),
    "uint4": jnp.dtype(jnp.uint8),
    "nf4": jnp.dtype(jnp.uint8),
    "mxfp4": jnp.dtype(jnp.uint8),
    "nvfp4": jnp.dtype(jnp.uint8),
}
QTYPES = tuple(STORAGE_DTYPES)
PACKED_QTYPES = frozenset({"int4", "uint4", "nf4", "mxfp4", "nvfp4"})
# 4-bit formats whose code indexes a table of 16 values. The FP4 formats differ only in
# their scales (mxfp4: E8M0 powers of two, nvfp4: E4M3 times a per-tensor float), which
# reach the kernels already converted to float (`jquant._dispatch`).
CODEBOOKS = {"nf4": NF4_CODEBOOK, "mxfp4": FP4_E2M1_VALUES, "nvfp4": FP4_E2M1_VALUES}
ZERO_POINT_QTYPES = frozenset({"uint4"})
SCALE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def is_per_channel(k: int, group_size: int | None) -> bool:
    """One group spans all of K (a group size >= K means the same thing)."""
    return group_size is None or group_size >= k


def group_runs(k: int, group_size: int | None) -> list[tuple[int, int, int]]:
    """(start, length, count) runs of equal-length groups along K: the whole groups, then
    the short last one if `group_size` does not divide K. Per-channel is one run of one."""
    if is_per_channel(k, group_size):
        return [(0, k, 1)]
    full, tail = divmod(k, group_size)
    return [(0, group_size, full)] + ([(full * group_size, tail, 1)] if tail else [])


def group_starts_and_lengths(k: int, group_size: int | None) -> list[tuple[int, int]]:
    """(start, length) of every group along K; only the last one may be short."""
    return [(start + i * length, length) for start, length, count in group_runs(k, group_size)
            for i in range(count)]


def num_groups(k: int, group_size: int | None) -> int:
    """Groups along K: ceil(K / group_size), one when per-channel."""
    return 1 if is_per_channel(k, group_size) else -(-k // group_size)


def bit_planes(bits: int) -> tuple[int, ...]:
    """Widths of the planes a sub-byte code is stored in, its low bits first.

    4/2/1-bit codes are one plane; the others are split into power-of-two planes, widest
    first: 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1 (bits 0-3 of a 6-bit code in a
    4-bit plane, bits 4-5 in a 2-bit plane).
    """
    if bits >= 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


def pack_width(bits: int) -> int:
    """Codes per packing unit of a `bits`-wide format (a group size must be a multiple).

    A plane of w-bit codes fills a byte with 8 // w of them, so a format packs in units of
    8 // (its narrowest plane): 4-bit in pairs, 2- and 6-bit in fours, 1-, 3- and 5-bit in
    eights; byte-wide formats in units of 1.
    """
    if bits >= 8:
        return 1
    return 8 // min(bit_planes(bits))


def packed_group_bytes(length: int, bits: int) -> int:
    """Bytes of one group of `length` codes, padded with zero codes to the pack width."""
    if bits >= 8:
        return length
    width = pack_width(bits)
    return -(-length // width) * width * bits // 8


def packed_length(k: int, bits: int, group_size: int | None) -> int:
    """Length of `qvalue`'s last axis for K codes of `bits` bits, packed per group."""
    if bits >= 8:
        return k
    return sum(count * packed_group_bytes(length, bits)
               for _, length, count in group_runs(k, group_size))


def pad_rows(a: jnp.ndarray, rows: int) -> jnp.ndarray:
    """`a` with zero rows appended up to `rows` (itself when it has them already)."""
    return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def next_pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << (max(v, 1) - 1).bit_length()


def floor_pow2(v: int) -> int:
    """The largest power of two <= v (1 for v <= 1)."""
    return 1 << (max(v, 1).bit_length() - 1)


def group_bytes(qtype: str, k: int, group_size: int | None) -> int | None:
    """Bytes of one group in one plane (4-bit: half the group), None when per-channel."""
    if is_per_channel(k, group_size):
        return None
    return group_size // 2 if qtype in PACKED_QTYPES else group_size


def packed_k(qtype: str, k: int, group_size: int | None) -> int:
    """Length of `qvalue`'s last axis: K for 8-bit formats, sum of ceil(L/2) for 4-bit."""
    return packed_length(k, 4 if qtype in PACKED_QTYPES else 8, group_size)


@functools.lru_cache(maxsize=256)
def plane_indices(qtype: str, k: int, group_size: int | None) -> tuple[np.ndarray, ...]:
    """Element index (into K) held by each byte of each plane, K meaning "padding code".

    Returns one int32 array of length `packed_k` per plane. Packing is per group: a group
    of L elements (L rounded up to even) has its element j in the low nibble of its byte
    j, and element j + L/2 in the high nibble.
    """
    if qtype not in PACKED_QTYPES:
        return (np.arange(k, dtype=np.int32),)
    low, high = [], []
    for start, length in group_starts_and_lengths(k, group_size):
        half = (length + 1) // 2
        j = np.arange(half)
        low.append(start + j)
        high.append(np.where(half + j < length, start + half + j, k))
    return (np.concatenate(low).astype(np.int32), np.concatenate(high).astype(np.int32))


@functools.lru_cache(maxsize=256)
def byte_groups(qtype: str, k: int, group_size: int | None) -> np.ndarray:
    """Group index of every byte of `qvalue`'s last axis (the same for both planes)."""
    groups = np.zeros(packed_k(qtype, k, group_size), np.int32)
    pos = 0
    for t, (_, length) in enumerate(group_starts_and_lengths(k, group_size)):
        n = packed_group_bytes(length, 4 if qtype in PACKED_QTYPES else 8)
        groups[pos:pos + n] = t
        pos += n
    return groups


def code_planes(qvalue: jnp.ndarray, qtype: str) -> tuple[jnp.ndarray, ...]:
    """Split storage into planes of raw codes: int32 nibbles for 4-bit, as stored otherwise.

    Works on jnp arrays and inside Pallas kernels alike (bitwise ops on int32 only, since
    sub-32-bit integer vector ops are the least portable part of Mosaic).
    """
    if qtype not in PACKED_QTYPES:
        return (qvalue,)
    b = qvalue.astype(jnp.int32)
    return (b & 0xF, (b >> 4) & 0xF)


def codebook_select(codes: jnp.ndarray, book) -> jnp.ndarray:
    """``book[codes]`` in float32 as a tree of selects on the code's bits (``len(book)`` a
    power of two): TPU vector units have no gather, and XLA:CPU vectorizes selects where
    it runs a gather element by element. Works on any integer dtype of ``codes``."""
    vals = [np.float32(v) for v in book]
    bit = 0
    while len(vals) > 1:
        on = (codes & (1 << bit)) != 0
        vals = [jnp.where(on, vals[i + 1], vals[i]) for i in range(0, len(vals), 2)]
        bit += 1
    return vals[0]


def decode(codes: jnp.ndarray, qtype: str) -> jnp.ndarray:
    """Raw codes of one plane (any integer dtype) -> float32 values before scale and zero
    point."""
    if qtype == "int4":
        return (codes ^ 8).astype(jnp.float32) - 8.0  # two's complement nibble
    if qtype in CODEBOOKS:
        return codebook_select(codes, CODEBOOKS[qtype])
    return codes.astype(jnp.float32)


def split_activations(x: jnp.ndarray, qtype: str, k: int, group_size: int | None,
                      kb: int | None = None) -> list[jnp.ndarray]:
    """Reorder x (M, K) into planes (M, Kbytes) matching `plane_indices`, first `kb` bytes.

    Whole groups are split with a reshape (a strided copy of x that XLA fuses); only a
    short last group or an odd per-channel K needs a gather. Padding positions read zeros.
    """
    kbytes = packed_k(qtype, k, group_size)
    kb = kbytes if kb is None else kb
    if qtype not in PACKED_QTYPES:
        return [x[:, :kb]]
    m = x.shape[0]
    per_channel = is_per_channel(k, group_size)
    if per_channel and k % 2 == 0:
        return [x[:, :kb], x[:, k // 2:k // 2 + kb]]
    if not per_channel and kb % (group_size // 2) == 0:
        full = kb // (group_size // 2) * group_size
        xg = x[:, :full].reshape(m, -1, 2, group_size // 2)
        return [xg[:, :, 0, :].reshape(m, kb), xg[:, :, 1, :].reshape(m, kb)]
    xpad = jnp.concatenate([x, jnp.zeros((m, 1), x.dtype)], axis=1)
    return [jnp.take(xpad, idx[:kb], axis=1) for idx in plane_indices(qtype, k, group_size)]


# ---- 4-bit weights in XLA: contract the two nibble planes separately -------------------
# A packed group of L codes is L/2 bytes: byte j holds element j (low nibble) and element
# j + L/2 (high nibble). Unpacking to element order needs a concatenation of the two halves
# that XLA:CPU does not fuse into the dequantize (it materialises them); instead x is split
# the same way (x_lo, x_hi: cheap) and each plane is decoded and dotted on its own:
# x @ w.T = x_lo @ lo.T + x_hi @ hi.T. Whole groups split with a reshape; a short last
# group (or an odd per-channel K, whose high half ends in a padding code that a zero column
# of x cancels) is its own run.


def split_planes(x: jnp.ndarray, k: int, group_size: int | None) -> list:
    """x (M, K) -> per run of equal groups ``(count, half, (x_lo, x_hi))``, each x plane
    ``(M, count * half)`` in the byte order of that run of a 4-bit ``qvalue``."""
    m = x.shape[0]
    out = []
    for start, length, count in group_runs(k, group_size):
        half = (length + 1) // 2
        xs = x[:, start:start + count * length]
        if length % 2:  # only a lone group (count == 1): pad its high half
            xs = jnp.pad(xs, ((0, 0), (0, 1)))
        xs = xs.reshape(m, count, 2, half)
        out.append((count, half, (xs[:, :, 0].reshape(m, -1), xs[:, :, 1].reshape(m, -1))))
    return out


def planes_dot(x_planes: list, qvalue: jnp.ndarray, scale: jnp.ndarray,
               zero_point: jnp.ndarray | None, qtype: str, dot) -> jnp.ndarray:
    """``x @ dequantize(W).T`` for a 4-bit ``qvalue`` (N, Kbytes), from `split_planes` of x.

    ``scale`` and ``zero_point`` are float32 ``(N or 1, G or 1)``; each decoded plane is
    cast to x's dtype and contracted by ``dot(x_plane (M, B), w_plane (N, B))``; the partial
    products of every plane and run are summed.
    """
    n = qvalue.shape[0]
    dtype = x_planes[0][2][0].dtype
    y = None
    offset = gi = 0
    for count, half, xs in x_planes:
        b = qvalue[:, offset:offset + count * half].reshape(n, count, half)

        def per_group(a, gi=gi, count=count):  # (N or 1, G or 1) -> (N or 1, count, 1)
            return a[:, :1, None] if a.shape[-1] == 1 else a[:, gi:gi + count, None]

        s = per_group(scale)
        z = None if zero_point is None else per_group(zero_point)
        for xp, codes in zip(xs, (b & 0xF, b >> 4)):
            v = decode(codes, qtype)
            v = ((v if z is None else v - z) * s).astype(dtype).reshape(n, count * half)
            d = dot(xp, v)
            y = d if y is None else y + d
        offset += count * half
        gi += count
    return y


_NT = (((1,), (1,)), ((), ()))


def dot_nt(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a (M, K) . b (N, K) -> (M, N) float32, for the XLA paths (not inside kernels).

    On CPU both operands are cast to float32 first: XLA:CPU computes 16-bit dots in f32
    anyway, and some bf16 x bf16 -> f32 dots have no CPU implementation at all
    ("Unsupported element type for DotThunk"). Products of 16-bit floats are exact in f32,
    so only the summation order can differ from the native 16-bit dot used elsewhere.
    """
    def native(a, b):
        return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)

    def upcast(a, b):
        return native(a.astype(jnp.float32), b.astype(jnp.float32))

    return lax.platform_dependent(a, b, cpu=upcast, default=native)
