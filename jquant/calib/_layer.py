"""One decoder layer's calibration, the engine `jquant.calib.driver.calibrate` runs per layer:
the kernels found in forward order and grouped by shared input (`_groups`), their inputs'
statistics gathered over micro-batches (`_gather`, accumulated in place), AWQ/SmoothQuant
scales searched and folded (`_fold_scales`), every kernel solved by its rule's algorithm on
the mesh's devices in turn (`_solve`, `_share`), and the quantized layer run on to give the
next layer's inputs (`_run_layer`). An MoE layer's expert stacks are solved expert by expert
(`jquant.calib._experts`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jquant import algorithms, tree
from jquant._moe_settings import ExpertCalibration
from jquant._tap import Routed, Tap, input_key, tapping, with_taps
from jquant.calib import _experts, stats
from jquant.calib.activations import Activations, Placement
from jquant.calib.fold import Fold, apply_fold
from jquant.qarray import QArray
from jquant.recipe import Rule

#: Algorithms that need the inputs' statistics (and so a calibration pass).
CALIBRATED = ("gptq", "awq", "smoothquant")

_ROUTED = ExpertCalibration()  # the default: each expert on the tokens routed to it


class _Static:
    """A hashable handle for a jit static argument that is not hashable itself."""

    def __init__(self, key, value):
        self.key, self.value = key, value

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self.key == other.key


def _settings(rule: Rule | None) -> str:
    """A rule's settings without its pattern: layers whose rules differ only in their
    patterns (a recipe with one rule per tensor) share one compiled program."""
    return repr(None if rule is None else dataclasses.replace(rule, pattern="."))


def _plan(rules: dict[str, Rule | None]) -> _Static:
    return _Static(tuple(sorted((p, _settings(r)) for p, r in rules.items())), dict(rules))


_ERROR_BYTES = 64 << 20  # float32 bytes of the columns one step of _output_error takes


def _output_error(w, q: QArray, calib: stats.Calibration):
    """``(ΔᵀHΔ / WᵀHW, ‖Δ‖ / ‖W‖)`` with ``Δ = W - Ŵ``, the products taken a chunk of
    columns at a time (the whole ``HΔ`` of a Llama-3-8B ``down_proj`` is 0.2 GiB)."""
    h = calib.hessian
    k, n = w.shape
    dw = w.astype(jnp.float32) - q.dequantize(jnp.float32)
    cols = next(c for c in range(max(1, min(n, _ERROR_BYTES // (4 * k))), 0, -1) if n % c == 0)

    def part(i):
        d, x = (jax.lax.dynamic_slice_in_dim(a, i * cols, cols, axis=1) for a in (dw, w))
        x = x.astype(jnp.float32)
        return jnp.sum(jnp.dot(h, d) * d), jnp.sum(jnp.dot(h, x) * x)

    num, den = (jnp.sum(a) for a in jax.lax.map(part, jnp.arange(n // cols)))
    werr = jnp.linalg.norm(dw) / jnp.maximum(jnp.linalg.norm(w.astype(jnp.float32)),
                                             jnp.float32(1e-30))  # fmt: skip
    return num / jnp.maximum(den, jnp.float32(1e-30)), werr


@functools.partial(jax.jit, static_argnames=("apply", "plan", "mode", "want"))
def _tapped_pass(state, args, *, apply: _Static, plan: _Static, mode: str,
                 want: tuple[str, ...] | None = None):  # fmt: skip
    """Runs ``apply(state, *args)`` with Taps resolved by the plan's rules.

    Returns ``(output, results)``: in ``"stats"`` mode the output is None and
    ``results[path]`` is the tap's `Calibration` (only the taps ``want``, when given: XLA
    then drops the work after the last of them); in ``"quantize"`` mode ``results[path]`` is
    ``(qarray, info, (output error, weight error))``.
    """
    rules = plan.value
    results: dict[str, Any] = {}
    seen: dict[int, tuple[Any, stats.Calibration]] = {}

    def handler(x, tap: Tap):
        if tap.path in results:
            raise ValueError(
                f"{tap.path}: the kernel is used by more than one matmul; "
                "calibrated quantization needs one input per kernel"
            )
        key = input_key(x)
        if key not in seen:  # q/k/v (and gate/up) share one input: one Hessian
            routed = isinstance(x, Routed)
            seen[key] = (x, stats.from_routed(*x) if routed else stats.from_inputs(x))
        calib = seen[key][1]
        rule = rules.get(tap.path)
        if mode == "stats" or rule is None:
            results[tap.path] = calib
            return tap.value
        if isinstance(x, Routed):
            raise ValueError(
                f"{tap.path}: an expert stack is calibrated expert by expert by "
                "jquant.calib.quantize_model (layer by layer), not in one tapped pass"
            )
        out = algorithms.get(rule.algorithm)(tap.value, rule, path=tap.path, calibration=calib)
        q, info = algorithms.split_result(rule.algorithm, out)
        results[tap.path] = (q, info, _output_error(tap.value, q, calib))
        return q

    with tapping(handler):
        y = apply.value(state, *args)
    # Statistics alone: not returning the output lets XLA drop the work after the last tap.
    if mode == "stats" and want is not None:
        results = {p: results[p] for p in want}
    return (None if mode == "stats" else y), results


def _scale_request(rule: Rule | None) -> tuple[str, dict] | None:
    """("awq", settings) / ("smoothquant", settings) when the rule wants input scales."""
    if rule is None:
        return None
    if rule.algorithm == "smoothquant":
        return "smoothquant", dict(rule.algorithm_args)
    if rule.algorithm == "awq":
        return "awq", dict(rule.algorithm_args)
    awq = rule.algorithm_args.get("awq")
    if awq:
        return "awq", dict(awq) if isinstance(awq, dict) else {}
    return None


_SEARCHES: dict[Any, Callable] = {}


def _fold_scales(fold: Fold, kind: str, settings: dict, weights, rules, calib):
    """The scale of one fold group, searched by AWQ or computed by SmoothQuant.

    Expert stacks among the consumers share the scale: they count as ``(K, E·N)`` kernels on
    the statistics of every row they received (`stats.pooled`: the tokens that reached the
    layer). A fold with a scale per expert (``fold.experts``, AWQ only: SmoothQuant folds
    into norms) searches each expert on its own statistics.
    """
    if fold.experts:
        return _expert_scales(settings, weights[0], rules[0], calib)
    weights = [_experts.as_matrix(w) for w in weights]
    calib = stats.pooled(calib)
    if kind == "smoothquant":
        from jquant.algorithms import smoothquant

        key = ("sq", float(settings.get("alpha", 0.5)))
        if key not in _SEARCHES:
            _SEARCHES[key] = jax.jit(lambda ws, c: smoothquant.smooth_scales(ws, c, alpha=key[1]))
        return _SEARCHES[key](weights, calib)
    from jquant.algorithms import awq

    grid = int(settings.get("grid", 20))
    key = ("awq", grid, fold.repeat, tuple(_settings(r) for r in rules))
    if key not in _SEARCHES:
        maps = {"expand": fold.expand, "reduce": fold.reduce} if fold.repeat else {}
        _SEARCHES[key] = jax.jit(
            lambda ws, c: awq.search_scales(ws, rules, c, grid=grid, **maps)
        )
    return _SEARCHES[key](weights, calib)


def _expert_scales(settings: dict, w, rule: Rule, calib):
    """AWQ's scales ``(E, N)``, one search per expert of ``w (E, K, N)`` on its statistics
    (an expert with no rows gets ones: its loss is zero for every candidate)."""
    from jquant.algorithms import awq

    grid = int(settings.get("grid", 20))
    key = ("awq-experts", grid, _settings(rule))
    if key not in _SEARCHES:
        one = lambda w_e, c_e: awq.search_scales([w_e], [rule], c_e, grid=grid)  # noqa: E731
        _SEARCHES[key] = jax.jit(jax.vmap(one))
    return _SEARCHES[key](w, calib)


def _folds_for(folds, plan: dict[str, Rule | None]):
    """(fold, kind, settings) for every fold group a consumer's rule asks scales for."""
    out = []
    for fold in folds:
        requests = [_scale_request(plan.get(p)) for p in fold.consumers]
        requests = [r for r in requests if r is not None]
        if not requests:
            continue
        kind, settings = requests[0]
        if kind == "smoothquant" and not fold.source_is_norm:
            continue  # SmoothQuant smooths the normalised inputs only (as its paper does)
        out.append((fold, kind, settings))
    return out


def _layer_apply(graphdef, every_expert: bool = False) -> _Static:
    """The layer as the statistics passes run it (``every_expert``: each token through
    every expert, for a recipe's ``experts: {tokens: all}``)."""
    from jquant.models import blocks

    return _Static(("layer", graphdef, every_expert),
                   lambda st, x, ctx: blocks.apply_layer(graphdef, st, x, ctx,
                                                         every_expert=every_expert))  # fmt: skip


def _run_layer(graphdef, state, acts: Activations, out: Activations, ctx) -> None:
    from jquant.models import blocks

    for s, x in acts.batches():
        out.write(s, blocks.run_layer(graphdef, state, x, ctx))


def _groups(state, plan, apply: _Static, acts: Activations, ctx) -> list[tuple[str, ...]]:
    """The planned kernels in the order the forward reaches them, grouped by shared input
    (``q/k/v``, ``gate/up``): traced once, nothing computed."""
    order: list[tuple[str, int]] = []

    def record(x, tap: Tap):
        order.append((tap.path, input_key(x)))
        return tap.value

    # A micro-batch over the mesh: ``acts.batch`` counts this process's windows only.
    rows = acts.batch * acts.placement.processes
    x = jax.ShapeDtypeStruct((rows, *acts.shape[1:]), acts.dtype)
    with tapping(record):
        jax.eval_shape(apply.value, with_taps(state, plan), x, ctx)
    missing = sorted(set(plan) - {p for p, _ in order})
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: never reached a jquant.ops matmul in the decoder layer, "
            "so calibration cannot quantize it"
        )
    groups: list[list[str]] = []
    last = None
    for path, key in order:
        if key != last:
            groups.append([])
        groups[-1].append(path)
        last = key
    return [tuple(g) for g in groups]


@functools.partial(jax.jit, static_argnames=("apply", "want"), donate_argnames=("total",))
def _accumulate(state, args, total, *, apply: _Static, want: tuple[str, ...]):
    """``total`` merged with one micro-batch's statistics, in place: ``total`` is donated,
    so a layer's statistics exist once plus one micro-batch's (a Llama-3-8B layer: 0.98 GB
    and the largest Hessian, 0.82 GB, instead of three copies at each merge)."""
    _, res = _tapped_pass(state, args, apply=apply, plan=_plan({}), mode="stats", want=want)
    return jax.tree.map(stats.merge, total, res, is_leaf=_is_calib)


def _is_calib(x) -> bool:
    return isinstance(x, stats.Calibration)


def _gather(tapped, acts: Activations, ctx, apply: _Static, want: tuple[str, ...],
            placement: Placement):  # fmt: skip
    """``{path: Calibration}`` of the taps ``want`` over every micro-batch of ``acts``
    (merged in micro-batch order; replicated over a mesh)."""
    total = None
    for _, x in acts.batches():
        args = (x,) if ctx is None else (x, ctx)
        if total is None:
            _, total = _tapped_pass(tapped, args, apply=apply, plan=_plan({}), mode="stats",
                                    want=want)  # fmt: skip
        else:
            total = _accumulate(tapped, args, total, apply=apply, want=want)
    return placement.replicate(total)


def _rule_key(rule: Rule) -> _Static:
    return _Static(_settings(rule), rule)


def _solve(w, calib: stats.Calibration, *, rule: _Static, path: str,
           fallback: tuple[str | None, ...] | None = None):  # fmt: skip
    """One kernel quantized by its rule on its inputs' statistics:
    ``(qarray, info, (output error, weight error))``. An eager algorithm (GPTQ) is called
    with concrete arrays, the others inside one ``jit``. An expert stack (``fallback``:
    `_experts.fallbacks`'s answer) is solved expert by expert (`_experts.solve`)."""
    r = rule.value
    if fallback is not None:
        return jax.block_until_ready(_experts.solve(w, calib, rule=r, path=path,
                                                    fallback=fallback, quantize=_quantize))
    if not algorithms.runs_eagerly(r.algorithm):
        return _solve_traced(w, calib, rule=rule, path=path)
    q, info = _quantize(w, calib, r, path)
    # Finished before the next kernel's host work starts: a sweep still running would hold
    # its buffers beside the next factorization (gate/up_proj's beside down_proj's at 8B).
    return jax.block_until_ready((q, info, _output_error_jit(w, q, calib)))


@functools.partial(jax.jit, static_argnames=("rule", "path", "fallback"))
def _solve_traced(w, calib: stats.Calibration, *, rule: _Static, path: str,
                  fallback: tuple[str | None, ...] | None = None):  # fmt: skip
    r = rule.value
    if fallback is not None:
        return _experts.solve(w, calib, rule=r, path=path, fallback=fallback,
                              quantize=_quantize)  # fmt: skip
    q, info = algorithms.split_result(
        r.algorithm, algorithms.get(r.algorithm)(w, r, path=path, calibration=calib))
    return q, info, _output_error(w, q, calib)


def _quantize(w, calib: stats.Calibration, rule: Rule, path: str):
    """``(qarray, info)`` of one kernel: an eager algorithm on concrete arrays called as it
    is, anything else through one ``jit`` per rule's settings."""
    if algorithms.runs_eagerly(rule.algorithm) and not isinstance(w, jax.core.Tracer):
        return algorithms.split_result(
            rule.algorithm, algorithms.get(rule.algorithm)(w, rule, path=path, calibration=calib))
    return _quantize_traced(w, calib, rule=_rule_key(rule), path=path)


@functools.partial(jax.jit, static_argnames=("rule", "path"))
def _quantize_traced(w, calib: stats.Calibration, *, rule: _Static, path: str):
    r = rule.value
    return algorithms.split_result(
        r.algorithm, algorithms.get(r.algorithm)(w, r, path=path, calibration=calib))


_output_error_jit = jax.jit(_output_error)


def _calibrate_layer(state, plan, acts: Activations, out: Activations, ctx, *, graphdef,
                     folds, sequential: str, placement: Placement,
                     devices: dict | None = None,
                     experts: ExpertCalibration = _ROUTED, tokens: int = 0):  # fmt: skip
    """Calibrates one decoder layer (its float ``state``, folded in place) on ``acts`` and
    writes its quantized outputs into ``out``; returns ``(quantized state, results)``.
    ``devices`` receives the id of the device that solved each kernel (None: default).
    ``experts`` and ``tokens`` (the calibration tokens) say how expert stacks are
    calibrated and when an expert falls back to a data-free algorithm."""
    devices = {} if devices is None else devices
    apply = _layer_apply(graphdef, every_expert=experts.tokens == "all")
    results: dict[str, Any] = {}
    if not plan:
        _run_layer(graphdef, state, acts, out, ctx)
        return state, results
    groups = _groups(state, plan, apply, acts, ctx)
    head_of = {p: g[0] for g in groups for p in g}
    wanted = _folds_for(folds, plan)
    calibs: dict[str, stats.Calibration] = {}
    if wanted or sequential == "layer":
        heads = tuple(g[0] for g in groups)
        calibs = _gather(with_taps(state, plan), acts, ctx, apply, heads, placement)
        values = dict(tree.leaves(state))
        for fold, kind, settings in wanted:
            consumers = [p for p in fold.consumers if plan.get(p) is not None]
            heads = dict.fromkeys(head_of[p] for p in consumers)  # several in an MoE layer
            s = _fold_scales(fold, kind, settings, [values[p] for p in consumers],
                             [plan[p] for p in consumers], calibs[next(iter(heads))])  # fmt: skip
            apply_fold(state, fold, s)
            for head in heads:  # the consumers now see x / s
                calibs[head] = calibs[head].scaled(fold.expand(s))
        if sequential == "module":  # later groups see the quantized kernels before them
            calibs = {groups[0][0]: calibs[groups[0][0]]}
    values = dict(tree.leaves(state))
    quantized: dict[str, Any] = {}
    # The solves are spread over the mesh's devices in turn. Several processes solve their
    # own kernels of the layer (of the group, in "module" mode) before any is broadcast,
    # so that they solve at the same time.
    order = [p for g in groups for p in g]
    solved: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for gi, group in enumerate(groups):
        head = group[0]
        if head not in calibs:
            state = _share(placement, solved, shapes, results, quantized, state)
            later = {p: plan[p] for g in groups[gi:] for p in g}
            current = tree.map_with_path(lambda p, v: quantized.get(p, v), state)
            tapped = with_taps(current, later)
            calibs[head] = _gather(tapped, acts, ctx, apply, (head,), placement)[head]
        for path in group:
            device = placement.solver(order.index(path))
            args = (values.pop(path), calibs[head])
            key = dict(rule=_rule_key(plan[path]), path=path)
            if _experts.is_stack(args[0]):
                key["fallback"] = _experts.fallbacks(
                    args[1].count, plan[path], experts, tokens,
                    calibrated=plan[path].algorithm in CALIBRATED)  # fmt: skip
            if placement.owns(device):
                solved[path] = _solve(*placement.on(device, args), **key)
            else:
                shapes[path] = jax.eval_shape(functools.partial(_solve_traced, **key), *args)
            devices[path] = None if device is None else device.id
        calibs.pop(head)
        if placement.processes == 1:  # nothing to wait for: the floats go before the next solve
            state = _share(placement, solved, shapes, results, quantized, state)
    state = _share(placement, solved, shapes, results, quantized, state)
    _run_layer(graphdef, state, acts, out, ctx)
    return state, results


def _share(placement: Placement, solved: dict, shapes: dict, results: dict, quantized: dict,
           state):  # fmt: skip
    """Moves the pending solves into ``results`` and ``quantized`` (replicated over the mesh,
    broadcast from their owners) and returns ``state`` with their float kernels replaced."""
    if not solved and not shapes:
        return state
    for path, result in placement.share(solved, shapes).items():
        results[path] = result
        quantized[path] = result[0]
    solved.clear()
    shapes.clear()
    return tree.map_with_path(lambda p, v: quantized.get(p, v), state)
