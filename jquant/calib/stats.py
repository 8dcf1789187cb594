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

Instances are pytrees of arrays, so they are made and consumed inside ``jit``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Input statistics of one quantized matmul (see the module docstring)."""

    hessian: jax.Array  # (K, K) float32, E[x x^T]
    mean_abs: jax.Array  # (K,) float32, E|x|
    max_abs: jax.Array  # (K,) float32, max |x|
    count: jax.Array  # () float32, tokens

    @property
    def k(self) -> int:
        return self.hessian.shape[-1]

    def scaled(self, s) -> Calibration:
        """The statistics of ``x / s`` (a per-channel scale folded into the previous op).

        >>> c = from_inputs(jnp.array([[2.0, 4.0]]))
        >>> c.scaled(jnp.array([2.0, 4.0])).hessian.tolist()
        [[1.0, 1.0], [1.0, 1.0]]
        """
        inv = 1.0 / jnp.asarray(s, jnp.float32)
        return Calibration(
            hessian=self.hessian * inv[:, None] * inv[None, :],
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


def merge(a: Calibration, b: Calibration) -> Calibration:
    """Statistics of the union of the tokens behind ``a`` and ``b``.

    >>> x = jnp.arange(6.0).reshape(3, 2)
    >>> m = merge(from_inputs(x[:1]), from_inputs(x[1:]))
    >>> bool(jnp.allclose(m.hessian, from_inputs(x).hessian))
    True
    """
    n = a.count + b.count
    wa, wb = a.count / n, b.count / n
    return Calibration(
        hessian=a.hessian * wa + b.hessian * wb, mean_abs=a.mean_abs * wa + b.mean_abs * wb,
        max_abs=jnp.maximum(a.max_abs, b.max_abs), count=n,
    )  # fmt: skip
