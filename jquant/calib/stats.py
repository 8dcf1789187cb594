"""What calibration knows about the inputs of one matmul: `Calibration`.

Calibrated algorithms (GPTQ, AWQ, SmoothQuant) see a weight's *inputs* only through
these statistics, accumulated over every calibration token ``x`` (a row of the matmul's
``(M, K)`` input):

* ``hessian``: ``E[x xᵀ]`` ``(K, K)`` float32, the mean over tokens. GPTQ's Hessian is
  ``2 · n · hessian``; every use here is invariant to that factor (GPTQ's dampening is
  relative to the mean diagonal). The output error of a weight change ``ΔW (K, N)`` is
  ``E‖x ΔW‖² = tr(ΔWᵀ · hessian · ΔW)``, which is how AWQ's searches are scored too.
* ``mean_abs``: ``E|x_k|`` ``(K,)``, AWQ's activation salience.
* ``max_abs``: ``max |x_k|`` ``(K,)``, SmoothQuant's activation range.
* ``count``: tokens seen (a float32 scalar).

An MoE layer's expert stack ``(E, K, N)`` has one set per expert, stacked along a leading
expert axis (`from_routed`): ``hessian`` ``(E, K, K)``, ``mean_abs`` / ``max_abs`` ``(E, K)``
and ``count`` ``(E,)``, each over the rows routed to that expert; an expert with no rows has
zeros throughout (never NaN).

Instances are pytrees of arrays, so they are made and consumed inside ``jit``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Input statistics of one quantized matmul (see the module docstring)."""

    hessian: jax.Array  # (K, K) float32, E[x x^T]; (E, K, K) for an expert stack
    mean_abs: jax.Array  # (K,) float32, E|x|; (E, K)
    max_abs: jax.Array  # (K,) float32, max |x|; (E, K)
    count: jax.Array  # () float32, tokens; (E,) rows routed to each expert

    @property
    def k(self) -> int:
        return self.hessian.shape[-1]

    def scaled(self, s) -> Calibration:
        """The statistics of ``x / s`` (a per-channel scale folded into the previous op;
        ``s`` ``(K,)``, or ``(E, K)`` for an expert stack with a scale per expert).

        >>> c = from_inputs(jnp.array([[2.0, 4.0]]))
        >>> c.scaled(jnp.array([2.0, 4.0])).hessian.tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        inv = 1.0 / jnp.asarray(s, jnp.float32)
        return Calibration(
            hessian=self.hessian * inv[..., :, None] * inv[..., None, :],
            mean_abs=self.mean_abs * inv, max_abs=self.max_abs * inv, count=self.count,
        )  # fmt: skip


jax.tree_util.register_dataclass(
    Calibration, data_fields=["hessian", "mean_abs", "max_abs", "count"], meta_fields=[]
)


def from_inputs(x) -> Calibration:
    """Statistics of the rows of ``x (..., K)`` (every leading axis is tokens).

    >>> from_inputs(jnp.ones((3, 2))).hessian.tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    n = jnp.float32(x.shape[0])
    hessian = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST) / n
    a = jnp.abs(x)
    return Calibration(
        hessian=hessian, mean_abs=jnp.sum(a, axis=0) / n, max_abs=jnp.max(a, axis=0), count=n
    )


def from_routed(rows, group_sizes) -> Calibration:
    """Per-expert statistics of ``rows (M, K)`` sorted by expert, expert ``e`` owning the
    next ``group_sizes[e]`` rows (`jquant.models.moe.grouped_matmul`'s input); rows past
    ``sum(group_sizes)`` count for no expert.

    >>> c = from_routed(jnp.array([[1.0, 0.0], [3.0, 0.0]]), jnp.array([1, 0, 1]))
    >>> c.hessian[:, 0, 0].tolist(), c.count.tolist()
    ([1.0, 0.0, 9.0], [1.0, 0.0, 1.0])
    """
    x = jnp.asarray(rows, jnp.float32)
    sizes = jnp.asarray(group_sizes, jnp.int32)
    e, m = sizes.shape[0], x.shape[0]
    expert = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right")  # e for past rows
    sums = _gram_per_expert(x, expert, e, min(GRAM_ROWS, m))
    a = jnp.abs(x)
    count = sizes.astype(jnp.float32)
    n = jnp.maximum(count, 1.0)[:, None]
    top = jax.ops.segment_max(a, expert, num_segments=e)  # -inf for an expert with no rows
    return Calibration(
        hessian=sums / n[:, :, None], mean_abs=jax.ops.segment_sum(a, expert, num_segments=e) / n,
        max_abs=jnp.where(count[:, None] > 0, top, 0.0), count=count,
    )  # fmt: skip


#: Rows per block of `_gram_per_expert`.
GRAM_ROWS = 256


def _gram_per_expert(x, expert, e: int, block: int):
    """``(E, K, K)``: each expert's ``Σ x xᵀ`` over its rows of ``x (M, K)``, sorted by
    ``expert (M,)`` (``e`` for rows of none).

    The rows go in blocks of ``block``, and every (block, expert) pair that shares rows is one
    ``(block, K)ᵀ (block, K)`` product of the block's rows of that expert: at most
    ``⌈M / block⌉ + E`` products, about the ``M K²`` of one Gram matrix. (XLA's CPU and GPU
    ragged dot over a ragged contraction would expand the rows to ``(E, M, K)`` instead.)
    """
    m, k = x.shape
    nb = -(-m // block)
    x = jnp.pad(x, ((0, nb * block - m), (0, 0)))
    expert = jnp.pad(expert, (0, nb * block - m), constant_values=e)
    first, last = expert[::block], jnp.minimum(expert[block - 1 :: block], e - 1)
    pairs = jnp.where(first < e, last - first + 1, 0)  # experts each block holds rows of
    ends = jnp.cumsum(pairs)
    p = jnp.arange(nb + e)
    b = jnp.minimum(jnp.searchsorted(ends, p, side="right"), nb - 1)
    which = first[b] + p - (ends - pairs)[b]

    def add(total, args):
        bi, ei, real = args
        rows = jax.lax.dynamic_slice_in_dim(x, bi * block, block)
        mine = (jax.lax.dynamic_slice_in_dim(expert, bi * block, block) == ei) & real
        rows = jnp.where(mine[:, None], rows, 0.0)
        gram = jnp.dot(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
        return total.at[jnp.minimum(ei, e - 1)].add(gram), None

    total, _ = jax.lax.scan(add, jnp.zeros((e, k, k), jnp.float32), (b, which, p < ends[-1]))
    return total


def merge(a: Calibration, b: Calibration) -> Calibration:
    """Statistics of the union of the tokens behind ``a`` and ``b`` (per expert for stacks;
    no tokens on either side gives zeros).

    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> m = merge(from_inputs(x[:1]), from_inputs(x[1:]))
    >>> bool(jnp.allclose(m.hessian, from_inputs(x).hessian))
    True
    """
    n = a.count + b.count
    safe = jnp.maximum(n, 1.0)
    wa, wb = a.count / safe, b.count / safe
    return Calibration(
        hessian=a.hessian * wa[..., None, None] + b.hessian * wb[..., None, None],
        mean_abs=a.mean_abs * wa[..., None] + b.mean_abs * wb[..., None],
        max_abs=jnp.maximum(a.max_abs, b.max_abs), count=n,
    )  # fmt: skip


def pooled(c: Calibration) -> Calibration:
    """The statistics of every row an expert stack received, its experts' pooled (``c``
    itself when it has no expert axis). Routed rows hold each token once per expert it
    went to, so this is the statistics of the tokens that reached the layer.

    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> p = pooled(from_routed(x, jnp.array([2, 1])))
    >>> bool(jnp.allclose(p.hessian, from_inputs(x).hessian)), p.count.tolist()
    (True, 3.0)
    """
    if c.hessian.ndim == 2:
        return c
    n = jnp.sum(c.count)
    w = c.count / jnp.maximum(n, 1.0)
    return Calibration(
        hessian=jnp.einsum("e,ekl->kl", w, c.hessian, precision=jax.lax.Precision.HIGHEST),
        mean_abs=jnp.einsum("e,ek->k", w, c.mean_abs, precision=jax.lax.Precision.HIGHEST),
        max_abs=jnp.max(c.max_abs, axis=0), count=n,
    )  # fmt: skip
