"""Attention of query rows over a paged KV cache, reading only the pages a block table lists.

Terminology (the words are overloaded elsewhere):

* **page**: ``page_size`` consecutive positions of one sequence's keys (or values), for
  every kv head: ``k_pages[page]`` is ``(kv_heads, page_size, head_dim)``, heads before
  positions, the layout of `jquant.models.cache.PagedCache`.
* **block table**: ``tables (R, P)``; row ``r``'s position ``t`` lives in page
  ``tables[r, t // page_size]`` at offset ``t % page_size``. An entry outside
  ``[0, num_pages)`` is *no page*: its positions hold no keys and nothing is read there.
* **query rows**: the kernels group the ``heads // kv_heads`` query heads that share a kv
  head (GQA): a program's queries are the ``S * groups`` (token, head) rows of one kv
  head, so each page is read once per kv head, not once per query head.

Query ``(r, s)`` at position ``p = positions[r, s]`` attends to its own row's keys at
positions ``max(0, p - window + 1) .. p`` (every position ``<= p`` without a window) that
lie in listed pages; a query with no such key (a negative position: padding) gets zeros.
Scores are ``scale * q . k``, then ``softcap * tanh(score / softcap)`` with a soft-cap
(Gemma 2); softmax in float32, computed online (flash) page by page.

Quantized pages (int8 or float8_e4m3fn codes with per-token, per-head scales, ``value =
code * scale``) are dequantized inside the kernels by applying each scale where it acts:
a key's scale multiplies its score column, a value's scale its probability, as
`jquant.models.attention.attend` does in XLA; no dequantized page is ever stored.

`paged_attention` runs the TPU kernel (`_paged_tpu.py`: Pallas Mosaic TPU, the block table
by scalar prefetch) or the GPU kernel (`_paged_gpu.py`: Pallas with Triton lowering, a loop
over pages in each program), and `paged_attention_reference` (gather the pages, then a
masked softmax) on any other backend. Neither kernel has run on a device yet: numerics are
checked in interpret mode on CPU, lowering by `jax.export`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import _paged_gpu, _paged_tpu
from ._formats import next_pow2
from .quantized_matmul import _normalize_backend

Q_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
TPU_Q_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
DEFAULT_BLOCK_Q = {"tpu": 128, "gpu": 64}  # query rows per program, at most (unmeasured)
_NO_KEYS = 1 << 30  # the first position of a padding query row: past every real key


def validate_inputs(q, k_pages, v_pages, tables, positions, k_scale=None, v_scale=None,
                    layer=None, window=None) -> None:  # fmt: skip
    """Raise `ValueError` naming the first argument that breaks the layout above."""
    if isinstance(window, int) and window < 1:
        raise ValueError(f"{window=} must be >= 1 (None for no window)")
    if q.ndim != 4 or jnp.dtype(q.dtype) not in Q_DTYPES:
        raise ValueError(f"q must be (R, S, heads, head_dim) bfloat16, float16 or float32, "
                         f"got {q.shape} {q.dtype}")
    pages_ndim = 4 if layer is None else 5
    if k_pages.ndim != pages_ndim or k_pages.shape != v_pages.shape:
        what = "(num_pages, kv_heads, page_size, head_dim)"
        if layer is not None:
            what = "(layers, " + what[1:]
        raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
                         f"{what}" + ("" if layer is None else " when a layer is given"))
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages.dtype={k_pages.dtype} differs from v_pages.dtype="
                         f"{v_pages.dtype}")
    r, s, heads, head_dim = q.shape
    kv_heads = k_pages.shape[-3]
    if k_pages.shape[-1] != head_dim:
        raise ValueError(f"pages have head_dim {k_pages.shape[-1]} but q has {head_dim}")
    if heads % kv_heads:
        raise ValueError(f"q's {heads} heads are not a multiple of the pages' {kv_heads} "
                         f"kv heads")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("k_scale and v_scale must be given together (quantized pages)")
    quantized = k_scale is not None
    if quantized != (jnp.dtype(k_pages.dtype) in CODE_DTYPES):
        raise ValueError(f"pages of dtype {k_pages.dtype} " + (
            "need k_scale and v_scale (int8 / float8_e4m3fn codes)" if not quantized
            else "are not codes; scales go with int8 or float8_e4m3fn pages"))
    if quantized and (k_scale.shape != k_pages.shape[:-1] or v_scale.shape != k_scale.shape
                      or not all(jnp.issubdtype(x.dtype, jnp.floating)
                                 for x in (k_scale, v_scale))):
        raise ValueError(f"k_scale {k_scale.shape} {k_scale.dtype} and v_scale "
                         f"{v_scale.shape} {v_scale.dtype} must be floats of the pages' shape "
                         f"without head_dim, {k_pages.shape[:-1]}")
    if tables.ndim != 2 or tables.shape[0] != r or not jnp.issubdtype(tables.dtype,
                                                                       jnp.integer):
        raise ValueError(f"tables must be (R={r}, P) integers, got {tables.shape} "
                         f"{tables.dtype}")
    if positions.shape != (r, s) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be (R, S)={(r, s)} integers, got "
                         f"{positions.shape} {positions.dtype}")


def unsupported_reason(q_dtype, page_size: int, head_dim: int, backend: str) -> str | None:
    """Why `backend`'s kernel cannot take queries of `q_dtype` over pages of this geometry
    (inputs that pass `validate_inputs`), or None."""
    if backend == "tpu":
        if jnp.dtype(q_dtype) not in TPU_Q_DTYPES:
            return f"q.dtype={jnp.dtype(q_dtype)} has no TPU kernel; use bfloat16 or float32"
        return None
    if backend == "gpu":
        return _paged_gpu.unsupported_reason(page_size, head_dim)
    return f"{backend=} has no Pallas kernel (only 'tpu' and 'gpu')"


def can_use_paged_attention(q, k_pages, v_pages, tables, positions, k_scale=None,
                            v_scale=None, layer=None, *, backend: str | None = None) -> bool:
    """True when `backend` (default: JAX's) is a TPU or GPU whose kernel takes these inputs."""
    try:
        validate_inputs(q, k_pages, v_pages, tables, positions, k_scale, v_scale, layer)
    except ValueError:
        return False
    return unsupported_reason(q.dtype, *k_pages.shape[-2:], _normalize_backend(backend)) is None


def _flat_pool(pages, scale, tables, layer):
    """Pages as one flat pool ``(layers * num_pages, ...)`` (a free reshape of the leading
    axes) and the table into it, -1 for no page: a layer's pages are read in place, under
    `lax.scan` too, never sliced out (which would copy the layer's whole pool)."""
    num_pages = pages.shape[-4]
    tables = tables.astype(jnp.int32)
    valid = (tables >= 0) & (tables < num_pages)
    if layer is not None:
        tables = tables + jnp.asarray(layer, jnp.int32) * num_pages
        pages = pages.reshape(-1, *pages.shape[2:])
        scale = None if scale is None else scale.reshape(-1, *scale.shape[2:])
    return pages, scale, jnp.where(valid, tables, -1)


class _Rows(NamedTuple):
    q: jax.Array  # (R, kv_heads, rows_pad, head_dim): row i is token i // groups,
    #   head kv * groups + i % groups; rows past S * groups are padding
    pos: jax.Array  # (R, rows_pad) int32: the last position each row reads, -1 for none
    lo: jax.Array  # (R, rows_pad) int32: the first position each row reads


def _query_rows(q, positions, window, kv_heads: int, rows_pad: int) -> _Rows:
    r, s, heads, d = q.shape
    groups = heads // kv_heads
    q = q.reshape(r, s, kv_heads, groups, d).transpose(0, 2, 1, 3, 4)
    q = q.reshape(r, kv_heads, s * groups, d)
    pos = jnp.repeat(positions.astype(jnp.int32), groups, axis=1)
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(
        pos + 1 - jnp.asarray(window, jnp.int32), 0)
    lo = jnp.where(pos >= 0, lo, _NO_KEYS)
    pad = rows_pad - s * groups
    q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
    pos = jnp.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
    lo = jnp.pad(lo, ((0, 0), (0, pad)), constant_values=_NO_KEYS)
    return _Rows(q, pos, lo)


def _block_q(backend: str, rows: int, dtype, block_q: int | None) -> int:
    """Query rows per program: the backend's tile rules, and no more than the rows need."""
    if block_q is not None and (not isinstance(block_q, int) or block_q <= 0):
        raise ValueError(f"{block_q=} must be a positive int")
    if backend == "tpu":
        sub = _paged_tpu.sublanes(dtype)
        if block_q is not None and block_q % sub:
            raise ValueError(f"{block_q=} must be a multiple of {sub} for {jnp.dtype(dtype)} "
                             f"q on TPU")
        cap = block_q or DEFAULT_BLOCK_Q["tpu"]
        return min(cap, -(-rows // sub) * sub)
    if block_q is not None and (block_q & (block_q - 1) or block_q < _paged_gpu.MIN_TILE):
        raise ValueError(f"{block_q=} must be a power of two >= {_paged_gpu.MIN_TILE} on GPU")
    cap = block_q or DEFAULT_BLOCK_Q["gpu"]
    return max(_paged_gpu.MIN_TILE, min(cap, next_pow2(rows)))


class _Config(NamedTuple):
    scale: float
    softcap: float | None
    backend: str
    interpret: Any
    block_q: int | None


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, k_pages, v_pages, k_scale, v_scale, tables, positions, layer, window, *,
             cfg: _Config):
    r, s, heads, d = q.shape
    kv_heads = k_pages.shape[-3]
    rows = s * heads // kv_heads
    bq = _block_q(cfg.backend, rows, q.dtype, cfg.block_q)
    x = _query_rows(q, positions, window, kv_heads, -(-rows // bq) * bq)
    k_pages, k_scale, flat = _flat_pool(k_pages, k_scale, tables, layer)
    v_pages, v_scale, _ = _flat_pool(v_pages, v_scale, tables, layer)
    tpu = cfg.backend == "tpu"
    call = _paged_tpu.paged_attention_tpu if tpu else _paged_gpu.paged_attention_gpu
    out = call(x.q, x.pos, x.lo, flat, k_pages, v_pages, k_scale, v_scale, block_q=bq,
               scale=cfg.scale, softcap=cfg.softcap, interpret=cfg.interpret)
    out = out[:, :, :rows].reshape(r, kv_heads, s, heads // kv_heads, d)
    return out.transpose(0, 2, 1, 3, 4).reshape(r, s, heads, d)


def paged_attention(q, k_pages, v_pages, tables, positions, *, k_scale=None, v_scale=None,
                    layer=None, scale: float | None = None, window=None,
                    softcap: float | None = None, backend: str | None = None,
                    interpret: Any = False, block_q: int | None = None) -> jax.Array:
    """Causal grouped-query attention of ``q`` over the pages each row's block table lists.

    Args:
      q: RoPE'd queries ``(R, S, heads, head_dim)``, bfloat16 / float16 / float32; query
        head ``h`` reads kv head ``h // (heads // kv_heads)`` (transformers' repeat_kv).
      k_pages, v_pages: ``(num_pages, kv_heads, page_size, head_dim)``, or with ``layer``
        every layer's ``(layers, num_pages, ...)``: values, or int8 / float8_e4m3fn codes.
      tables: ``(R, P)`` int block tables; entries outside ``[0, num_pages)``: no page.
      positions: ``(R, S)`` int; each query's own position (negative: a padding query).
      k_scale, v_scale: the codes' scales, the pages' shape without ``head_dim``.
      layer: an int (a traced one under `lax.scan` too) picking the layer of 5-D pages.
      scale: the factor on the scores (default ``head_dim ** -0.5``).
      window: sliding window, an int or an int32 scalar (traced is fine): keys at
        positions ``> p - window``; None for none.
      softcap: the Gemma 2 attention-logit soft-cap, or None.
      backend: "tpu" or "gpu" run that kernel; others the reference (XLA). Default
        `jax.default_backend()`.
      interpret: run the kernel in Pallas interpret mode (how it is tested on CPU).
      block_q: the most query rows (tokens x grouped heads) per program.

    Returns:
      ``(R, S, heads, head_dim)`` in q's dtype.

    Raises:
      ValueError: inputs break the layout, or the backend's kernel cannot take them
        (`can_use_paged_attention` asks first).

    >>> out = paged_attention(q, k_pages, v_pages, tables, positions, backend="gpu")
    """
    validate_inputs(q, k_pages, v_pages, tables, positions, k_scale, v_scale, layer, window)
    backend = _normalize_backend(backend)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    softcap = None if softcap is None else float(softcap)
    if backend not in ("tpu", "gpu"):
        return paged_attention_reference(q, k_pages, v_pages, tables, positions,
                                         k_scale=k_scale, v_scale=v_scale, layer=layer,
                                         scale=scale, window=window, softcap=softcap)
    problem = unsupported_reason(q.dtype, *k_pages.shape[-2:], backend)
    if problem is not None:
        raise ValueError(problem)
    if isinstance(interpret, bool) or interpret is None:
        interpret = bool(interpret)
    cfg = _Config(scale, softcap, backend, interpret, block_q)
    return _forward(q, k_pages, v_pages, k_scale, v_scale, tables, positions, layer, window,
                    cfg=cfg)


def paged_attention_reference(q, k_pages, v_pages, tables, positions, *, k_scale=None,
                              v_scale=None, layer=None, scale: float | None = None,
                              window=None, softcap: float | None = None) -> jax.Array:
    """`paged_attention` in plain jnp: gather each row's pages in order, dequantize, mask,
    softmax. Reads (and copies) every listed page whatever the positions."""
    validate_inputs(q, k_pages, v_pages, tables, positions, k_scale, v_scale, layer, window)
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scale = None if k_scale is None else k_scale[layer]
        v_scale = None if v_scale is None else v_scale[layer]
    r, s, heads, d = q.shape
    num_pages, kv_heads, page_size, _ = k_pages.shape
    valid = (tables >= 0) & (tables < num_pages)
    at = jnp.clip(tables, 0, num_pages - 1)

    def gather(x, x_scale):  # -> (R, kv_heads, P * page_size, head_dim) float32
        g = jnp.take(x, at, axis=0).astype(jnp.float32)  # (R, P, kv, size, D)
        if x_scale is not None:
            g = g * jnp.take(x_scale, at, axis=0).astype(jnp.float32)[..., None]
        return jnp.moveaxis(g, 2, 1).reshape(r, kv_heads, -1, d)

    k, v = gather(k_pages, k_scale), gather(v_pages, v_scale)
    qg = q.astype(jnp.float32).reshape(r, s, kv_heads, heads // kv_heads, d)
    hi = lax.Precision.HIGHEST
    scores = jnp.einsum("rskgd,rktd->rkgst", qg, k, precision=hi)
    scores = scores * jnp.float32(d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / jnp.float32(softcap)) * jnp.float32(softcap)
    key = jnp.arange(k.shape[2], dtype=jnp.int32)
    pos = positions.astype(jnp.int32)[:, :, None]
    seen = (key <= pos) & jnp.repeat(valid, page_size, axis=1)[:, None, :]
    if window is not None:
        seen = seen & (key > pos - jnp.asarray(window, jnp.int32))
    seen = seen[:, None, None]  # (R, 1, 1, S, T)
    scores = jnp.where(seen, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.where(seen, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0)), 0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1)
    out = jnp.einsum("rkgst,rktd->rskgd", probs, v, precision=hi)
    return out.reshape(r, s, heads, d).astype(q.dtype)
