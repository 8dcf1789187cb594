"""Automatic bit allocation: the best recipe a budget allows, written out as plain YAML.

1. **Measure** (`measure`): one forward and backward pass over calibration windows gathers,
   for every matmul kernel, its input second moment ``H`` and the squared loss gradients at
   its outputs ``G`` (`jquant.alloc.sensitivity`); every tensor is then quantized in every
   candidate format (with the candidate's algorithm: GPTQ uses ``H``) and priced: the
   predicted increase of the mean cross-entropy ``½ Σ_j G_j ΔW_jᵀ H ΔW_j`` and the bytes.
   The table is cached, so a second budget costs seconds.
2. **Allocate** (`allocate`): one candidate per tensor, least total predicted cost, total
   bytes (every weight counted, float leaves included) within the budget: a multiple-choice
   knapsack solved by dynamic programming (`jquant.alloc.knapsack`). A tied embedding may
   keep one shared table or be split into an embedding and a head of different formats.
3. **Write** (`Allocation.recipe`): a `jquant.Recipe` with one explicit rule per tensor,
   which ``jquant quantize --recipe`` runs like any other.

The budget (`budget_bytes`) is given as bits per weight, as a size, or as an accelerator
with a context and batch to serve (the memory report's KV cache and overhead subtracted).

>>> table = measure(model, params, tokens)  # doctest: +SKIP
>>> allocate(table, budget_bytes(table, target_bits=4.25)).recipe("smollm2-4.25b")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jquant import settings
from jquant.alloc.knapsack import BudgetError, solve
from jquant.alloc.sensitivity import Candidate, Option, candidate
from jquant.models.convert import EMBED_PATH, HEAD_PATH

__all__ = ["BudgetError", "Candidate", "candidate", "measure", "allocate", "budget_bytes",
           "Sensitivity", "Allocation", "KERNEL_CANDIDATES", "TABLE_CANDIDATES"]  # fmt: skip

_GPTQ = {"algorithm": "gptq", "algorithm_args": {"mse": True}}

#: What a decoder kernel (or an untied head) may become: GPTQ with a clip search per group,
#: asymmetric 3- to 6-bit codes in groups of 64 (a bf16 scale and zero point each: 3.5 to
#: 6.5 bits per weight), or int8 per output channel.
KERNEL_CANDIDATES: tuple[Candidate, ...] = (
    candidate("uint3-g64", weight="uint3", group_size=64, **_GPTQ),
    candidate("uint4-g64", weight="uint4", group_size=64, **_GPTQ),
    candidate("uint5-g64", weight="uint5", group_size=64, **_GPTQ),
    candidate("uint6-g64", weight="uint6", group_size=64, **_GPTQ),
    candidate("int8", weight="int8", **_GPTQ),
)
#: What the embedding table (and a tied head) may become: no Hessian for a gather, so
#: round-to-nearest with a searched clip per group, per-row int8, or bfloat16.
TABLE_CANDIDATES: tuple[Candidate, ...] = (
    candidate("uint4-g64", weight="uint4", group_size=64,
              algorithm_args={"clip_search": {"grid": 20}}),
    candidate("uint6-g64", weight="uint6", group_size=64,
              algorithm_args={"clip_search": {"grid": 20}}),
    candidate("int8", weight="int8"),
    candidate("bfloat16", skip=True, dtype="bfloat16"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sensitivity:
    """Every tensor priced under every candidate, and what the budget math needs."""

    # {path: {candidate name: Option}}; a tied model's table appears as EMBED_PATH (the
    # gather) and HEAD_PATH (the head's matmul), both for the table candidates.
    options: dict[str, dict[str, Option]]
    # Candidate name -> rule settings, for the kernels and for the table.
    kernel_candidates: dict[str, dict[str, Any]]
    table_candidates: dict[str, dict[str, Any]]
    tied: bool
    # Bytes of every leaf no candidate covers (norms, biases), and all weights' elements.
    fixed_bytes: int
    elements: int
    # The HF-style config (for --fit's KV cache) and the float model's calibration loss.
    config: dict[str, Any]
    loss: float
    tokens: int

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        d = json.loads(text)
        d["options"] = {p: {n: Option(**o) for n, o in opts.items()}
                        for p, opts in d["options"].items()}  # fmt: skip
        return cls(**d)

    def smallest_bytes(self) -> int:
        return sum(min(b for _, b in g) for g in _groups(self)[1]) + self.fixed_bytes


def _fingerprint(params, tokens, kernel_cands, table_cands, extra) -> str:
    from jquant.transform import path_str

    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: hasattr(x, "get_value"))
    for keys, leaf in flat:
        value = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf)
        h.update(f"{path_str(keys)}{value.shape}{value.dtype}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(json.dumps([[c.name, dict(c.settings)] for c in (*kernel_cands, *table_cands)],
                        sort_keys=True).encode())  # fmt: skip
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where priced tables are kept: ``sensitivity/`` under `jquant.settings.cache_dir`."""
    return settings.cache_dir() / "sensitivity"


def measure(model, params, tokens, *, config: Mapping[str, Any] | None = None,
            kernel_candidates: Sequence[Candidate] = KERNEL_CANDIDATES,
            table_candidates: Sequence[Candidate] = TABLE_CANDIDATES, batch_size: int = 2,
            cache: bool = True, progress: bool = True) -> Sensitivity:  # fmt: skip
    """Prices every tensor of a float jquant Llama-family model under every candidate.

    Args:
      model, params: the model and its float parameter State.
      tokens: calibration windows ``(samples, seq_len)`` (`jquant.calib.calibration_tokens`).
      config: the HF-style config dict (for `budget_bytes`' ``fit``); built from the model's
        config when None.
      kernel_candidates, table_candidates: the formats to price (names must be unique).
      batch_size: windows per forward/backward pass.
      cache: read and write the priced table under `cache_dir`, keyed by the weights, the
        tokens and the candidates.
      progress: progress bars.
    """
    from jquant.alloc import sensitivity
    from jquant.memory import memory_report

    for cands, what in ((kernel_candidates, "kernel"), (table_candidates, "table")):
        names = [c.name for c in cands]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{what} candidates need unique names, at least one: {names}")
    config = dict(config) if config is not None else _hf_config(model.config)
    key = _fingerprint(params, tokens, kernel_candidates, table_candidates,
                       {"batch": batch_size})  # fmt: skip
    path = cache_dir() / f"{key}.json"
    if cache and path.is_file():
        try:
            return Sensitivity.from_json(path.read_text())
        except (ValueError, TypeError, KeyError):
            pass  # a stale or damaged cache entry is measured again
    stats = sensitivity.collect(model, params, tokens, batch_size=batch_size, progress=progress)
    options = sensitivity.price(params, stats, kernel_candidates, table_candidates,
                                progress=progress)  # fmt: skip
    report = memory_report(params)
    covered = set(options)
    flat = _flat(params)
    fixed = sum(_leaf_bytes(v) for p, v in flat.items() if p not in covered)
    table = Sensitivity(
        options=options,
        kernel_candidates={c.name: dict(c.settings) for c in kernel_candidates},
        table_candidates={c.name: dict(c.settings) for c in table_candidates},
        tied=bool(model.config.tie_word_embeddings), fixed_bytes=int(fixed),
        elements=int(report.weight_elements), config=config, loss=stats.loss,
        tokens=stats.tokens,
    )  # fmt: skip
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(table.to_json())
        os.replace(tmp, path)
    return table


def _hf_config(c) -> dict[str, Any]:
    return {"num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "hidden_size": c.hidden_size}  # fmt: skip


def _flat(params) -> dict[str, Any]:
    from jquant.transform import path_str

    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: hasattr(x, "get_value"))
    return {path_str(k): (v.get_value() if hasattr(v, "get_value") else v) for k, v in flat}


def _leaf_bytes(v) -> int:
    if not hasattr(v, "shape"):
        return 0
    return math.prod(v.shape) * np.dtype(v.dtype).itemsize


# ---- the budget ------------------------------------------------------------------------

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


# ---- allocation -------------------------------------------------------------------------


def _groups(table: Sensitivity):
    """``(labels, groups)``: per group its options as ``(cost, bytes)`` and what each means
    (``{path: candidate name}``)."""
    labels, groups = [], []
    for path, opts in table.options.items():
        if path in (EMBED_PATH, HEAD_PATH) and table.tied:
            continue
        names = list(opts)
        labels.append([{path: n} for n in names])
        groups.append([(opts[n].cost, opts[n].nbytes) for n in names])
    if table.tied:
        emb, head = table.options[EMBED_PATH], table.options[HEAD_PATH]
        lab, grp = [], []
        for fe in emb:
            for fh in head:
                shared = fe == fh
                nbytes = emb[fe].nbytes + (0 if shared else head[fh].nbytes)
                lab.append({EMBED_PATH: fe, HEAD_PATH: fh})
                grp.append((emb[fe].cost + head[fh].cost, nbytes))
        labels.append(lab)
        groups.append(grp)
    return labels, groups


@dataclasses.dataclass(frozen=True, kw_only=True)
class Allocation:
    """The chosen candidate per tensor, with the prediction and the bytes."""

    choice: dict[str, str]  # path -> candidate name
    predicted: float  # Δ mean cross-entropy (Δ log perplexity), summed over tensors
    weight_bytes: int  # every weight, float leaves included
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
        return (f"{self.weight_bytes / 1e6:.2f} MB ({self.bits_per_weight:.3f} bits/weight) "
                f"within {self.budget / 1e6:.2f} MB; predicted +{self.predicted_percent:.2f}% "
                f"perplexity; {counts}")  # fmt: skip


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
    labels, groups = _groups(table)
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
    return Allocation(
        choice=picked, predicted=choice.cost, weight_bytes=choice.nbytes + table.fixed_bytes,
        budget=budget, elements=table.elements, tied=table.tied,
        kernel_candidates=table.kernel_candidates, table_candidates=table.table_candidates,
    )  # fmt: skip
