"""Taps: how calibration sees the input of every quantized matmul, in any model.

A `Tap` stands in a parameter tree where a float kernel was. It is a pytree (the kernel
is its leaf, the parameter path static), so it passes through ``jit`` and
``nnx.merge``. When a `jquant.ops` matmul (``qdot``, ``qdot_general``, ``qeinsum``; so
jquant's Llama and, through the interceptors, stock Flax ``Dense``/``Linear`` layers)
meets a Tap as its weight, it calls the active handler with the activations and the
Tap; the handler returns the weight to use instead (the float kernel while statistics
are gathered, the kernel's QArray while quantizing). Handlers run at trace time, so they
see tracers and must stay traceable.

An MoE layer's expert stack ``(E, K, N)`` meets its Tap in
`jquant.models.moe.grouped_matmul`, whose rows are sorted by expert: the handler then
receives a `Routed` (the rows and how many belong to each expert) in place of ``x``.

>>> import jax.numpy as jnp
>>> from jquant import ops
>>> from jquant._tap import Tap, tapping
>>> seen = []
>>> def record(x, tap):
...     seen.append((tap.path, x.shape))
...     return tap.value
>>> with tapping(record):
...     y = ops.qdot(jnp.ones((2, 3)), Tap(jnp.ones((3, 4)), "w"))
>>> seen, y.shape
([('w', (2, 3))], (2, 4))
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jquant._weight import weight_wrapper

Handler = Callable[[jax.Array, "Tap"], Any]


@dataclasses.dataclass(frozen=True)
class Rewired:
    """A handler's answer that also rewrites the matmul's output: ``output(y)`` replaces
    ``y``. Sensitivity measurement uses it to see the gradient at every kernel's output."""

    weight: Any
    output: Callable[[jax.Array], jax.Array]


class Routed(NamedTuple):
    """What a handler receives for an expert stack's Tap: the rows of its grouped matmul."""

    rows: jax.Array  # (M, K), sorted by expert
    group_sizes: jax.Array  # (E,) int32: expert e owns the next group_sizes[e] rows


_state = threading.local()


@weight_wrapper("value")
class Tap:
    """A float kernel marked for calibration: ``value`` ``(K, *out)``, contraction axis 0."""

    value: jax.Array
    path: str = dataclasses.field(metadata=dict(static=True), default="")


@contextlib.contextmanager
def tapping(handler: Handler):
    """Makes ``handler(x, tap)`` resolve every Tap that a `jquant.ops` matmul meets."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(handler)
    try:
        yield handler
    finally:
        stack.pop()


def resolve(x, tap: Tap, *, contracting_axis: int = -1):
    """``(weight, output)``: the weight to use for ``tap`` given activations ``x``
    (contracted on one axis), and the function the matmul's result goes through.

    ``x`` reaches the handler with the contracted axis last. A handler returns the weight,
    or a `Rewired` to rewrite the output too.
    """
    stack = getattr(_state, "stack", None)
    if not stack:
        raise ValueError(
            f"{tap.path}: a calibration Tap reached a matmul outside jquant.calib.tapping(); "
            "taps only exist while a calibrated quantization runs"
        )
    x = jax.numpy.moveaxis(x, contracting_axis, -1)
    answer = stack[-1](x, tap)
    if isinstance(answer, Rewired):
        return answer.weight, answer.output
    return answer, _identity


def resolve_grouped(rows, tap: Tap, group_sizes):
    """``(weight, output)`` for an expert stack ``tap`` ``(E, K, N)`` multiplying ``rows
    (M, K)`` sorted by expert (`jquant.models.moe.grouped_matmul`): the handler gets
    ``Routed(rows, group_sizes)``."""
    stack = getattr(_state, "stack", None)
    if not stack:
        raise ValueError(
            f"{tap.path}: a calibration Tap reached a grouped matmul outside "
            "jquant.calib.tapping(); taps only exist while a calibrated quantization runs"
        )
    answer = stack[-1](Routed(rows, group_sizes), tap)
    if isinstance(answer, Rewired):
        return answer.weight, answer.output
    return answer, _identity


def input_key(x) -> int:
    """The identity of a handler's input (a `Routed`'s rows): matmuls that share an input
    (q/k/v, gate/up, an expert stack's gate/up) give the same key."""
    return id(x.rows if isinstance(x, Routed) else x)


def _identity(y):
    return y


def with_taps(params, paths):
    """``params`` (any parameter tree, `jquant.tree` paths) with the leaves at ``paths``
    wrapped in Taps (an ``nnx.Variable`` keeps its type and holds the Tap); every other
    leaf is the very same object.

    >>> import jax.numpy as jnp
    >>> tapped = with_taps({"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, {"w"})
    >>> type(tapped["w"]).__name__, tapped["w"].path, type(tapped["b"]).__name__
    ('Tap', 'w', 'ArrayImpl')
    """
    from jquant import tree  # jquant.tree imports the recipe and so the algorithms, ops

    return tree.map_with_path(lambda p, v: Tap(v, p) if p in paths else v, params)
