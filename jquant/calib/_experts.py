"""Expert stacks ``(E, K, N)`` (`jquant.models.moe`) in calibrated quantization.

Each expert's ``(K, N)`` slice is quantized by its rule's algorithm on its own statistics
(`jquant.calib.stats.from_routed`: the rows routed to it, or every token with a recipe's
``experts: {tokens: all}``), as if it were a Dense kernel, and the slices are stacked into one
QArray (the layout `jquant.quantize` gives a stack: each expert along its own ``K``). An
expert that saw fewer calibration tokens than `ExpertCalibration.min_tokens` (none at all,
always) is quantized by the data-free fallback instead (`fallbacks`); the driver warns and
reports which. The calibrated experts' infos are stacked, one entry per calibrated expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant._moe_settings import ExpertCalibration
from jquant.calib.stats import Calibration
from jquant.qarray import QArray
from jquant.recipe import Rule

#: ``info`` keys of a stack's result: the rows each expert saw, and which fell back.
TOKENS, FALLBACK = "expert_tokens", "expert_fallback"


def is_stack(w) -> bool:
    """Whether ``w`` is an expert stack ``(E, K, N)`` (the decoder layers' only 3-D kernels)."""
    return getattr(w, "ndim", 0) == 3


def as_matrix(w):
    """A stack ``(E, K, N)`` as one ``(K, E·N)`` kernel (each expert's columns side by side),
    a 2-D kernel as it is: the consumers of a scale shared by every expert. Quantized along
    ``K`` per column, it has the codes of the stack quantized expert by expert."""
    if not is_stack(w):
        return w
    e, k, n = w.shape
    return jnp.moveaxis(w, 0, 1).reshape(k, e * n)


def fallbacks(count, rule: Rule, settings: ExpertCalibration, tokens: int, *,
              calibrated: bool) -> tuple[str | None, ...]:  # fmt: skip
    """Per expert: None (quantized by ``rule``), or the data-free algorithm that replaces a
    calibrated one for an expert with fewer rows (``count``, concrete) than
    ``settings.min_tokens(tokens)``, or none."""
    count = np.asarray(count)
    if not calibrated:
        return (None,) * len(count)
    low = settings.min_tokens(tokens)
    return tuple(settings.fallback if n <= 0 or n < low else None for n in count)


def solve(w, calib: Calibration, *, rule: Rule, path: str, fallback: tuple[str | None, ...],
          quantize: Callable) -> tuple[QArray, dict, tuple]:  # fmt: skip
    """``(qarray, info, (output error, weight error))`` of the stack ``w (E, K, N)``.

    ``quantize(w_e, calib_e, rule, path) -> (qarray, info)`` quantizes one expert's slice
    (``rule`` resolved for a ``(K, N)`` kernel); ``fallback`` is `fallbacks`'s answer.
    """
    if len(fallback) != w.shape[0]:
        raise ValueError(f"{path}: {len(fallback)} fallback entries for {w.shape[0]} experts")
    alone = dataclasses.replace(rule, axis=0)
    qs, infos = [], []
    for e, name in enumerate(fallback):
        r = alone if name is None else dataclasses.replace(alone, algorithm=name,
                                                            algorithm_args={})  # fmt: skip
        q, info = quantize(w[e], jax.tree.map(lambda a, e=e: a[e], calib), r, path)
        qs.append(q)
        if name is None:
            infos.append(info)
    q = jax.tree.map(lambda *xs: jnp.stack(xs), *qs)
    info = {k: jnp.stack([i[k] for i in infos]) for k in (infos[0] if infos else {})}
    info[TOKENS] = calib.count
    info[FALLBACK] = jnp.asarray([name is not None for name in fallback])
    return q, info, output_error(w, q, calib)


@jax.jit
def output_error(w, q: QArray, calib: Calibration):
    """``(E‖xΔW‖² / E‖xW‖², ‖ΔW‖ / ‖W‖)`` of a stack, each expert's error on its own
    statistics and weighted by its rows: the mean over every row the experts received."""

    def part(args):
        w_e, q_e, h_e = args
        x = w_e.astype(jnp.float32)
        d = x - q_e.dequantize(jnp.float32)
        return (jnp.sum(jnp.dot(h_e, d) * d), jnp.sum(jnp.dot(h_e, x) * x),
                jnp.sum(d * d), jnp.sum(x * x))  # fmt: skip

    num, den, dsq, wsq = jax.lax.map(part, (w, q, calib.hessian))
    n = calib.count
    tiny = jnp.float32(1e-30)
    return (jnp.sum(n * num) / jnp.maximum(jnp.sum(n * den), tiny),
            jnp.sqrt(jnp.sum(dsq)) / jnp.maximum(jnp.sqrt(jnp.sum(wsq)), tiny))  # fmt: skip

