"""The choice itself: one option per group, least total cost, total bytes within a budget.

This is the multiple-choice knapsack problem. It is solved by dynamic programming over the
budget in units of ``unit`` bytes, every option's bytes rounded *up* to whole units and the
budget rounded *down*: the answer always fits the budget, and it is the exact optimum of
the rounded problem. With ``resolution`` units over the budget (200,000 by default, 500 bytes
per unit at 100 MB) the rounding gives away at most one unit per group (about 0.1% of a
100 MB budget over 212 tensors). With integer sizes and a small budget (``unit == 1``) it is
exact, which is how the tests check it against brute force.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


class BudgetError(ValueError):
    """No choice fits the budget; the message says by how much."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Choice:
    """The solution: the option index picked in each group, its total cost and bytes."""

    picks: tuple[int, ...]
    cost: float
    nbytes: int


def solve(groups: Sequence[Sequence[tuple[float, int]]], budget: int, *,
          resolution: int = 200_000) -> Choice:  # fmt: skip
    """The least-cost choice of one ``(cost, nbytes)`` option per group within ``budget``.

    Args:
      groups: per group, its options as ``(cost, nbytes)``; every group needs one.
      budget: the most bytes the chosen options may take together.
      resolution: units the budget is divided into (see the module docstring).

    Raises:
      BudgetError: even the smallest option of every group exceeds ``budget``.

    >>> solve([[(1.0, 1), (0.0, 2)], [(5.0, 1), (0.5, 3)]], 4).picks
    (0, 1)
    """
    if not groups:
        return Choice(picks=(), cost=0.0, nbytes=0)
    for i, g in enumerate(groups):
        if not g:
            raise ValueError(f"group {i} has no options")
    smallest = sum(min(b for _, b in g) for g in groups)
    if smallest > budget:
        raise BudgetError(
            f"the budget of {budget:,} bytes is below the smallest model the candidates allow "
            f"({smallest:,} bytes, every tensor in its smallest format): "
            f"{smallest - budget:,} bytes ({100 * (smallest / max(budget, 1) - 1):.1f}%) short"
        )
    unit = max(1, math.ceil(budget / resolution))
    cap = budget // unit
    best = np.zeros(cap + 1)  # best[c]: least cost of the groups so far within c units
    picks = np.zeros((len(groups), cap + 1), np.int16)
    for gi, g in enumerate(groups):
        new = np.full(cap + 1, np.inf)
        for oi, (cost, nbytes) in enumerate(g):
            size = math.ceil(nbytes / unit)
            if size > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[size:] = best[: cap + 1 - size] + cost
            better = cand < new
            new[better] = cand[better]
            picks[gi, better] = oi
        best = new
    if not np.isfinite(best[cap]):
        raise BudgetError(
            f"the budget of {budget:,} bytes is too tight once sizes are rounded to "
            f"{unit}-byte units; raise it by {len(groups) * unit:,} bytes or the resolution"
        )
    out, c = [], cap
    for gi in reversed(range(len(groups))):
        oi = int(picks[gi, c])
        out.append(oi)
        c -= math.ceil(groups[gi][oi][1] / unit)
    out.reverse()
    return Choice(
        picks=tuple(out), cost=float(sum(groups[i][o][0] for i, o in enumerate(out))),
        nbytes=int(sum(groups[i][o][1] for i, o in enumerate(out))),
    )  # fmt: skip
