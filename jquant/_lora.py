"""`LoRAWeight`: a frozen (quantized) kernel plus a trainable low-rank update, for jquant.ops.

``x @ LoRAWeight(base, a, b, scale)`` is ``x @ base + scale * (x @ a) @ b``: the base runs
through `jquant.ops` as any QArray does (its fused kernel where one applies), and the
adapter through two small float matmuls, so the base is never dequantized into a float
copy of its own. `jquant.qat.lora` makes them.
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
