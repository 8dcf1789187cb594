"""The budget of automatic bit allocation: bits per weight, a size, or a device to fit."""

from __future__ import annotations

import math
import re

from jquant.alloc.knapsack import BudgetError
from jquant.alloc.table import Sensitivity

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10,
          "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9,
          "t": 1e12}  # fmt: skip


def parse_size(text: str | int | float) -> int:
    """Bytes of a size such as ``"100MB"``, ``"1.5 GiB"`` or ``105500000``.

    >>> parse_size("100MB"), parse_size("1KiB")
    (100000000, 1024)
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _SIZE.match(str(text))
        if not m or (m.group(2) or "").lower() not in _UNITS:
            raise ValueError(f"size {text!r} is not a number of bytes with an optional unit "
                             "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 100MB")  # fmt: skip
        value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def find_device(name: str) -> tuple[str, float]:
    """The accelerator of `jquant.memory.ACCELERATORS` that ``name`` names (case and spaces
    ignored; a unique prefix is enough): ``(full name, bytes)``.

    >>> find_device("h100")[0]
    'H100 80GB'
    """
    from jquant.memory import ACCELERATORS

    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    want = norm(name)
    exact = [k for k in ACCELERATORS if norm(k) == want]
    hits = exact or [k for k in ACCELERATORS if want and norm(k).startswith(want)]
    if len(hits) != 1:
        why = "is ambiguous" if hits else "is not a known device"
        raise ValueError(f"device {name!r} {why}; known: {', '.join(ACCELERATORS)}")
    return hits[0], ACCELERATORS[hits[0]]


def budget_bytes(table: Sensitivity, *, target_bits: float | None = None,
                 target_size: str | int | None = None, fit: str | None = None,
                 context: int | None = None, batch: int | None = None,
                 kv_cache: str = "bfloat16", overhead: float = 0.1) -> int:  # fmt: skip
    """The most bytes the model's weights may take, from exactly one kind of budget.

    Args:
      table: the measured `Sensitivity` (its element count and config).
      target_bits: average bits per weight over every weight of the float model.
      target_size: total weight bytes (`parse_size`).
      fit: an accelerator (`find_device`): the weights, the KV cache for ``context`` tokens
        of ``batch`` sequences in ``kv_cache`` format, and ``overhead`` of both must fit its
        memory, as `jquant.memory_report` counts them.

    Raises:
      ValueError: none or several kinds given, a bad value, or ``fit`` without room for
        any weights (the message says how far off).
    """
    given = [k for k, v in (("target_bits", target_bits), ("target_size", target_size),
                            ("fit", fit)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError(f"give exactly one budget: target_bits, target_size or fit "
                         f"(got {', '.join(given) or 'none'})")  # fmt: skip
    if target_bits is not None:
        if isinstance(target_bits, bool) or not isinstance(target_bits, int | float) or not (
                math.isfinite(target_bits) and target_bits > 0):
            raise ValueError(f"target_bits={target_bits!r} must be a positive number")
        return int(target_bits * table.elements / 8)
    if target_size is not None:
        return parse_size(target_size)
    from jquant.memory import KV_FORMATS, memory_report

    device, capacity = find_device(fit)
    if context is None or batch is None:
        raise ValueError("fit needs a context (tokens per sequence) and a batch (sequences)")
    if kv_cache not in KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}")
    kv = memory_report({}, batch=batch, context=context, kv_cache=kv_cache,
                       config=table.config, overhead=overhead).kv_cache_bytes  # fmt: skip
    room = int(capacity / (1 + overhead)) - kv
    need = table.smallest_bytes()
    if room < need:
        total = int((need + kv) * (1 + overhead))
        raise BudgetError(
            f"nothing fits on {device} ({capacity / 1e9:.0f} GB) at context {context}, batch "
            f"{batch}, {kv_cache} KV cache: the KV cache alone takes {kv / 1e9:.2f} GB, and "
            f"the smallest model the candidates allow ({need / 1e6:.1f} MB) brings the total "
            f"with {overhead:.0%} overhead to {total / 1e9:.2f} GB, "
            f"{(total - capacity) / 1e9:.2f} GB over"
        )
    return room
