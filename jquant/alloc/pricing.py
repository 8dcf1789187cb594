"""Pricing: what each candidate format costs each tensor, from `jquant.alloc.sensitivity`'s
statistics.

A `Candidate` is a recipe rule's settings without its pattern. A kernel's price under it is
``½ Σ_j G_j ΔW[:, j]ᵀ H ΔW[:, j]`` with ``ΔW`` what the candidate's algorithm leaves of the
weight (GPTQ on the kernel's own ``H``), an expert stack's the sum over its experts
(`jquant.alloc.experts`), the embedding table's ``½ Σ C ⊙ ΔE²`` (and a tied head's the
head's matmul term), each with the bytes the candidate stores.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from jquant import algorithms, tree
from jquant.alloc import experts
from jquant.alloc.sensitivity import KernelStats, Statistics, Totals
from jquant.models.convert import EMBED_PATH, HEAD_PATH
from jquant.qarray import QArray
from jquant.recipe import Rule


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to store a tensor: a recipe rule's settings (without its pattern)."""

    name: str
    settings: Mapping[str, Any]

    def rule(self, pattern: str = ".") -> Rule:
        return Rule(pattern=pattern, **self.settings)

    def resolved(self, path: str) -> Rule:
        """The rule made concrete for a 2-D tensor at ``path`` (skip rules as they are)."""
        rule = self.rule()
        return rule if rule.skip else rule.resolve(path, 2)


def candidate(name: str, **settings) -> Candidate:
    """A `Candidate`; its settings are checked as a rule's are.

    >>> candidate("int8", weight="int8").rule().weight
    'int8'
    """
    c = Candidate(name=name, settings=dict(settings))
    try:
        c.rule()
    except ValueError as e:
        raise ValueError(f"candidate {name!r}: {e}") from None
    return c


@dataclasses.dataclass(frozen=True)
class _Key:
    """A hashable stand-in for a rule in jit's static arguments (keyed by its settings)."""

    text: str
    rule: Rule = dataclasses.field(compare=False, hash=False)


def _delta(w, rule: Rule, path: str, calib, *, positions: int = 0):
    """``(W - dequantized, nbytes)`` of ``w`` under a resolved rule (skip: a float cast); an
    expert stack expert by expert (`jquant.alloc.experts.stack_quantized`; ``positions``:
    the calibration tokens)."""
    if rule.skip:
        dtype = jnp.float32 if rule.dtype is None else jnp.dtype(rule.dtype)
        w32 = jnp.asarray(w, jnp.float32)
        return w32 - w32.astype(dtype).astype(jnp.float32), math.prod(w.shape) * dtype.itemsize
    if experts.is_stack(w):
        q = experts.stack_quantized(w, rule, calib, positions=positions, quantize=_quantize)
    else:
        q, _ = _quantize(w, calib, rule, path)
    return _residual(w, q), q.nbytes


def _quantize(w, calib, rule: Rule, path: str):
    """``(qarray, {})`` of a 2-D ``w`` by ``rule``'s algorithm, one ``jit`` per rule."""
    settings = {k: v for k, v in rule.to_dict().items() if k != "pattern"}
    return _quantize_jit(w, calib, key=_Key(repr(sorted(settings.items())), rule))


@functools.partial(jax.jit, static_argnames=("key",))
def _quantize_jit(w, calib, *, key: _Key):
    rule = key.rule
    out = algorithms.get(rule.algorithm)(w, rule, path="tensor", calibration=calib)
    q, _ = algorithms.split_result(rule.algorithm, out)
    assert isinstance(q, QArray)
    return q, {}


@jax.jit
def _residual(w, q: QArray):
    return jnp.asarray(w, jnp.float32) - q.dequantize(jnp.float32)


@jax.jit
def _kernel_cost(dw, h, g):
    """½ Σ_j g_j ΔW[:, j]ᵀ H ΔW[:, j] for ``ΔW (K, N)``."""
    return 0.5 * jnp.sum(jnp.dot(h, dw, precision=jax.lax.Precision.HIGHEST) * dw * g[None, :])


@jax.jit
def _rows_cost(de, c):
    """½ Σ C ⊙ ΔE² (the gather)."""
    return 0.5 * jnp.sum(c * de * de)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Option:
    """A candidate for one tensor: its predicted cost (Δ mean CE) and its bytes."""

    cost: float
    nbytes: int


def price_kernel(w, path: str, ks: KernelStats, candidates, *,
                 positions: int) -> dict[str, Option]:  # fmt: skip
    """Kernel (or expert stack) ``w`` at ``path`` under every candidate, with its
    statistics (GPTQ uses their ``H``; ``positions``: the calibration tokens, for an
    expert's share)."""
    out = {}
    for cand in candidates:
        dw, nbytes = _delta(w, cand.resolved(path), path, ks.calibration, positions=positions)
        if experts.is_stack(w):
            cost = experts.stack_cost(dw, *experts.cost_statistics(ks.calibration, ks.grad_sq))
        else:
            cost = _kernel_cost(dw, ks.calibration.hessian, jnp.asarray(ks.grad_sq))
        out[cand.name] = Option(cost=float(cost), nbytes=int(nbytes))
    return out


def price_table(table, totals: Totals, candidates) -> dict[str, dict[str, Option]]:
    """The embedding table under every candidate (``{EMBED_PATH: ...}``), and a tied model's
    head (``HEAD_PATH``: the same ``ΔE`` seen by the head's matmul)."""
    out: dict[str, dict[str, Option]] = {EMBED_PATH: {}}
    c = jnp.asarray(totals.embed_grad_sq)
    head = totals.tied_head
    for cand in candidates:
        de, nbytes = _delta(table, cand.resolved(EMBED_PATH), EMBED_PATH, None)
        out[EMBED_PATH][cand.name] = Option(cost=float(_rows_cost(de, c)), nbytes=int(nbytes))
        if head is not None:
            cost = _kernel_cost(de.T, head.calibration.hessian, jnp.asarray(head.grad_sq))
            out.setdefault(HEAD_PATH, {})[cand.name] = Option(cost=float(cost),
                                                             nbytes=int(nbytes))
    return out


def price(params: nnx.State, statistics: Statistics, kernel_candidates, table_candidates, *,
          progress: bool = True) -> dict[str, dict[str, Option]]:  # fmt: skip
    """Every tensor's `Option` under every candidate: ``{path: {candidate name: Option}}``.

    Decoder kernels (and an untied head) get ``kernel_candidates`` (`price_kernel`), an
    expert stack one candidate for all its experts, priced expert by expert
    (`jquant.alloc.experts`); the embedding table gets ``table_candidates``
    (`price_table`). A tied model's table is priced twice: as the embedding (path
    ``embed_tokens/embedding``) and as the head (path ``lm_head/kernel``); the allocator
    adds the two when the table stays shared.
    """
    values = dict(tree.leaves(params))
    out = {path: price_kernel(values[path], path, ks, kernel_candidates,
                              positions=statistics.positions)
           for path, ks in tqdm(statistics.kernels.items(), desc="pricing", unit="tensor",
                                disable=not progress)}  # fmt: skip
    out.update(price_table(values[EMBED_PATH], statistics, table_candidates))
    return out
