"""LoRA weights for jquant.ops: a frozen (quantized) kernel plus low-rank updates.

``x @ LoRAWeight(base, a, b, scale)`` is ``x @ base + scale * (x @ a) @ b``: the base runs
through `jquant.ops` as any QArray does (its fused kernel where one applies), and the
adapter through two small float matmuls, so the base is never dequantized into a float
copy of its own. `jquant.qat.lora` makes them.

``x @ MultiLoRAWeight(base, a, b, rows)`` serves several adapters in one batch (S-LoRA,
Punica): row ``i`` of ``x`` (its leading axis) gets adapter ``rows[i]``, 0 being none,

    y[i] = x[i] @ base + (x[i] @ a[rows[i] - 1]) @ b[rows[i] - 1]     (rows[i] >= 1)

with every adapter's scale already folded into its ``b`` and ranks zero-padded to one.
`jquant.serve.adapters` makes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jquant._weight import weight_wrapper


@weight_wrapper("base", misuse=(
    "a LoRAWeight is a quantized base plus an adapter: pass it to jquant.ops (qdot), run the "
    "model through jquant.apply, or merge it (jquant.qat.lora.merge)"))
class LoRAWeight:
    """``base (K, N)`` (a QArray or an array) + ``scale * a (K, r) @ b (r, N)``."""

    base: Any
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True), default=1.0)


@weight_wrapper("base", misuse=(
    "a MultiLoRAWeight is a serving weight (a base and a stack of adapters): pass it to "
    "jquant.ops.qdot with its rows set (jquant.serve.adapters.bind_rows)"))
class MultiLoRAWeight:
    """``base (K, N)`` and ``A`` adapters ``a (A, K, r)``, ``b (A, r, N)`` (scale folded in);
    ``rows (R,)`` int32 picks each row's adapter, 1-based, 0 for the base alone. ``rows``
    is None until the step that runs it binds it."""

    base: Any
    a: jax.Array
    b: jax.Array
    rows: jax.Array | None = None
