"""KV caches: the seam between the one forward (`jquant.models.core`) and its callers.

A forward never knows which cache it writes to. It asks the cache three things:

- ``begin(mask, positions, window)``: once per forward, the RoPE positions of the new tokens
  and which keys each query may see (for full-attention layers and, with ``window``, for
  sliding-window ones); the cache may record the new tokens (a dense cache marks its slots);
- ``update(layer, k, v)``: in every decoder layer, store this layer's new keys and values
  and return what attention reads, which knows how it is attended (``read.attend(q,
  allowed, window, scale=, softcap=)``): a `Read` of keys and values ``(B, T, kv_heads,
  head_dim)`` and the scales ``(B, T, kv_heads)`` of a quantized format (else None), which
  `jquant.models.attention.attend` takes under the mask ``allowed``; or, from a `PagedView`
  whose attention runs in the paged-attention kernel, a `PagedRead` of the pages in place;
- ``end(length)``: once after the layers (a dense cache advances its write index).

``layer`` is a Python int when layers run unrolled and a traced int32 under ``lax.scan``;
every kind handles both. The kinds here:

- `NoCache`: attend within this call's tokens only (scoring, calibration, training);
- `KVCache`: dense, per batch: rows share one write index, prompts left-padded
  (`jquant.models.generate`);
- `PagedView` over a `PagedCache` whose rows are *pages* of ``page_size`` positions (the
  serving engine): each sequence reads and writes the pages its block table lists, so
  sequences hold only the pages they need and may share the pages of a common prefix
  (`jquant.serve.pages` hands them out); an optional int8 / fp8 format (`KVFormat`).

A new kind implements the same three methods and nothing else changes.

**Terminology**: a *slot* is a column of a dense cache; a *position* is what RoPE rotates
by. In a left-padded batch row ``b``'s first real token sits in slot ``pad_b`` but has
position 0.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jquant import kernels
from jquant._attention_path import AttentionKernel, paged_attention_kernel
from jquant.models.attention import attend, causal_mask
from jquant.models.config import LlamaConfig

# ---- formats ---------------------------------------------------------------------------

#: Scales of a quantized cache are bfloat16: 2 bytes per token, head and K or V.
SCALE_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How a cache stores keys and values (hashable: a static argument of jit).

    Each key (and value) vector of one token and one kv head — ``head_dim`` numbers — of a
    quantized format gets its own scale, ``amax / qmax``, rounded to bfloat16 *before* the
    codes are computed, so ``codes * stored_scale`` is the value attention sees. Bytes per
    token and layer::

        float:      2 (K, V) * kv_heads * head_dim * itemsize
        int8, fp8:  2 (K, V) * kv_heads * (head_dim * 1 + 2)

    Attributes:
      name: the name `kv_format` knows it by.
      storage: the stored dtype; None: the model's compute dtype.
      qmax: the largest code magnitude (127 for int8, 448 for fp8 E4M3); None: unquantized.
    """

    name: str
    storage: object = None
    qmax: float | None = None

    @property
    def quantized(self) -> bool:
        return self.qmax is not None

    def dtype(self, compute_dtype) -> np.dtype:
        """The dtype keys and values are stored in."""
        return np.dtype(compute_dtype if self.storage is None else self.storage)

    def bytes_per_token(self, kv_heads: int, head_dim: int, layers: int, compute_dtype) -> int:
        """Cache bytes one token takes over every layer (K and V, scales included)."""
        per_head = head_dim * self.dtype(compute_dtype).itemsize
        if self.quantized:
            per_head += np.dtype(SCALE_DTYPE).itemsize
        return 2 * layers * kv_heads * per_head

    def quantize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(codes, scale)`` of ``x (..., head_dim)``: codes ``x``'s shape in `storage`,
        scale ``x.shape[:-1]`` in bfloat16; ``codes * scale ≈ x``. All-zero vectors get
        scale 0 and zero codes.

        >>> codes, scale = kv_format("int8").quantize(jnp.array([[0.5, -1.0, 0.25, 0.0]]))
        >>> codes.dtype, codes.tolist(), float(scale[0]) * 127
        (dtype('int8'), [[64, -127, 32, 0]], 1.0)
        """
        if not self.quantized:
            raise ValueError(f"KV format {self.name!r} stores values as they are")
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
        scale = (amax * jnp.float32(1 / self.qmax)).astype(SCALE_DTYPE)
        s32 = scale.astype(jnp.float32)[..., None]
        scaled = jnp.where(s32 > 0, x.astype(jnp.float32) / jnp.where(s32 > 0, s32, 1), 0)
        scaled = jnp.clip(scaled, -self.qmax, self.qmax)
        if jnp.issubdtype(self.storage, jnp.integer):
            scaled = jnp.round(scaled)
        return scaled.astype(self.storage), scale


_FORMATS = {
    "none": KVFormat("none"),
    "bfloat16": KVFormat("bfloat16", jnp.bfloat16),
    "float16": KVFormat("float16", jnp.float16),
    "float32": KVFormat("float32", jnp.float32),
    "int8": KVFormat("int8", jnp.int8, 127.0),
    "fp8": KVFormat("fp8", jnp.float8_e4m3fn, float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)),
}
_ALIASES = {None: "none", "float": "none", "e4m3": "fp8", "float8_e4m3fn": "fp8"}

#: The KV-cache formats, by name: ``none`` stores the model's compute dtype; ``bfloat16``,
#: ``float16``, ``float32`` store that dtype; ``int8`` and ``fp8`` (E4M3) store codes with
#: per-token, per-head bfloat16 scales. The one list every command and report takes.
KV_CACHE_FORMATS = tuple(_FORMATS)


def kv_format(name: str | KVFormat | None) -> KVFormat:
    """The `KVFormat` called ``name`` (one of `KV_CACHE_FORMATS`; None and "float" mean
    "none", "e4m3" means "fp8").

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if isinstance(name, KVFormat):
        return name
    key = _ALIASES.get(name, name)
    if key not in _FORMATS:
        raise ValueError(
            f"KV cache format {name!r} is unknown; use one of {', '.join(KV_CACHE_FORMATS)}"
        )
    return _FORMATS[key]


# ---- the interface ---------------------------------------------------------------------


class Read(NamedTuple):
    """What attention reads from a cache in one layer: the keys and values in order."""

    k: jax.Array  # (B, T, kv_heads, head_dim): values, or codes with k_scale
    v: jax.Array
    k_scale: jax.Array | None = None  # (B, T, kv_heads)
    v_scale: jax.Array | None = None

    def attend(self, q, allowed, window, *, scale, softcap) -> jax.Array:
        """`attend` of ``q`` over these keys and values: ``(B, S, heads * head_dim)``
        (``allowed`` holds the layer's sliding window, if any, so ``window`` is unused)."""
        del window
        return attend(q, self.k, self.v, allowed, k_scale=self.k_scale, v_scale=self.v_scale,
                      scale=scale, softcap=softcap)  # fmt: skip


class PagedRead(NamedTuple):
    """What attention reads from a `PagedView` whose attention runs in the paged-attention
    kernel (`jquant.kernels.paged_attention`): the cache's pages in place, every layer's (the
    kernel reads this layer's through the block table; nothing is gathered or sliced)."""

    k: jax.Array  # (layers, num_pages, kv_heads, page_size, head_dim)
    v: jax.Array
    k_scale: jax.Array | None  # (layers, num_pages, kv_heads, page_size)
    v_scale: jax.Array | None
    layer: jax.Array | int
    pages: jax.Array  # (R, P) the block table
    positions: jax.Array  # (R, S) the queries' positions
    kernel: AttentionKernel

    def attend(self, q, allowed, window, *, scale, softcap) -> jax.Array:
        """The kernel's attention of ``q``: ``(R, S, heads * head_dim)``. Its causal mask
        and ``window`` come from the positions; ``allowed`` is unused."""
        del allowed
        out = kernels.paged_attention(
            q, self.k, self.v, self.pages, self.positions, k_scale=self.k_scale,
            v_scale=self.v_scale, layer=self.layer, scale=scale, window=window,
            softcap=softcap, backend=self.kernel.backend, interpret=self.kernel.interpret)
        return out.reshape(*q.shape[:2], -1)


class Cache(Protocol):
    """What `jquant.models.core` asks of a cache (see the module docstring)."""

    def begin(self, mask: jax.Array, positions: jax.Array | None, window: int | None
              ) -> tuple[Cache, jax.Array, jax.Array, jax.Array | None]:  # fmt: skip
        """``(cache, positions (B, S), allowed (B, S, T), allowed_in_window or None)``."""

    def update(self, layer, k: jax.Array, v: jax.Array) -> tuple[Cache, Read | PagedRead]: ...

    def end(self, length: int) -> Cache: ...


def _windowed(mask_fn, window):
    return mask_fn(None), (None if window is None else mask_fn(window))


# ---- no cache ----------------------------------------------------------------------------


class NoCache(NamedTuple):
    """Attend within the call's own tokens: a causal mask over them, padding never a key."""

    def begin(self, mask, positions, window):
        if positions is None:
            positions = default_positions(mask)
        s = mask.shape[1]
        key = jnp.arange(s)
        fn = lambda w: causal_mask(key, key, window=w, valid=mask)  # noqa: E731
        return (self, positions, *_windowed(fn, window))

    def update(self, layer, k, v):
        return self, Read(k, v)

    def end(self, length):
        return self


def default_positions(mask: jax.Array, seen: jax.Array | int = 0) -> jax.Array:
    """Each token's count of real tokens before it (``seen`` earlier ones included), so a
    left-padded row starts at position 0 on its first real token."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1 + seen, 0)


# ---- dense, per batch --------------------------------------------------------------------


class KVCache(NamedTuple):
    """Preallocated keys and values of every layer, plus which slots hold real tokens.

    Rows share one write index: a forward of ``S`` tokens writes slots ``index .. index +
    S - 1`` of every row (keeping them below `max_len` is the caller's job).

    Attributes:
      k: keys ``(layers, batch, max_len, kv_heads, head_dim)`` in the compute dtype.
      v: values, same shape and dtype.
      valid: ``(batch, max_len)`` bool; True where a slot holds a real (non-padding) token.
      index: ``()`` int32; the next slot to write (slots ``< index`` are filled).
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def begin(self, mask, positions, window):
        if positions is None:
            seen = jnp.sum(self.valid.astype(jnp.int32), axis=1, keepdims=True)
            positions = default_positions(mask, seen)
        s = mask.shape[1]
        valid = jax.lax.dynamic_update_slice(self.valid, mask, (0, self.index))
        query = self.index + jnp.arange(s, dtype=jnp.int32)
        key = jnp.arange(self.max_len, dtype=jnp.int32)
        fn = lambda w: causal_mask(query, key, window=w, valid=valid)  # noqa: E731
        return (self._replace(valid=valid), positions, *_windowed(fn, window))

    def update(self, layer, k, v):
        start = (layer, 0, self.index, 0, 0)
        new = self._replace(
            k=jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), start),
            v=jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), start),
        )
        return new, Read(new.k[layer].astype(k.dtype), new.v[layer].astype(v.dtype))

    def end(self, length):
        return self._replace(index=self.index + jnp.int32(length))


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty `KVCache` for ``batch`` sequences of up to ``max_len`` slots.

    >>> cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> init_cache(cfg, 2, 16).k.shape
    (1, 2, 16, 1, 4)
    """
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


# ---- pages (serving) ---------------------------------------------------------------------


class PagedCache(NamedTuple):
    """Keys and values of every layer in ``num_pages`` pages of ``page_size`` positions.

    Attributes:
      k, v: ``(layers, num_pages, kv_heads, page_size, head_dim)``: values in the format's
        dtype, or its codes (int8 / fp8). Heads before positions: each (page, head) is one
        contiguous ``(positions, head_dim)`` matrix.
      k_scale, v_scale: ``(layers, num_pages, kv_heads, page_size)`` bfloat16 per-token,
        per-head scales of a quantized format; None otherwise.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in self if x is not None)


def init_paged_cache(config: LlamaConfig, num_pages: int, page_size: int, fmt: KVFormat,
                     dtype) -> PagedCache:  # fmt: skip
    """An all-zero `PagedCache` of format ``fmt`` (``dtype``: the model's compute dtype)."""
    shape = (config.num_layers, num_pages, config.num_kv_heads, page_size, config.head_dim)
    values = lambda: jnp.zeros(shape, fmt.dtype(dtype))  # noqa: E731
    if not fmt.quantized:
        return PagedCache(values(), values(), None, None)
    scales = lambda: jnp.zeros(shape[:-1], SCALE_DTYPE)  # noqa: E731
    return PagedCache(values(), values(), scales(), scales())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedView:
    """One forward's view of a `PagedCache` (``init_paged_cache(config, num_pages,
    page_size, ...)``).

    Row ``r`` of the tokens is a sequence whose position ``p`` lives in page
    ``pages[r, p // page_size]`` at offset ``p % page_size``; its queries read positions
    ``0 .. key_len - 1`` (``key_len = pages.shape[1] * page_size``), in order, so attention
    and its masks are those of a contiguous cache. A block-table entry outside the cache (any value
    ``>= num_pages``, e.g. `num_pages` itself for "no page") drops the writes aimed at it,
    and its reads return finite values that the causal mask hides: a query at ``p`` reads
    only positions ``<= p``, which its own pages hold.

    Pages may be shared between rows (a common prompt prefix): a forward must not write a
    shared page, which holds when every row writes only positions past its shared prefix.

    Attention runs in XLA over the gathered pages, or in the paged-attention kernel, which
    reads the listed pages in place (`attention`; the same result, up to float rounding).
    """

    cache: PagedCache
    pages: jax.Array  # (R, P) int32: the block table
    positions: jax.Array  # (R, S) int32
    fmt: KVFormat = dataclasses.field(metadata=dict(static=True))
    # "auto", "xla" or "kernel" (`jquant._attention_path`); None: the process setting
    # (`jquant.ops.set_attention_path`) when the forward is traced.
    attention: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def page_size(self) -> int:
        return self.cache.k.shape[3]

    @property
    def key_len(self) -> int:
        return self.pages.shape[1] * self.page_size

    def begin(self, mask, positions, window):
        key = jnp.arange(self.key_len, dtype=jnp.int32)
        fn = lambda w: causal_mask(self.positions, key, window=w)  # noqa: E731
        return (self, self.positions, *_windowed(fn, window))

    def update(self, layer, k, v):
        c, size = self.cache, self.page_size
        num_pages = c.k.shape[1]
        slot = self.positions // size
        page = jnp.take_along_axis(self.pages, jnp.minimum(slot, self.pages.shape[1] - 1), 1)
        page = jnp.where(slot < self.pages.shape[1], page, num_pages)  # past the table: drop
        at = (layer, page, slice(None), self.positions % size)
        put = lambda x, new: x.at[at].set(new.astype(x.dtype), mode="drop")  # noqa: E731
        if self.fmt.quantized:
            (kc, ks), (vc, vs) = self.fmt.quantize(k), self.fmt.quantize(v)
            c = PagedCache(put(c.k, kc), put(c.v, vc), put(c.k_scale, ks), put(c.v_scale, vs))
        else:
            c = c._replace(k=put(c.k, k), v=put(c.v, v))
        view = dataclasses.replace(self, cache=c)
        kernel = paged_attention_kernel(self.attention, tokens=k.shape[1], dtype=k.dtype,
                                        page_size=size, head_dim=c.k.shape[-1])
        if kernel is not None:
            return view, PagedRead(*c, layer, self.pages, self.positions, kernel)
        rows = self.pages.shape[0]

        def take(x):  # (R, P, KV, size[, Dh]) -> (R, P * size, KV[, Dh]), positions in order
            if x is None:
                return None
            g = jnp.take(x[layer], self.pages, axis=0, mode="clip")
            g = jnp.swapaxes(g, 2, 3)  # (R, P, size, KV[, Dh])
            return g.reshape(rows, self.key_len, *g.shape[3:])

        return view, Read(*(take(x) for x in c))

    def end(self, length):
        return self
