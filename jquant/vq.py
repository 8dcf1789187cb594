"""VQArray: a Dense kernel stored as indices into learned vector codebooks (``vq2``, ``vq3``).

Terminology
-----------
* **vector**: ``d = vector_dim`` consecutive weights of one output column along the
  contraction axis ``K`` of a kernel ``(K, N)``: rows ``j·d .. j·d + d - 1`` of column ``n``.
* **codebook**: ``E = 2 ** (bits · d)`` vectors of ``d`` values; a vector is stored as the
  index of one of them, so ``bits`` index bits per weight.
* **tile**: ``vector_tile = (tile_k, tile_n)`` rows × columns of the kernel that share one
  codebook; the kernel has ``Tk × Tn = (K / tile_k) × (N / tile_n)`` of them.

Storage layout
--------------
* ``qvalue``: the indices in the order of ``jquant.qarray``'s storage (contraction axis
  last): ``(N, K / d)``, index ``j`` of column ``n`` the ``j``-th vector of that column,
  packed as the ``uint{bits·d}`` codes of a per-channel QArray (``jquant._packing``).
* ``codebook``: int8 ``(Tk, Tn, E, d)``, entry ``e`` of the codebook of tile ``(tk, tn)``.
* ``codebook_scale``: bfloat16 ``(Tk, Tn)``, one per codebook.

The dequantization identity, for column ``n``, vector ``j`` and ``i < d``::

    w[j·d + i, n] = codebook[tk, tn, idx[n, j], i] · codebook_scale[tk, tn]
    with tk = (j·d) // tile_k, tn = n // tile_n, idx = unpack(qvalue)

Every stored byte counts in ``nbytes``: ``bits_per_weight = 8 · nbytes / (K · N)`` is the
index bits plus ``(8 · E · d + 16) / (tile_k · tile_n)`` for the codebooks and their scales
(2.133 for ``vq2``, 3.254 for ``vq3``). The tile, ``d`` and ``E`` are read from the
shapes, so a VQArray of any geometry dequantizes; the formats name the ones recipes use.

>>> import numpy as np
>>> idx = np.zeros((32, 32), np.uint8)  # N = 32 columns, K / d = 32 vectors each
>>> book = np.ones((1, 1, 16, 2), np.int8)
>>> q = from_indices(idx, book, np.ones((1, 1), jnp.bfloat16), qtype="vq2", k=64)
>>> q.shape, q.bits_per_weight
((64, 32), 2.1328125)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import qtypes
from jquant._packing import pack, packed_length, unpack
from jquant.qtypes import QType

CODEBOOK_DTYPE = np.dtype(np.int8)
CODEBOOK_SCALE_DTYPE = np.dtype(jnp.bfloat16)


def vector_format(qtype: str | QType) -> QType:
    """The vector format ``qtype`` names; ValueError naming the vector formats otherwise."""
    qt = qtypes.get(qtype)
    if qt.kind != "vector":
        raise ValueError(f"{qt.name} is not a vector format; vector formats: "
                         f"{', '.join(qtypes.VECTOR_QTYPES)}")  # fmt: skip
    return qt


def index_qtype(index_bits: int) -> str:
    """The uint format whose packing stores ``index_bits``-bit indices."""
    return f"uint{index_bits}"


def check_kernel(qtype: str | QType, shape, *, name: str = "weight") -> QType:
    """The format of ``qtype`` after checking that a kernel of ``shape`` takes it.

    Raises:
      ValueError: naming ``name``, for a shape that is not 2-D ``(K, N)``, ``K`` not a
        multiple of the vector length or of the tile's rows, or ``N`` not a multiple of its
        columns.
    """
    qt = vector_format(qtype)
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"{name}: {qt.name} quantizes 2-D Dense kernels (K, N); got shape "
                         f"{shape}")  # fmt: skip
    k, n = shape
    tk, tn = qt.vector_tile
    if k % qt.vector_dim:
        raise ValueError(f"{name}: K={k} is not a multiple of {qt.name}'s vector length "
                         f"{qt.vector_dim}")  # fmt: skip
    if k % tk or n % tn:
        raise ValueError(f"{name}: shape {shape} is not a whole number of {qt.name}'s codebook "
                         f"tiles {(tk, tn)} (K a multiple of {tk}, N of {tn})")  # fmt: skip
    return qt


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape)


def _nbytes_of(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class VQArray:
    """A vector-quantized Dense kernel ``(K, N)``; storage and identity in the module docstring.

    A pytree: ``qvalue``, ``codebook`` and ``codebook_scale`` are leaves, the rest static.
    ``jquant.ops`` multiplies by it (dequantized to the activation dtype, then a dot).

    Attributes:
      qvalue: packed indices ``(N, bytes)``.
      codebook: int8 ``(Tk, Tn, E, d)``.
      codebook_scale: bfloat16 ``(Tk, Tn)``.
      qtype: the format's name (``vq2``, ``vq3``), for reports.
      k: ``K``, the contraction length.
      dtype: the dtype ``dequantize()`` returns by default (the original's).
    """

    qvalue: jax.Array
    codebook: jax.Array
    codebook_scale: jax.Array
    qtype: str = dataclasses.field(metadata=dict(static=True), default="vq2")
    k: int = dataclasses.field(metadata=dict(static=True), default=0)
    dtype: Any = dataclasses.field(metadata=dict(static=True), default=np.dtype(np.float32))

    # Contraction axis and group size as QArray reports them: axis 0, no scalar groups.
    axis = -2
    group_size = None
    activation = None
    perm = None

    def __post_init__(self):
        leaves = (self.qvalue, self.codebook, self.codebook_scale)
        if all(isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)
               and not isinstance(x, jax.core.Tracer) for x in leaves):  # fmt: skip
            _check_parts(self)

    @property
    def vector_dim(self) -> int:
        return _shape_of(self.codebook)[-1]

    @property
    def index_bits(self) -> int:
        return int(_shape_of(self.codebook)[-2]).bit_length() - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, _shape_of(self.qvalue)[0])

    @property
    def ndim(self) -> int:
        return 2

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def format(self) -> QType:
        return qtypes.get(self.qtype)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed indices, codebooks and their scales."""
        return sum(_nbytes_of(x) for x in (self.qvalue, self.codebook, self.codebook_scale))

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size

    def __repr__(self) -> str:
        tiles = _shape_of(self.codebook)[:2]
        return (f"VQArray({self.qtype}, shape={self.shape}, {tiles[0]}x{tiles[1]} codebooks, "
                f"{self.bits_per_weight:.3f} bits/weight, dtype={np.dtype(self.dtype).name})")

    def indices(self) -> jax.Array:
        """Unpacked indices ``(N, K / d)``, uint8."""
        return unpack(self.qvalue, index_qtype(self.index_bits), self.k // self.vector_dim, None)

    def codebooks(self) -> jax.Array:
        """The codebooks as float32 ``(Tk, Tn, E, d)`` (int8 entries times their scale)."""
        return lookup_table(self.codebook, self.codebook_scale)

    def dequantize_stored(self, dtype=None) -> jax.Array:
        """Dequantized values ``(N, K)`` (contraction axis last)."""
        return gather(self.indices(), self.codebooks(), self.k).astype(dtype or self.dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """The dequantized kernel ``(K, N)``."""
        return self.dequantize_stored(dtype).T

    def __jax_array__(self):
        raise TypeError("a VQArray is not an array: call .dequantize(), or pass it to "
                        "jquant.ops (qdot / qeinsum)")  # fmt: skip


def _check_parts(q: VQArray) -> None:
    """ValueError when the indices, codebooks and scales disagree with each other and ``k``."""
    books = _shape_of(q.codebook)
    if len(books) != 4 or books[-2] < 2 or books[-2] & (books[-2] - 1):
        raise ValueError(f"VQArray: codebook must be (Tk, Tn, E, d) with E a power of two, "
                         f"got shape {books}")  # fmt: skip
    tk, tn, _, d = books
    n = _shape_of(q.qvalue)[0]
    if q.k % d or q.k % tk or n % tn:
        raise ValueError(f"VQArray: k={q.k} and N={n} must be multiples of d={d} and of the "
                         f"tile counts {(tk, tn)}")  # fmt: skip
    want = (n, packed_length(q.k // d, index_qtype(q.index_bits), None))
    if _shape_of(q.qvalue) != want:
        raise ValueError(f"VQArray: qvalue has shape {_shape_of(q.qvalue)}, expected {want} "
                         f"for k={q.k}, {q.index_bits}-bit indices of {d} weights")
    if _shape_of(q.codebook_scale) != (tk, tn):
        raise ValueError(f"VQArray: codebook_scale has shape {_shape_of(q.codebook_scale)}, "
                         f"expected {(tk, tn)}")  # fmt: skip


jax.tree_util.register_dataclass(
    VQArray,
    data_fields=["qvalue", "codebook", "codebook_scale"],
    meta_fields=["qtype", "k", "dtype"],
)


def lookup_table(codebook, scale) -> jax.Array:
    """float32 codebooks ``(Tk, Tn, E, d)``: int8 entries times their per-codebook scale."""
    return codebook.astype(jnp.float32) * scale.astype(jnp.float32)[..., None, None]


def tile_of(k: int, n: int, books_shape) -> tuple[int, int]:
    """``(tile_k, tile_n)`` of a ``(k, n)`` kernel with codebooks of ``books_shape``."""
    return k // books_shape[0], n // books_shape[1]


def gather(indices, books, k: int) -> jax.Array:
    """Values ``(N, K)`` of ``indices (N, K / d)`` in float codebooks ``(Tk, Tn, E, d)``."""
    n, vectors = indices.shape
    t_k, t_n, e, d = books.shape
    tile_k, tile_n = tile_of(k, n, books.shape)
    tk = (jnp.arange(vectors) * d) // tile_k  # (K / d,)
    tn = jnp.arange(n) // tile_n  # (N,)
    flat = (tk[None, :] * t_n + tn[:, None]) * e + indices.astype(jnp.int32)
    return books.reshape(-1, d)[flat].reshape(n, k)


def from_indices(indices, codebook, codebook_scale, *, qtype: str | QType, k: int,
                 dtype=np.float32) -> VQArray:  # fmt: skip
    """A VQArray from unpacked ``indices (N, K / d)``, an int8 ``codebook`` and its scales."""
    qt = qtypes.get(qtype)
    bits = int(codebook.shape[-2]).bit_length() - 1
    return VQArray(
        qvalue=pack(jnp.asarray(indices, jnp.uint8), index_qtype(bits), None),
        codebook=jnp.asarray(codebook, CODEBOOK_DTYPE),
        codebook_scale=jnp.asarray(codebook_scale, CODEBOOK_SCALE_DTYPE),
        qtype=qt.name, k=int(k), dtype=np.dtype(dtype),
    )  # fmt: skip


def quantize_codebook(books) -> tuple[jax.Array, jax.Array]:
    """``(int8 entries, bfloat16 scale)`` of float codebooks ``(Tk, Tn, E, d)``: each
    codebook's absmax onto 127, rounded to nearest, against the scale as stored."""
    amax = jnp.max(jnp.abs(books), axis=(-2, -1))
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(CODEBOOK_SCALE_DTYPE)
    codes = jnp.round(books / scale.astype(jnp.float32)[..., None, None])
    return jnp.clip(codes, -127, 127).astype(CODEBOOK_DTYPE), scale


def vectors(w, tile: tuple[int, int], d: int) -> jax.Array:
    """The vectors of ``w (K, N)`` by tile: ``(Tk, Tn, tile_k / d · tile_n, d)``, vector
    ``j`` of column ``n`` inside its tile at ``(j mod tile_k/d) · tile_n + n mod tile_n``."""
    k, n = w.shape
    tile_k, tile_n = tile
    v = w.reshape(k // tile_k, tile_k // d, d, n // tile_n, tile_n)
    return v.transpose(0, 3, 1, 4, 2).reshape(k // tile_k, n // tile_n, -1, d)


def assign(w, books) -> jax.Array:
    """Nearest codebook entry (Euclidean) of every vector of ``w (K, N)``: indices
    ``(N, K / d)`` uint8 into float ``books (Tk, Tn, E, d)`` (ties: the lowest index)."""
    k, n = w.shape
    t_k, t_n, _, d = books.shape
    tile_k, tile_n = tile_of(k, n, books.shape)
    v = vectors(w.astype(jnp.float32), (tile_k, tile_n), d)  # (Tk, Tn, P, d)
    dist = jnp.sum((v[:, :, :, None, :] - books[:, :, None, :, :]) ** 2, axis=-1)
    idx = jnp.argmin(dist, axis=-1).astype(jnp.uint8)  # (Tk, Tn, P)
    idx = idx.reshape(t_k, t_n, tile_k // d, tile_n).transpose(1, 3, 0, 2)
    return idx.reshape(n, k // d)
