"""The grouped matmul of mixture-of-experts layers in XLA: each row times its expert's weight,
with work and memory for the routed rows only.

Terminology: rows of ``x (M, K)`` arrive sorted by expert; expert ``e`` owns the **group** of
``group_sizes[e]`` consecutive rows. A **tile** is ``tm`` rows of one group (a group of ``g``
rows spans ``ceil(g / tm)`` tiles, the last one partly filled); the **tile map** gives each
tile its expert and first row. Since ``sum(ceil(g_e / tm)) <= M // tm + min(E, M)``, that
many tiles (a static count) cover any split of the rows; the tiles past the real ones are
skipped.

``jax.lax.ragged_dot`` is not used: XLA:CPU and XLA:GPU lower it to every row times every
expert (``x`` broadcast to ``(E, M, K)``, masked, and contracted over E and K), E times the
routed work, and a QArray stack had to be dequantized whole first. Here a ``lax.scan`` over
tiles multiplies one ``(tm, K)`` tile by its expert's weight, dequantized from the stack one
expert at a time by the same XLA code as a dense quantized matmul (``jquant._dispatch``: row
blocks on CPU, 4-bit weights one nibble plane at a time), so no float copy of the stack is
written.

`grouped_matmul` is the dispatch point: the Pallas kernel (``jquant.kernels.grouped_matmul``,
the same tile map) under the rules of ``jquant._dispatch`` with the dispatch-table kind
``"grouped_matmul"`` (M = the routed rows), else `grouped_matmul_xla`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jquant import _dispatch, _perm, kernels
from jquant._dispatch import _matmul_xla
from jquant.kernels.grouped_matmul import TileMap, tile_map, tile_rows
from jquant.qarray import QArray


def expert_weight(w: QArray, e: jax.Array) -> QArray:
    """Expert ``e``'s ``(K, N)`` QArray of a stack ``(E, K, N)`` (storage ``(E, N, Kbytes)``).

    Parts with a leading expert axis (codes, scales, zero points, an act-order ``perm``
    ``(E, k)``) are indexed; a part with a leading axis of 1 (a per-tensor scale shared by
    the stack) serves every expert.
    """
    experts = w.qvalue.shape[0]

    def pick(a):
        if a is None:
            return None
        if isinstance(a, QArray):  # a double-quantized scale: a stack itself
            return expert_weight(a, e) if a.qvalue.ndim == w.qvalue.ndim else a
        return jax.lax.dynamic_index_in_dim(a, e if a.shape[0] == experts else 0, 0, False)

    return dataclasses.replace(w, qvalue=pick(w.qvalue), scale=pick(w.scale),
                               zero_point=pick(w.zero_point), perm=pick(w.perm))


def _tile_product(x_tile, w, e, out_dtype):
    """``x_tile (tm, K) @ w[e]`` in float32 accumulation, then ``out_dtype``."""
    if not isinstance(w, QArray):
        we = jax.lax.dynamic_index_in_dim(w, e, 0, False).astype(x_tile.dtype)
        return jnp.dot(x_tile, we, preferred_element_type=jnp.float32).astype(out_dtype)
    we = expert_weight(w, e)
    if we.perm is not None:
        x_tile, we = _perm.permute_input(x_tile, we, 1)
    return _matmul_xla(x_tile, we, out_dtype=out_dtype)


def check_grouped(x, w, group_sizes) -> None:
    """ValueError naming the argument of ``grouped_matmul`` whose shape is wrong."""
    if x.ndim != 2:
        raise ValueError(f"grouped_matmul: x must be (M, K), got shape {tuple(x.shape)}")
    if len(w.shape) != 3:
        raise ValueError(f"grouped_matmul: w must be a stack (E, K, N), got shape "
                         f"{tuple(w.shape)}")
    if isinstance(w, QArray) and w.axis not in (-2, 1):
        raise ValueError(f"grouped_matmul: a QArray stack must be quantized along K "
                         f"(axis=1 of (E, K, N)), got axis={w.axis}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"grouped_matmul: x has K={x.shape[1]} but w {tuple(w.shape)} has "
                         f"K={w.shape[1]}")
    if group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul: group_sizes must be ({w.shape[0]},), one per "
                         f"expert, got shape {tuple(group_sizes.shape)}")


def grouped_matmul_xla(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array, *,
                       tm: int | None = None) -> jax.Array:
    """Rows of ``x (M, K)`` times their group's matrix of ``w (E, K, N)`` (see the module
    docstring), ``(M, N)`` in ``x.dtype``; rows past ``sum(group_sizes)`` are zeros.

    Args:
      x: the rows, sorted by expert.
      w: the stacked weights, a float array or a QArray quantized along K.
      group_sizes: int ``(E,)``, rows per expert, summing to at most M.
      tm: rows per tile; default `tile_rows` of M and E.

    >>> x = jnp.ones((3, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> grouped_matmul_xla(x, w, jnp.array([1, 2], jnp.int32))[:, 0].tolist()
    [1.0, 2.0, 2.0]
    """
    check_grouped(x, w, group_sizes)
    (m, k), experts, n = x.shape, w.shape[0], w.shape[2]
    tm = tile_rows(m, experts) if tm is None else tm
    tiles: TileMap = tile_map(group_sizes, m, tm)
    xp = jnp.concatenate([x, jnp.zeros((tm, k), x.dtype)])  # a tile may run past row M

    def one(_, t):
        expert, start, valid = t

        def run():
            x_tile = jax.lax.dynamic_slice_in_dim(xp, start, tm, 0)
            return _tile_product(x_tile, w, expert, x.dtype)

        return None, jax.lax.cond(valid, run, lambda: jnp.zeros((tm, n), x.dtype))

    _, out = jax.lax.scan(one, None, (tiles.expert, tiles.start, tiles.valid))
    y = out.reshape(-1, n)[tiles.row_slot]
    return jnp.where(tiles.row_valid[:, None], y, jnp.zeros((), y.dtype))


def grouped_matmul(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array) -> jax.Array:
    """`grouped_matmul_xla`'s product, by the grouped Pallas kernel where the matmul path
    (``jquant._dispatch``) and a measured dispatch table allow it.

    Raises:
      ValueError: shapes that do not fit (see `check_grouped`), or the path is "kernel" and
        no kernel takes these inputs.
    """
    check_grouped(x, w, group_sizes)
    path = _dispatch.matmul_path()
    if path != "xla" and isinstance(w, QArray):
        y = _kernel_grouped(x, w, group_sizes, forced=path == "kernel")
        if y is not None:
            return y
    if path == "kernel":
        raise ValueError(f"matmul path is 'kernel' but no grouped kernel applies to x "
                         f"{tuple(x.shape)} {jnp.dtype(x.dtype).name} @ {w!r}; use "
                         f"set_matmul_path('auto')")
    return grouped_matmul_xla(x, w, group_sizes)


def _kernel_grouped(x, w: QArray, group_sizes, *, forced: bool):
    """The grouped kernel's product, or None where it does not apply: weight-only formats
    the kernels decode, float (or FP4) scales, no act-order perm; on CPU only when forced
    (the TPU kernel interpreted, as ``jquant._dispatch`` does for dense matmuls)."""
    fp4 = w.format.kind == "fp4"
    if (w.activation is not None or w.qtype not in kernels.QTYPES or w.perm is not None
            or (isinstance(w.scale, QArray) and not fp4)):
        return None
    e, n = w.qvalue.shape[:2]
    stored = w.scales() if fp4 else w.scale
    scale = jnp.broadcast_to(stored, (e, n, stored.shape[-1]))  # a shared scale, per expert
    zp = None if w.zero_point is None else jnp.broadcast_to(w.zero_point, scale.shape)
    args = (x, w.qvalue, scale, zp, group_sizes.astype(jnp.int32))
    kw = dict(qtype=w.qtype, k=w.k, group_size=w.group_size)
    backend = _dispatch._device_backend()
    if backend in ("tpu", "gpu"):
        if (_dispatch._prefer_kernel(backend, "grouped_matmul", x.shape[0], forced)
                and kernels.can_use_grouped_matmul(*args, **kw, backend=backend)):
            return kernels.grouped_matmul(*args, **kw, backend=backend)
        return None
    if backend == "cpu" and forced and kernels.can_use_grouped_matmul(*args, **kw,
                                                                      backend="tpu"):
        return kernels.grouped_matmul(*args, **kw, backend="tpu", interpret=True)
    return None
