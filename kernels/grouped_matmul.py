"""y = x @ dequantize(W[e]) for rows grouped by expert: the grouped matmul of MoE layers.

Terminology: rows of ``x (M, K)`` arrive sorted by expert; expert ``e`` owns the **group**
of ``group_sizes[e]`` consecutive rows (rows past ``sum(group_sizes)`` belong to none and
come back as zeros). A **tile** is ``tm`` rows of one group; a group of ``g`` rows spans
``ceil(g / tm)`` tiles, the last one partly filled. The **tile map** (`tile_map`) gives each
tile its expert, its first row and whether it is real: ``M // tm + min(E, M)`` tiles (a
static count) cover any split of M rows, since ``sum(ceil(g_e / tm)) <= M // tm + min(E, M)``.

The weights are a stack of E experts in `quantized_matmul`'s storage layout with a leading
expert axis: ``qvalue (E, N, Kbytes)``, ``scale`` and ``zero_point`` ``(E, N, G)``.

`grouped_matmul` gathers each tile's rows into a padded ``(tiles * tm, K)`` layout, runs the
backend's kernel over it (`_gmm_tpu.py`: grid (tile, N block, K block), the tile's expert by
scalar prefetch; `_gmm_gpu.py`: Triton lowering, a program per (tile, N block) looping over
K), both decoding the expert's weight tile in the kernel, and gathers the rows back. Neither
kernel has run on a device: numerics are checked in interpret mode on CPU, lowering by
`jax.export`. jquant's XLA path (`jquant._grouped`) uses the same tile map.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _gmm_gpu, _gmm_tpu
from ._formats import next_pow2
from .block_sizes import BlockSizes, get_block_sizes
from .quantized_matmul import (
    TPU_X_DTYPES,
    _normalize_backend,
    dequantize,
    dot_nt,
    validate_inputs,
)

# Rows per tile (XLA path; the kernels raise it to their smallest tile): the mean group, as a
# power of two up to _MAX_TM. At decode (mean group <= 1) a tile is one row: XLA:CPU fuses
# the dequantization into a matrix-vector product but materializes the dequantized weight for
# a product of a few rows, several times slower (benchmarks/moe_gmm.py); above 128 the padding
# of partly filled tiles (up to tm - 1 rows per expert) costs more than decoding a weight again.
_MAX_TM = 128


class TileMap(NamedTuple):
    """Where each tile and each row of a grouped matmul lives (see the module docstring)."""

    expert: jax.Array  # (tiles,) int32: the tile's expert (a skipped tile: the last real's)
    start: jax.Array  # (tiles,) int32: the tile's first row of x (0 for a skipped tile)
    count: jax.Array  # (tiles,) int32: rows of the tile that are its group's (0 if skipped)
    valid: jax.Array  # (tiles,) bool: a real tile; the rest are skipped and give zeros
    row_slot: jax.Array  # (M,) int32: row r's position tile * tm + offset in the tile layout
    row_valid: jax.Array  # (M,) bool: row r belongs to a group (r < sum(group_sizes))


def num_tiles(m: int, experts: int, tm: int) -> int:
    """Tiles that cover any split of M rows into E groups: ``M // tm + min(E, M)``."""
    return m // tm + min(experts, m)


def tile_rows(m: int, experts: int) -> int:
    """Default rows per tile for M rows over E experts (the mean group size, rounded)."""
    return min(_MAX_TM, next_pow2(-(-m // experts)))


def tile_map(group_sizes: jax.Array, m: int, tm: int) -> TileMap:
    """The `TileMap` of ``group_sizes (E,)`` for M rows and tiles of ``tm`` rows."""
    g = group_sizes.astype(jnp.int32)
    experts = g.shape[0]
    ends = jnp.cumsum(g)
    starts = ends - g
    per_group = (g + tm - 1) // tm
    tile_ends = jnp.cumsum(per_group)
    tile_starts = tile_ends - per_group
    total = tile_ends[-1]
    i = jnp.arange(num_tiles(m, experts, tm), dtype=jnp.int32)
    valid = i < total
    last = jnp.searchsorted(tile_ends, jnp.maximum(total - 1, 0), side="right")
    expert = jnp.searchsorted(tile_ends, jnp.where(valid, i, total - 1), side="right")
    expert = jnp.minimum(jnp.where(valid, expert, last), experts - 1).astype(jnp.int32)
    start = jnp.where(valid, starts[expert] + (i - tile_starts[expert]) * tm, 0)
    count = jnp.where(valid, jnp.minimum(tm, ends[expert] - start), 0)
    r = jnp.arange(m, dtype=jnp.int32)
    row_valid = r < ends[-1]
    row_expert = jnp.minimum(jnp.searchsorted(ends, r, side="right"), experts - 1)
    local = r - starts[row_expert]
    slot = (tile_starts[row_expert] + local // tm) * tm + local % tm
    return TileMap(expert=expert, start=start.astype(jnp.int32), count=count.astype(jnp.int32),
                   valid=valid, row_slot=jnp.where(row_valid, slot, 0).astype(jnp.int32),
                   row_valid=row_valid)


def gather_tiles(x: jax.Array, tiles: TileMap, tm: int) -> jax.Array:
    """x (M, K) -> (tiles * tm, K): tile i holds rows start_i .. start_i + count_i, then
    zero rows."""
    offset = jnp.arange(tm, dtype=jnp.int32)
    rows = tiles.start[:, None] + offset[None, :]
    keep = offset[None, :] < tiles.count[:, None]
    xp = jnp.take(x, jnp.where(keep, rows, 0).reshape(-1), axis=0)
    return jnp.where(keep.reshape(-1, 1), xp, jnp.zeros((), x.dtype))


def scatter_rows(y_tiles: jax.Array, tiles: TileMap) -> jax.Array:
    """(tiles * tm, N) in the tile layout -> (M, N) in row order, zeros for rows of no group."""
    y = jnp.take(y_tiles, tiles.row_slot, axis=0)
    return jnp.where(tiles.row_valid[:, None], y, jnp.zeros((), y.dtype))


def validate_grouped(x, qvalue, scale, zero_point, group_sizes, *, qtype: str, k: int,
                     group_size: int | None) -> None:
    """Raise `ValueError` naming the first argument that breaks the stacked layout."""
    if qvalue.ndim != 3:
        raise ValueError(f"qvalue must be a stack (E, N, Kbytes), got shape {qvalue.shape}")
    experts = qvalue.shape[0]
    for name, a in (("scale", scale), ("zero_point", zero_point)):
        if a is not None and (a.ndim != 3 or a.shape[0] != experts):
            raise ValueError(f"{name} must be (E, N, G) with E={experts}, got {a.shape}")
    if group_sizes.shape != (experts,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be int ({experts},), one per expert, got "
                         f"{group_sizes.shape} {group_sizes.dtype}")
    if x.ndim != 2:
        raise ValueError(f"x must be (M, K), got shape {x.shape}")
    validate_inputs(x, qvalue[0], scale[0], None if zero_point is None else zero_point[0],
                    qtype=qtype, k=k, group_size=group_size)


def grouped_matmul_reference(x, qvalue, scale, zero_point, group_sizes, *, qtype: str, k: int,
                             group_size: int | None) -> jax.Array:
    """Expert by expert: every row times every dequantized expert, kept where it belongs
    (the oracle; E times the work)."""
    validate_grouped(x, qvalue, scale, zero_point, group_sizes, qtype=qtype, k=k,
                     group_size=group_size)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    r = jnp.arange(x.shape[0])
    y = jnp.zeros((x.shape[0], qvalue.shape[1]), jnp.float32)
    for e in range(qvalue.shape[0]):
        w = dequantize(qvalue[e], scale[e], None if zero_point is None else zero_point[e],
                       qtype=qtype, k=k, group_size=group_size, dtype=x.dtype)
        mine = (r >= ends[e] - group_sizes[e]) & (r < ends[e])
        y = jnp.where(mine[:, None], dot_nt(x, w.T), y)
    return y.astype(x.dtype)


def unsupported_reason(x, qvalue, *, qtype: str, k: int, group_size: int | None,
                       backend: str, tm: int) -> str | None:
    """Why the grouped kernel of `backend` cannot take these inputs, or None if it can.

    The kernels take whole blocks only (no XLA tail as `quantized_matmul` adds): K must be
    whole kernel steps of whole groups and N whole blocks.
    """
    n = qvalue.shape[1]
    sizes = get_block_sizes(backend, tm)
    if backend == "tpu":
        if jnp.dtype(x.dtype) not in TPU_X_DTYPES:
            return f"x.dtype={x.dtype} has no TPU kernel; use bfloat16 or float32"
        plan = _gmm_tpu.plan(qtype, k, group_size, tm, n, x.dtype, sizes)
    elif backend == "gpu":
        plan = _gmm_gpu.plan(qtype, k, group_size, tm, n, sizes)
    else:
        return f"{backend=} has no grouped Pallas kernel (only 'tpu' and 'gpu')"
    return plan if isinstance(plan, str) else None


def can_use_grouped_matmul(x, qvalue, scale, zero_point, group_sizes, *, qtype: str, k: int,
                           group_size: int | None, backend: str | None = None) -> bool:
    """True when the backend is TPU or GPU and its grouped kernel takes these inputs."""
    backend = _normalize_backend(backend)
    if backend not in ("tpu", "gpu"):
        return False
    try:
        validate_grouped(x, qvalue, scale, zero_point, group_sizes, qtype=qtype, k=k,
                         group_size=group_size)
    except ValueError:
        return False
    tm = default_tm(backend, x.shape[0], qvalue.shape[0], x.dtype)
    return unsupported_reason(x, qvalue, qtype=qtype, k=k, group_size=group_size,
                              backend=backend, tm=tm) is None


def default_tm(backend: str, m: int, experts: int, x_dtype) -> int:
    """`tile_rows`, raised to the backend's smallest legal tile (TPU sublanes, 16 on GPU)."""
    floor = _gmm_tpu.sublanes(x_dtype) if backend == "tpu" else _gmm_gpu.MIN_TILE
    return max(floor, tile_rows(m, experts))


@functools.partial(jax.jit, static_argnames=(
    "qtype", "k", "group_size", "backend", "interpret", "block_sizes", "tm"))
def grouped_matmul(x, qvalue, scale, zero_point, group_sizes, *, qtype: str, k: int,
                   group_size: int | None, backend: str | None = None, interpret: Any = False,
                   block_sizes: BlockSizes | None = None, tm: int | None = None) -> jax.Array:
    """Row r of ``x (M, K)`` times ``dequantize(W[e])`` for the expert e whose group holds r.

    Args:
      x: rows sorted by expert, bfloat16 / float16 / float32; the result has x's dtype.
      qvalue, scale, zero_point: the stacked weights (see the module docstring).
      group_sizes: int ``(E,)`` rows per expert, summing to at most M.
      qtype, k, group_size: the weights' format, as for `quantized_matmul`.
      backend: "tpu" or "gpu" (default `jax.default_backend()`).
      interpret: run in Pallas interpret mode (how it is tested on CPU).
      block_sizes: block_n and block_k of the kernel; default `get_block_sizes`.
      tm: rows per tile; default `default_tm`.

    Raises:
      ValueError: inputs break the layout, or the backend's kernel cannot take them
        (check `can_use_grouped_matmul` first).

    >>> y = grouped_matmul(x, q, s, None, sizes, qtype="int8", k=2048, group_size=None,
    ...                    backend="tpu")
    """
    backend = _normalize_backend(backend)
    validate_grouped(x, qvalue, scale, zero_point, group_sizes, qtype=qtype, k=k,
                     group_size=group_size)
    m, experts, n = x.shape[0], qvalue.shape[0], qvalue.shape[1]
    tm = default_tm(backend, m, experts, x.dtype) if tm is None else tm
    problem = unsupported_reason(x, qvalue, qtype=qtype, k=k, group_size=group_size,
                                 backend=backend, tm=tm)
    if problem is not None:
        raise ValueError(problem)
    sizes = block_sizes or get_block_sizes(backend, tm)
    tiles = tile_map(group_sizes, m, tm)
    xt = gather_tiles(x, tiles, tm)
    if backend == "tpu":
        plan = _gmm_tpu.plan(qtype, k, group_size, tm, n, x.dtype, sizes)
        y = _gmm_tpu.grouped_matmul_tpu(xt, qvalue, scale, zero_point, tiles.expert,
                                        tiles.valid.astype(jnp.int32), plan=plan,
                                        qtype=qtype, k=k, group_size=group_size,
                                        interpret=interpret)
    else:
        plan = _gmm_gpu.plan(qtype, k, group_size, tm, n, sizes)
        y = _gmm_gpu.grouped_matmul_gpu(xt, qvalue, scale, zero_point, tiles.expert,
                                        tiles.valid.astype(jnp.int32), plan=plan,
                                        qtype=qtype, k=k, group_size=group_size,
                                        interpret=interpret)
    return scatter_rows(y, tiles)
