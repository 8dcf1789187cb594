"""Choosing one candidate per tensor within a budget: `allocate` and its `Allocation`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from jquant.alloc.knapsack import BudgetError, solve
from jquant.alloc.table import Sensitivity, option_groups
from jquant.models.convert import EMBED_PATH, HEAD_PATH


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocation:
    """The chosen candidate per tensor, with the prediction and the bytes."""

    choice: dict[str, str]  # path -> candidate name
    predicted: float  # Δ mean cross-entropy (Δ log perplexity), summed over tensors
    weight_bytes: int  # every weight, float leaves included
    # The weight bytes one token reads: of each expert stack ``k / E`` (rounded down as
    # `jquant.memory_report` rounds it); ``weight_bytes`` for a model without experts.
    active_bytes: int
    experts_per_token: int  # a mixture-of-experts model's top-k k; 0 without experts
    experts: int  # and its experts per stack E (the most of any stack); 0 without
    budget: int
    elements: int
    tied: bool
    kernel_candidates: dict[str, dict[str, Any]]
    table_candidates: dict[str, dict[str, Any]]

    @property
    def predicted_percent(self) -> float:
        """Predicted perplexity increase in percent: ``100 (exp(ΔCE) - 1)``."""
        return 100.0 * math.expm1(self.predicted)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / self.elements

    def counts(self) -> dict[str, int]:
        """Tensors per candidate name."""
        out: dict[str, int] = {}
        for name in self.choice.values():
            out[name] = out.get(name, 0) + 1
        return out

    def recipe(self, name: str, *, awq: bool = False, description: str | None = None):
        """A `jquant.Recipe` with one rule per tensor (anchored path patterns).

        ``awq`` adds AWQ's input scales (``algorithm_args: {awq: true}``) to every GPTQ rule;
        the scales are searched per layer for the formats chosen there.
        """
        from jquant.recipe import Recipe

        rules = []
        order = sorted(self.choice, key=_path_order)
        for path in order:
            cands = self.table_candidates if path in (EMBED_PATH, HEAD_PATH) and (
                self.tied or path == EMBED_PATH) else self.kernel_candidates
            settings = json.loads(json.dumps(cands[self.choice[path]]))
            if awq and settings.get("algorithm") == "gptq":
                settings["algorithm_args"] = {**settings.get("algorithm_args", {}), "awq": True}
            rules.append({"pattern": f"^{re.escape(path)}$", **settings})
        text = description or (
            f"Allocated by jquant allocate to {self.budget / 1e6:.2f} MB: "
            f"{self.weight_bytes / 1e6:.2f} MB of weights, {self.bits_per_weight:.3f} bits "
            f"per weight, predicted +{self.predicted_percent:.1f}% perplexity; "
            + ", ".join(f"{n} x{c}" for n, c in sorted(self.counts().items())) + "."
        )
        return Recipe.from_dict({"name": name, "description": text, "rules": rules})

    def summary(self) -> str:
        counts = ", ".join(f"{n} x{c}" for n, c in sorted(self.counts().items()))
        active = (f", {self.active_bytes / 1e6:.2f} MB active per token ({self.experts_per_token}"
                  f" of {self.experts} experts)" if self.experts else "")  # fmt: skip
        return (f"{self.weight_bytes / 1e6:.2f} MB ({self.bits_per_weight:.3f} bits/weight)"
                f"{active} within {self.budget / 1e6:.2f} MB; predicted "
                f"+{self.predicted_percent:.2f}% perplexity; {counts}")  # fmt: skip


def _path_order(path: str):
    m = re.match(r"^layers/(\d+)/(.*)$", path)
    if path == EMBED_PATH:
        return (0, 0, path)
    if m:
        return (1, int(m.group(1)), m.group(2))
    return (2, 0, path)


def allocate(table: Sensitivity, budget: int, *, resolution: int = 200_000) -> Allocation:
    """The least-predicted-cost candidate per tensor whose weights fit ``budget`` bytes.

    Raises:
      BudgetError: the budget is below the smallest model the candidates allow.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
    labels, groups = option_groups(table)
    room = budget - table.fixed_bytes
    try:
        if room <= 0:
            raise BudgetError("")
        choice = solve(groups, room, resolution=resolution)
    except BudgetError:
        need = table.smallest_bytes()
        raise BudgetError(
            f"the budget of {budget / 1e6:.2f} MB ({8 * budget / table.elements:.3f} bits "
            f"per weight) is below the smallest model the candidates allow: "
            f"{need / 1e6:.2f} MB ({8 * need / table.elements:.3f} bits per weight), "
            f"{(need - budget) / 1e6:.2f} MB short"
        ) from None
    picked: dict[str, str] = {}
    for lab, oi in zip(labels, choice.picks):
        picked.update(lab[oi])
    k = table.experts_per_token
    idle = sum(table.options[p][picked[p]].nbytes * (e - k) // e
               for p, e in table.experts.items())  # fmt: skip
    weight_bytes = choice.nbytes + table.fixed_bytes
    return Allocation(
        choice=picked, predicted=choice.cost, weight_bytes=weight_bytes,
        active_bytes=weight_bytes - idle, experts_per_token=k,
        experts=max(table.experts.values(), default=0),
        budget=budget, elements=table.elements, tied=table.tied,
        kernel_candidates=table.kernel_candidates, table_candidates=table.table_candidates,
    )  # fmt: skip
