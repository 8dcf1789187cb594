"""Sensitivity of a mixture-of-experts layer's expert stacks (`jquant.models.moe`).

The unit of choice is the **stack**: all ``E`` experts of ``layers/{i}/mlp/experts/{p}/kernel``
``(E, K, N)`` take one format, because a stack is one QArray and one grouped matmul (a
format per expert would need stacks of unlike QArrays). Its price is still counted expert
by expert: expert ``e`` multiplies only the rows routed to it, so it has its own statistics,

* ``H_e = E[x xᵀ]`` over the rows routed to ``e`` (`jquant.calib.stats.from_routed`),
* ``G_ej = Σ_s (∂L/∂y_sj)² / T`` over the rows routed to ``e`` (the gradient at the grouped
  matmul's output row, before the routing weight multiplies it),

and the stack's predicted ``Δ mean CE`` is the sum of its experts' costs,
``½ Σ_e Σ_j G_ej ΔW_e[:, j]ᵀ H_e ΔW_e[:, j]``, with ``ΔW_e`` what quantization leaves of
expert ``e``: GPTQ on its own ``H_e``, or the data-free fallback that calibrated
quantization uses for an expert with too few calibration rows (`jquant.calib._experts`,
with a recipe's default ``experts:`` settings).

An expert that received no calibration rows would cost nothing (``H_e = 0``, ``G_e = 0``)
and the allocator could then crush its stack for free, although the expert does receive
tokens in use. It is priced as the average expert instead: its ``H`` and ``G`` are the means
of those of the stack's experts that received rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.calib import CALIBRATED, _experts, stats
from jquant.recipe import ExpertCalibration

is_stack = _experts.is_stack


def row_experts(group_sizes, m: int):
    """``(M,)`` int32: the expert of each of ``m`` rows sorted by expert (``E`` for rows past
    ``sum(group_sizes)``, which belong to no expert)."""
    sizes = jnp.asarray(group_sizes, jnp.int32)
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right").astype(jnp.int32)


def routed_input_stats(rows, group_sizes):
    """Unnormalised per-expert ``(Σ x xᵀ (E, K, K), Σ |x| (E, K), max |x| (E, K), rows (E,))``
    of rows sorted by expert, the stack's counterpart of a kernel's input sums."""
    c = stats.from_routed(rows, group_sizes)
    n = c.count
    return c.hessian * n[:, None, None], c.mean_abs * n[:, None], c.max_abs, n


@jax.custom_vjp
def probe(y, p, experts):
    """Identity in ``y (M, N)``; the cotangent of ``p (E, N)`` is, per expert, ``Σ g²`` over
    the rows of ``y``'s cotangent ``g`` that ``experts (M,)`` assigns to it."""
    return y


def _probe_fwd(y, p, experts):
    return y, (experts, p)


def _probe_bwd(res, g):
    experts, p = res
    g32 = g.astype(jnp.float32)
    return g, jax.ops.segment_sum(g32 * g32, experts, num_segments=p.shape[0]), None


probe.defvjp(_probe_fwd, _probe_bwd)


def cost_statistics(calibration: stats.Calibration, grad_sq) -> tuple[np.ndarray, np.ndarray]:
    """``(H (E, K, K), G (E, N))`` that price a stack: each expert's own, an expert without
    calibration rows given the means over the experts with rows (module docstring)."""
    h = np.asarray(calibration.hessian, np.float32)
    g = np.asarray(grad_sq, np.float32)
    seen = np.asarray(calibration.count) > 0
    if seen.any() and not seen.all():
        h = np.where(seen[:, None, None], h, h[seen].mean(axis=0))
        g = np.where(seen[:, None], g, g[seen].mean(axis=0))
    return h, g


def stack_quantized(w, rule, calibration: stats.Calibration, *, positions: int, quantize):
    """The QArray stack that calibrated quantization makes of ``w (E, K, N)`` under ``rule``
    (resolved for one expert's ``(K, N)``): each expert by ``quantize(w_e, calib_e, rule,
    path) -> (qarray, info)`` on its own statistics, or by the data-free fallback when it
    received fewer rows than a recipe's default ``experts:`` settings allow out of
    ``positions`` calibration tokens."""
    fallback = _experts.fallbacks(calibration.count, rule, ExpertCalibration(), positions,
                                  calibrated=rule.algorithm in CALIBRATED)  # fmt: skip
    q, _, _ = _experts.solve(w, calibration, rule=rule, path="tensor", fallback=fallback,
                             quantize=quantize)  # fmt: skip
    return q


@jax.jit
def stack_cost(dw, h, g):
    """``½ Σ_e Σ_j g_ej ΔW_e[:, j]ᵀ H_e ΔW_e[:, j]`` for ``ΔW (E, K, N)``, ``H (E, K, K)``,
    ``g (E, N)``."""
    hd = jnp.einsum("ekl,eln->ekn", h, dw, precision=jax.lax.Precision.HIGHEST)
    return 0.5 * jnp.sum(hd * dw * g[:, None, :])
