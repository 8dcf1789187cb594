"""Calibrated quantization: sequential, layer by layer, as GPTQ does it.

`quantize_model` (in memory) and `jquant.calib.stream.quantize_to_disk` (a checkpoint read
and written a layer at a time) quantize a jquant Llama-family model with a recipe whose rules
may name calibrated algorithms (``gptq``, ``awq``, ``smoothquant``) as well as ``rtn`` /
``hqq``. Both run `calibrate`:

1. The calibration windows go through the embedding into host buffers (`Activations`:
   in memory, or in a file when the memory budget says so).
2. For each decoder layer ``i``, with its inputs ``X_i`` (the outputs of the already
   *quantized* layers before it), read in micro-batches of windows:

   a. the kernels the recipe quantizes are found in forward order, grouped by shared
      input (``q/k/v``, ``gate/up``), by tracing the layer once with Taps;
   b. one pass of the float layer with every such kernel a `Tap` accumulates each
      group's input statistics (`jquant.calib.stats`) over the micro-batches;
   c. if a rule asks for input scales (AWQ, SmoothQuant), they are searched on those
      statistics and folded into the op producing each input (`jquant.calib.fold`), and
      the consumers' statistics are rescaled to match;
   d. every kernel is quantized by its rule's algorithm from its group's statistics
      (``sequential="module"`` instead gathers each group's statistics with the kernels
      before it already quantized: one pass per group);
   e. one pass of the quantized layer writes ``X_{i+1}``.

   Each pass is one compiled program, shared by every layer of the same structure and
   rules. Peak memory is one layer's weights, its statistics and one micro-batch's
   intermediates, plus the activation buffers: not the model's, and not growing with the
   number of windows. With a mesh `Placement` the micro-batches are split over its
   devices (and processes), and the statistics summed over them.
3. An untied LM head is quantized the same way on the final norm's output; the embedding
   and every other leaf go through `jquant.quantize` (calibration-free algorithms only).

`quantize_with_inputs` quantizes any function of a parameter tree (a stock Flax model
through the interceptors) in one tapped pass over a whole batch, without folding: each
kernel on the inputs it receives from the quantized kernels before it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jquant import algorithms, transform, tree
from jquant._moe_settings import ExpertCalibration
from jquant._tap import Tap, with_taps
from jquant.calib import _experts
from jquant.calib._layer import CALIBRATED as CALIBRATED
from jquant.calib._layer import (
    _calibrate_layer,
    _gather,
    _plan,
    _rule_key,
    _run_layer,
    _solve,
    _Static,
    _tapped_pass,
)
from jquant.calib.activations import Activations, Placement, micro_batch_for
from jquant.calib.fold import llama_folds
from jquant.models import core
from jquant.models.cache import NoCache
from jquant.recipe import Recipe, Rule
from jquant.tree import unwrap

#: How `quantize_model` orders the calibration inside a decoder layer.
SEQUENTIAL = ("layer", "module")

_LAYER = re.compile(r"^layers/(\d+)/(.+)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRow:
    """One quantized matmul kernel of a calibrated quantization."""

    path: str
    algorithm: str
    qtype: str
    group_size: int | None
    bits_per_weight: float
    # E‖xΔW‖² / E‖xW‖² over the calibration inputs the kernel received (ΔW = W − Ŵ).
    output_error: float
    # ‖ΔW‖_F / ‖W‖_F.
    weight_error: float
    # The algorithm's info (GPTQ: the dampening it used), as plain numbers.
    info: dict[str, Any]
    # The id of the mesh device that solved it (None: the default device, no mesh).
    device: int | None = None
    # An MoE expert stack (E, K, N) only: the calibration rows each expert received, and the
    # experts quantized by `fallback_algorithm` (data-free) for having too few of them.
    expert_tokens: list[int] | None = None
    fallback_experts: list[int] | None = None
    fallback_algorithm: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationReport:
    """What `quantize_model` did: one row per kernel, and the time it took."""

    rows: list[LayerRow]
    layer_seconds: list[float]
    seconds: float
    samples: int
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples, "seq_len": self.seq_len, "seconds": self.seconds,
            "layer_seconds": self.layer_seconds,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }  # fmt: skip


def _copy(state):
    """A copy of ``state`` with new Variables (the folds then write into it in place)."""
    return jax.tree.map(lambda x: x, state)


def needs_calibration(recipe: Recipe | str) -> bool:
    """Whether a rule of ``recipe`` names a calibrated algorithm (or AWQ scales).

    >>> needs_calibration("w4a16-rtn-g128")
    False
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    return any(
        not r.skip and (r.algorithm in CALIBRATED or r.algorithm_args.get("awq"))
        for r in recipe.rules
    )


class ModelSource:
    """The float parameters of a model held in memory, layer by layer (`quantize_model`'s
    source; `jquant.calib.stream` reads them from disk instead)."""

    def __init__(self, model, params: nnx.State):
        self.config = model.config
        self.model, self.params = model, params

    def layer(self, i: int) -> nnx.State:
        """Decoder layer ``i``'s float State, a copy the folds may write into."""
        return _copy(self.params["layers"][i])

    def part(self, name: str) -> nnx.State:
        """A parameter group outside the decoder layers: ``embed_tokens``, ``norm`` or
        ``lm_head``."""
        return self.params[name]

    def leaves(self) -> dict[str, Any]:
        """Every parameter by path (values or shape placeholders: rules only read shapes)."""
        return dict(tree.leaves(self.params))


def plan_rules(config, recipe: Recipe, leaves: dict[str, Any]):
    """``(rule by path, one {relative path: rule} per decoder layer)``; raises for a
    calibrated rule on a tensor no calibration pass reaches (a layer's matmul kernels are
    its ``kernel`` leaves; an MoE router's ``weight`` is no `jquant.ops` matmul)."""
    recipe.check_matches(list(leaves))
    rules = {p: tree.rule_for(recipe, p, v) for p, v in leaves.items()}
    head_path = None if config.tie_word_embeddings else "lm_head/kernel"
    per_layer: list[dict[str, Rule]] = [{} for _ in range(config.num_layers)]
    for path, rule in rules.items():
        m = _LAYER.match(path)
        seen = path == head_path or (m is not None and path.endswith("kernel"))
        if m and rule is not None and (seen or rule.algorithm not in CALIBRATED):
            per_layer[int(m.group(1))][m.group(2)] = rule
        elif rule is not None and rule.algorithm in CALIBRATED and not seen:
            raise ValueError(
                f"{path}: {rule.algorithm} needs the inputs of a matmul, and this tensor "
                f"is not one the calibration pass sees (decoder-layer kernels and an "
                f"untied lm_head are); use rtn or hqq for it [{rule.where} of recipe "
                f"{recipe.name!r}]")  # fmt: skip
    return rules, per_layer


def _check_tokens(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"calibration tokens must be an int array (samples, seq_len), got "
            f"{tokens.dtype}{list(tokens.shape)}"
        )
    return tokens


def _check_sequential(sequential: str) -> None:
    if sequential not in SEQUENTIAL:
        raise ValueError(f"sequential must be one of {SEQUENTIAL}, got {sequential!r}")


def quantize_model(
    model, params: nnx.State, recipe: Recipe | str, tokens, *, progress: bool = True,
    micro_batch: int | None = None, sequential: str = "layer",
) -> tuple[nnx.State, CalibrationReport]:  # fmt: skip
    """Quantizes a jquant Llama-family model with calibration (see the module docstring).

    Args:
      model: the `jquant.models.Llama` (its structure and config).
      params: its float parameter State (not modified).
      recipe: a `Recipe`, a shipped recipe name or a YAML path.
      tokens: calibration token windows ``(samples, seq_len)`` int
        (`jquant.calib.calibration_tokens`).
      progress: show a progress bar over the layers with each layer's largest error.
      micro_batch: windows per pass through a layer (default: `micro_batch_for` the model,
        about 8,192 tokens); statistics are accumulated over the micro-batches, so results
        do not depend on it beyond float rounding, and peak memory does not grow with the
        number of windows.
      sequential: ``"layer"`` (every kernel of a layer calibrated on that layer's float
        inputs, one pass) or ``"module"`` (each kernel on the outputs of the layer's kernels
        already quantized before it, one pass per group of kernels sharing an input).

    Returns:
      ``(quantized params, CalibrationReport)``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if recipe.rotation is not None:
        raise ValueError(
            f"recipe {recipe.name!r} rotates the model, which changes the model as well as "
            "its params: use jquant.calib.apply_recipe(model, params, recipe), or "
            "jquant.rotate.rotate first"
        )
    tokens = _check_tokens(tokens)
    _check_sequential(sequential)
    source = ModelSource(model, params)
    new: dict[str, Any] = {}

    def keep(prefix: str, leaves: dict[str, Any]) -> None:
        new.update({prefix + p: v for p, v in leaves.items()})

    report = calibrate(source, recipe, tokens, keep=keep, progress=progress,
                       micro_batch=micro_batch, sequential=sequential)  # fmt: skip
    return _finish(params, new, recipe), report


def calibrate(
    source, recipe: Recipe, tokens: np.ndarray, *, keep: Callable[[str, dict], None],
    progress: bool = True, micro_batch: int | None = None, sequential: str = "layer",
    activations: Callable[[tuple, Any], Activations] | None = None,
    done: Callable[[int], nnx.State | None] | None = None, placement: Placement | None = None,
) -> CalibrationReport:  # fmt: skip
    """The sequential calibration of every decoder layer of ``source`` (and an untied LM head).

    ``source`` gives the float layers one at a time (`ModelSource`, or a streaming one);
    ``keep(prefix, leaves)`` receives each finished layer's parameters (QArrays and the
    folded float leaves, paths relative to ``prefix`` ``"layers/i/"``) and at the end the
    calibrated head's (``"lm_head/"``), so the caller decides whether they stay in memory
    or go to disk. ``activations(shape, dtype)`` makes the host buffers between layers
    (default: in memory). ``done(i)``, for a resumed run, returns layer ``i``'s stored
    parameters when it was finished before (it is then only run, not calibrated again), or
    None. ``placement`` runs the passes data-parallel over a mesh (`Placement`).
    """
    start = time.perf_counter()
    tokens = _check_tokens(tokens)
    _check_sequential(sequential)
    config = source.config
    place = placement or Placement()
    leaves = source.leaves()
    _, per_layer = plan_rules(config, recipe, leaves)
    head_rule = None
    if not config.tie_word_embeddings:
        head_rule = tree.rule_for(recipe, "lm_head/kernel", leaves["lm_head/kernel"])
    del leaves
    samples, seq_len = (int(n) for n in tokens.shape)
    batch = micro_batch or micro_batch_for(config, samples, seq_len, multiple=place.devices,
                                           every_expert=recipe.experts.tokens == "all")
    if samples % batch or batch % place.devices:
        raise ValueError(
            f"micro_batch {batch} must divide the {samples} calibration windows and be a "
            f"multiple of the {place.devices} devices"
        )
    local = batch // place.processes  # this process's windows per micro-batch
    st = core.Static.of(source.model)
    make = activations or (lambda shape, dtype: Activations(shape, dtype, local,
                                                            placement=place))  # fmt: skip
    tokens = np.asarray(tokens[place.local_windows(samples)], np.int32)
    acts = make((len(tokens), seq_len, config.hidden_size), st.dtype)
    embed = place.replicate(source.part("embed_tokens"))
    ctxs = None
    for s in range(0, len(tokens), local):
        x, ctxs = _embed(st, embed, place.batch(tokens[s : s + local]))
        acts.write(s, x)
    del embed
    out = make(acts.shape, acts.dtype)
    rows: list[LayerRow] = []
    layer_seconds: list[float] = []
    moe = dict(experts=recipe.experts, tokens=samples * seq_len)
    bar = tqdm(range(config.num_layers), desc="calibrating", unit="layer", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        graphdef = st.layer_at(i)  # dense and MoE layers differ
        ctx = ctxs.at(config, i)
        stored = done(i) if done is not None else None
        if stored is not None:
            _run_layer(graphdef, place.replicate(stored), acts, out, ctx)
            worst = float("nan")
        else:
            plan = {p: r for p, r in per_layer[i].items() if p.endswith("kernel")}
            rest = {p: r for p, r in per_layer[i].items() if p not in plan}
            devices: dict[str, int | None] = {}
            state, results = _calibrate_layer(
                place.replicate(source.layer(i)), plan, acts, out, ctx, graphdef=graphdef,
                folds=llama_folds(config, i), sequential=sequential, placement=place,
                devices=devices, **moe,
            )  # fmt: skip
            worst = _collect(f"layers/{i}/", plan, results, rows, {}, devices, **moe)
            keep(f"layers/{i}/", dict(tree.leaves(_data_free(state, rest, f"layers/{i}/"))))
        acts, out = out, acts
        layer_seconds.append(time.perf_counter() - t0)
        bar.set_postfix_str(f"worst output error {worst:.2e}")
    if head_rule is not None:
        head_apply = _Static(("head", nnx.graphdef(source.model.norm)), _head_fn(source.model))
        head = place.replicate({"norm": source.part("norm"), "lm_head": source.part("lm_head")})
        kernel = Tap(unwrap(head["lm_head"]["kernel"]), "kernel")
        tapped = {"norm": head["norm"], "lm_head": {"kernel": kernel}}
        calib = _gather(tapped, acts, None, head_apply, ("kernel",), place)["kernel"]
        plan = {"kernel": head_rule}
        results = {"kernel": _solve(tapped["lm_head"]["kernel"].value, calib,
                                    rule=_rule_key(head_rule), path="lm_head/kernel")}  # fmt: skip
        q: dict[str, Any] = {}
        _collect("lm_head/", plan, results, rows, q)
        keep("", q)
    acts.close()
    out.close()
    return CalibrationReport(
        rows=rows, layer_seconds=layer_seconds, seconds=time.perf_counter() - start,
        samples=samples, seq_len=seq_len,
    )  # fmt: skip


def _data_free(state, rules: dict[str, Rule], prefix: str):
    """``state`` with the leaves ``rules`` name (no matmul kernels: an MoE router's weight)
    quantized by their data-free algorithms, after the layer's folds rescaled them."""
    def quantize(path, value):
        rule = rules.get(path)
        return value if rule is None else algorithms.run(rule.algorithm, value, rule,
                                                         path=prefix + path)  # fmt: skip

    return tree.map_with_path(quantize, state) if rules else state


@functools.partial(jax.jit, static_argnames=("st",))
def _embed(st, embed_params, tokens):
    _, ctxs = core.begin(st.config, NoCache(), jnp.ones(tokens.shape, jnp.bool_))
    return core.embed(st, {"embed": embed_params}, tokens), ctxs


def _head_fn(model):
    graphdef = nnx.graphdef(model.norm)

    def head(state, x):
        from jquant import ops

        y = nnx.merge(graphdef, state["norm"])(x)
        return ops.qdot(y, state["lm_head"]["kernel"], preferred_element_type=jnp.float32)

    return head


def _collect(prefix: str, plan, results, rows: list[LayerRow], new: dict,
             devices: dict | None = None, *, experts: ExpertCalibration | None = None,
             tokens: int = 0) -> float:  # fmt: skip
    """Host side of a quantize pass: checks infos, records rows and QArrays, warns about
    experts that fell back; returns the largest output error."""
    worst = 0.0
    for rel, rule in plan.items():
        if rule is None:
            continue
        path = prefix + rel
        q, info, (out_err, w_err) = results[rel]
        info = {k: np.asarray(v) for k, v in jax.device_get(info).items()}
        stack: dict[str, Any] = {}
        if _experts.TOKENS in info:
            info, stack = _expert_row(path, rule, info, experts or ExpertCalibration(), tokens)
        else:
            algorithms.check_info(rule.algorithm, path, info)
            info = {k: v.item() for k, v in info.items() if v.size == 1}
        new[path] = q
        out_err, w_err = float(out_err), float(w_err)
        worst = max(worst, out_err)
        rows.append(LayerRow(
            path=path, algorithm=rule.algorithm, qtype=q.qtype, group_size=q.group_size,
            bits_per_weight=q.bits_per_weight, output_error=out_err, weight_error=w_err,
            info=info, device=(devices or {}).get(rel), **stack,
        ))  # fmt: skip
    return worst


def _expert_row(path: str, rule: Rule, info: dict, experts: ExpertCalibration, tokens: int):
    """An expert stack's infos checked expert by expert, and summarized as a row's: each
    scalar's largest value over the calibrated experts (a flag: whether all had it); the
    row's expert fields; a warning naming the experts that fell back."""
    count, fell = info.pop(_experts.TOKENS), info.pop(_experts.FALLBACK)
    for j, e in enumerate(np.flatnonzero(~fell)):
        algorithms.check_info(rule.algorithm, f"{path} (expert {e})",
                              {k: v[j] for k, v in info.items()})  # fmt: skip
    summary = {k: bool(v.all()) if v.dtype == np.bool_ else v.max().item()
               for k, v in info.items() if v.ndim == 1 and v.size}  # fmt: skip
    low = [int(e) for e in np.flatnonzero(fell)]
    if low:
        seen = ", ".join(f"{e} ({int(count[e])} rows)" for e in low)
        warnings.warn(
            f"{path}: expert(s) {seen} received fewer than {experts.min_token_share:.2%} of "
            f"the {tokens} calibration tokens; quantized by {experts.fallback} (data-free) "
            f"instead of {rule.algorithm}", UserWarning, stacklevel=3,
        )  # fmt: skip
    return summary, dict(expert_tokens=[int(n) for n in count], fallback_experts=low,
                         fallback_algorithm=experts.fallback if low else None)  # fmt: skip


def quantize_with_inputs(
    apply: Callable, params, recipe: Recipe | str, *args,
) -> tuple[Any, list[LayerRow]]:  # fmt: skip
    """Calibrated quantization of any model in one pass (no folding).

    ``apply(params, *args)`` runs the model (e.g. ``lambda p, x: jquant.apply(module,
    p, x)`` for a Linen module, or an NNX merge-and-call); ``args`` hold the whole
    calibration batch. Every leaf that a rule quantizes with a calibrated algorithm is
    replaced by a `Tap` and quantized when the forward reaches it, on the inputs it
    receives from the already quantized layers before it; every other leaf goes through
    `jquant.quantize`. Layers that share a kernel, or kernels the forward never reaches
    through `jquant.ops` / the interceptors, are errors.

    Returns:
      ``(quantized params, rows)``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    leaves = dict(tree.leaves(params))
    recipe.check_matches(list(leaves))
    plan = {}
    for path, value in leaves.items():
        rule = tree.rule_for(recipe, path, value)
        if rule is not None and rule.algorithm in CALIBRATED:
            plan[path] = rule
    tapped = with_taps(params, plan)
    fn = _Static(("fn", apply), apply)  # the function itself: its id cannot be reused
    _, results = _tapped_pass(tapped, args, apply=fn, plan=_plan(plan), mode="quantize")
    missing = sorted(set(plan) - set(results))
    if missing:
        raise ValueError(
            f"{', '.join(missing)}: never reached a jquant.ops matmul during the "
            "calibration pass (only Dense/Linear kernels are calibrated)"
        )
    rows: list[LayerRow] = []
    new: dict[str, Any] = {}
    _collect("", plan, results, rows, new)
    return _finish(params, new, recipe), rows


def _finish(params, new: dict[str, Any], recipe: Recipe):
    """``params`` with the calibrated QArrays ``new`` (by path) in place, and every other
    leaf through `jquant.quantize` (which leaves those QArrays as they are)."""
    return transform.quantize(tree.map_with_path(lambda p, v: new.get(p, v), params), recipe)


def report_summary(report: CalibrationReport) -> str:
    """One line: kernels, mean and worst output error, time, and the experts that fell back
    to a data-free algorithm."""
    errs = [r.output_error for r in report.rows]
    if not errs:
        return f"no kernel calibrated ({report.seconds:.1f} s)"
    line = (
        f"{len(errs)} kernels, output error mean {math.fsum(errs) / len(errs):.2e}, "
        f"worst {max(errs):.2e}; {report.seconds:.1f} s"
    )
    low = [r for r in report.rows if r.fallback_experts]
    if low:
        line += (f"; experts quantized by {low[0].fallback_algorithm} for too few tokens: "
                 + ", ".join(f"{r.path} {r.fallback_experts}" for r in low))  # fmt: skip
    return line
