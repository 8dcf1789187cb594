"""The parameter-tree side of QAT: which leaves are faked, their learned scales, convert.

Everything walks the tree as `jquant.quantize` does (same paths, same first-match rules,
same leaves left float), so a recipe means the same thing in training and in serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import qtypes, tree
from jquant._act import ActQuantized
from jquant.algorithms import rtn as _rtn
from jquant.qarray import QArray, double_quantized_scale, from_codes, quantize_array
from jquant.qat import fake
from jquant.recipe import SCALE_DTYPES, Recipe, Rule

# A QAT state: {parameter path: {"scale": (*other_axes, G) float32,
#                                "zero_point": same (asymmetric formats only)}}.
QATState = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class _Target:
    path: str
    rule: Rule | None  # resolved; None for a leaf left as it is
    cast: Any = None  # a skip rule's float dtype


def _recipe(recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def _walk(params, recipe: Recipe):
    """``(flat, treedef, targets)``: the leaves, and what the recipe does to each."""
    flat, treedef = tree.flatten(params)
    recipe.check_matches([path for path, _ in flat])
    targets = []
    for path, leaf in flat:
        value = tree.unwrap(leaf)
        if isinstance(value, QArray | ActQuantized) or not tree.is_array(value):
            targets.append(_Target(path, None))
            continue
        rule = recipe.match(path)
        status = tree.decide(rule, value)
        if status is not None:
            cast = rule.dtype if (rule is not None and rule.skip) else None
            targets.append(_Target(path, None, cast))
            continue
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"{path}: QAT needs a float weight, got dtype {value.dtype} "
                             f"[{rule.where} of recipe {recipe.name!r}]")
        targets.append(_Target(path, tree.resolve(rule, path, value, recipe)))
    return flat, treedef, targets


def _cast_float(value, dtype: str):
    """A skip rule's ``dtype``: float leaves stored (and so computed) in it."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return value
    return value.astype(SCALE_DTYPES[dtype])


def quantized_paths(params, recipe: Recipe | str) -> list[str]:
    """The paths whose leaves ``recipe`` quantizes (and QAT fakes), in tree order."""
    _, _, targets = _walk(params, _recipe(recipe))
    return [t.path for t in targets if t.rule is not None]


def _scale_shape(value, rule: Rule) -> tuple[int, ...]:
    shape = list(value.shape)
    k = shape.pop(rule.axis)
    if rule.per_tensor:
        return (1,) * len(value.shape)
    g = 1 if rule.group_size is None else -(-k // rule.group_size)
    return (*shape, g)


def init(params, recipe: Recipe | str, *, quantized=None) -> QATState:
    """Learned quantization parameters for ``params`` under ``recipe``, initialised from PTQ.

    Args:
      params: the float parameter tree (as for `jquant.quantize`).
      recipe: a `jquant.Recipe`, shipped name or YAML path.
      quantized: optionally a quantized tree of the same structure (`jquant.quantize`'s
        output, a calibrated PTQ result): its scales and zero points are the starting
        point. Otherwise each weight's scales are those of round-to-nearest with the rule's
        ``clip_ratio`` and ``clip_search`` (a calibrated algorithm's rule starts from RTN).

    Returns:
      ``{path: {"scale": ..., "zero_point": ...}}`` of float32 arrays in each QArray's
      scale shape, ready for optax beside the params.

    >>> params = {"dense": {"kernel": jnp.ones((256, 4))}}
    >>> state = init(params, "w4a16-rtn-g128")
    >>> state["dense/kernel"]["scale"].shape
    (4, 2)
    """
    recipe = _recipe(recipe)
    flat, _, targets = _walk(params, recipe)
    qflat = None
    if quantized is not None:
        qflat = dict(tree.leaves(quantized))
    state: QATState = {}
    for t, (_, leaf) in zip(targets, flat):
        if t.rule is None:
            continue
        value = tree.unwrap(leaf)
        _check_learnable(t)
        if qflat is not None:
            q = _quantized_leaf(qflat, t, value)
        else:
            q = _rtn.rtn(value, _start_rule(t.rule), path=t.path)
        entry = {"scale": q.scales()}
        if q.zero_point is not None:  # asymmetric formats learn their offsets too (LSQ+)
            entry["zero_point"] = q.zero_point.astype(jnp.float32)
        state[t.path] = entry
    return state


def from_quantized(quantized, recipe: Recipe | str):
    """``(params, state)`` that start QAT exactly at a quantized model (e.g. GPTQ's or AWQ's).

    ``params`` is ``quantized`` with every QArray dequantized (in its original dtype), and
    ``state`` holds its scales and zero points, so ``fake_quantize(params, recipe, state)``
    rounds every weight back to the very codes of ``quantized`` and training starts at its
    quality rather than at round-to-nearest's. Folded AWQ / SmoothQuant scales are in
    ``quantized``'s norms already, and so in ``params``.

    Raises:
      ValueError: as :func:`init` when a QArray's format differs from the recipe's rule.
    """
    recipe = _recipe(recipe)
    for path, value in tree.leaves(quantized):
        if isinstance(value, QArray) and isinstance(value.scale, QArray):
            raise ValueError(f"{path}: from_quantized cannot start from "
                             "double-quantized scales, which training quantizes again; use "
                             "init(params, recipe, quantized=...)")

    params = tree.map_with_path(
        lambda _, v: v.dequantize() if isinstance(v, QArray) else v, quantized)
    return params, init(params, recipe, quantized=quantized)


def _start_rule(rule: Rule) -> Rule:
    """RTN with the rule's format and clipping: single-level scales, no activations."""
    args = {k: v for k, v in rule.algorithm_args.items() if k == "clip_search"}
    return dataclasses.replace(rule, algorithm="rtn", algorithm_args=args,
                               double_quant=False, activation=None)  # fmt: skip


def _quantized_leaf(qflat, t: _Target, value) -> QArray:
    q = qflat.get(t.path)
    if not isinstance(q, QArray):
        raise ValueError(f"{t.path}: quantized= has no QArray here ({type(q).__name__}); "
                         f"the recipe quantizes it with {t.rule.where}")
    want = (t.rule.format.name, t.rule.group_size, t.rule.axis - value.ndim
            if t.rule.axis >= 0 else t.rule.axis, tuple(value.shape))
    have = (q.qtype, q.group_size, q.axis, tuple(q.shape))
    if want != have:
        raise ValueError(f"{t.path}: quantized= holds (qtype, group_size, axis, shape) {have}; "
                         f"the recipe's {t.rule.where} asks for {want}")
    return q


def _check_learnable(t: _Target) -> None:
    """nvfp4's scales are E4M3 codes times a per-tensor scale of the weight: no free float
    scale to learn."""
    fmt = t.rule.format
    if fmt.block_scale == "e4m3":
        raise ValueError(f"{t.path}: QAT cannot learn {fmt.name} scales (E4M3 block scales "
                         f"under a per-tensor scale of the weight) [{t.rule.where}]; train "
                         "with state=None (scales recomputed from the weight each step)")


def _learned(state: Mapping | None, t: _Target, value) -> Mapping | None:
    if not state:
        return None
    _check_learnable(t)
    entry = state[t.path]
    want = _scale_shape(value, t.rule)
    for key, arr in entry.items():
        if key not in ("scale", "zero_point"):
            raise ValueError(f"{t.path}: unknown QAT state key {key!r}; "
                             "allowed: scale, zero_point")
        if tuple(arr.shape) != want:
            raise ValueError(f"{t.path}: QAT state {key} has shape {tuple(arr.shape)}; the "
                             f"weight {tuple(value.shape)} under {t.rule.where} needs {want}")
    if "zero_point" in entry and not t.rule.format.asymmetric:
        raise ValueError(f"{t.path}: QAT state has a zero_point but {t.rule.weight} is "
                         "symmetric")
    if "zero_point" not in entry and t.rule.format.asymmetric:
        raise ValueError(f"{t.path}: QAT state has no zero_point; {t.rule.weight} is "
                         "asymmetric and learns one (jquant.qat.init makes it)")
    return entry


def _check_state(state, targets) -> None:
    if not state:
        return
    if not isinstance(state, Mapping):
        raise ValueError(f"QAT state must be a mapping path -> {{scale, zero_point}}, "
                         f"got {type(state).__name__}")
    want = {t.path for t in targets if t.rule is not None}
    have = set(state)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(
            "QAT state does not match the params under this recipe: "
            + (f"{len(missing)} quantized path(s) have no state, e.g. {missing[:3]}; "
               if missing else "")
            + (f"{len(extra)} state path(s) are not quantized params, e.g. {extra[:3]}"
               if extra else "")
        )


def fake_quantize(params, recipe: Recipe | str, state: QATState | None = None, *,
                  ste: str = "clipped"):
    """``params`` with every weight the recipe quantizes replaced by its fake-quantized value.

    Traceable: call it inside your loss, under ``jit``, ``grad``, ``vmap`` or with sharded
    params. The result has the input's structure and dtypes, so any model consumes it;
    a weight whose rule quantizes activations (W8A8 / W4A8) comes back as an
    `ActQuantized`, which `jquant.ops` (jquant's models, and stock Flax layers under
    `jquant.apply`) runs with the activations fake-quantized per token, as serving does.

    Args:
      params: float parameter tree (Linen dict, ``nnx.State``, nested containers).
      recipe: the recipe the model will be served with.
      state: learned scales from :func:`init`, or None/``{}`` to recompute each weight's
        round-to-nearest scales every call (plain STE QAT).
      ste: ``"clipped"`` (zero gradient where a value saturates) or ``"identity"``.

    Raises:
      ValueError: a state that does not match the params (paths, shapes), an unknown
        ``ste``.
    """
    if ste not in fake.STE_MODES:
        raise ValueError(f"ste={ste!r} is not one of {fake.STE_MODES}")

    def fake_leaf(t: _Target, value):
        fq = fake.fake_quantize_leaf(value, t.rule, _learned(state, t, value), ste=ste)
        return fq if t.rule.activation is None else ActQuantized(fq, t.rule.activation)

    return _map_quantized(params, _recipe(recipe), state, fake_leaf)


def _map_quantized(params, recipe: Recipe, state, fn):
    """``params`` with ``fn(target, value)`` in place of each leaf the recipe quantizes
    (skip rules' ``dtype`` applied to the others), after checking ``state`` against them."""
    flat, treedef, targets = _walk(params, recipe)
    _check_state(state, targets)
    leaves = []
    for t, (_, leaf) in zip(targets, flat):
        value = tree.unwrap(leaf)
        if t.rule is not None:
            leaf = tree.rewrap(leaf, fn(t, value))
        elif t.cast is not None and tree.is_array(value):
            leaf = tree.rewrap(leaf, _cast_float(value, t.cast))
        leaves.append(leaf)
    return tree.unflatten(treedef, leaves)


def convert(params, state: QATState | None, recipe: Recipe | str):
    """The packed QArray tree of a QAT model: what to save and serve.

    Each QArray's codes are the codes :func:`fake_quantize` rounded to with the same
    params and state, and its ``dequantize()`` is the fake-quantized weight bit for bit,
    so the converted model computes what was trained.

    Raises:
      ValueError: the state does not match the params, or a learned scale is not a
        positive finite number (the optimizer drove it there: lower the scales' learning
        rate); the message names the parameter and the count.
    """

    def pack(t: _Target, value):
        r = t.rule
        if not state:
            return quantize_array(value, r.weight, axis=r.axis, group_size=r.group_size,
                                  per_tensor=r.per_tensor, scale_dtype=r.jnp_scale_dtype,
                                  clip_ratio=r.clip_ratio, double_quant=r.double_quant,
                                  activation=r.activation, name=t.path)  # fmt: skip
        return _convert_learned(value, r, _learned(state, t, value), t.path)

    return _map_quantized(params, _recipe(recipe), state, pack)


def _convert_learned(value, rule: Rule, learned, path: str) -> QArray:
    scale = np.asarray(jax.device_get(learned["scale"]))
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bad.any():
        raise ValueError(
            f"{path}: {int(bad.sum())} of {scale.size} learned scales are not positive finite "
            f"numbers (smallest {np.nanmin(scale):.3g}); QAT's optimizer drove them there: "
            "lower the scales' learning rate or clip their updates")
    w_t = jnp.moveaxis(jnp.asarray(value, jnp.float32), rule.axis, -1)
    s, s_stored, z = fake.stored_scales(rule, learned["scale"], learned.get("zero_point"))
    group = None if rule.per_tensor else rule.group_size
    codes = qtypes.encode(rule.format, fake.scaled(w_t, s, z, group))
    stored = s_stored.astype(rule.jnp_scale_dtype)
    if rule.double_quant:
        stored = double_quantized_scale(stored)
    zp = None if z is None else z.astype(rule.jnp_scale_dtype)
    axis = rule.axis - value.ndim if rule.axis >= 0 else rule.axis
    q = from_codes(codes, stored, zp, qtype=rule.weight, axis=axis,
                   group_size=rule.group_size, dtype=value.dtype)  # fmt: skip
    return dataclasses.replace(q, activation=rule.activation)


def wrap(loss_fn: Callable, recipe: Recipe | str, *, ste: str = "clipped") -> Callable:
    """``loss(params, state, *args, **kwargs)`` = ``loss_fn(fake_quantize(params, recipe,
    state), *args, **kwargs)``: a float loss made quantization-aware, for ``jax.grad``
    over ``(params, state)``."""
    recipe = _recipe(recipe)

    def qat_loss(params, state, *args, **kwargs):
        return loss_fn(fake_quantize(params, recipe, state, ste=ste), *args, **kwargs)

    return qat_loss


def optimizer(tx: optax.GradientTransformation,
              scales: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """One optax optimizer for the pair ``(params, state)``: ``tx`` for the params and
    ``scales`` (default ``tx``) for the learned scales and zero points.

    Pass ``optax.set_to_zero()`` as ``tx`` to train the scales alone (frozen weights).

    >>> tx = optimizer(optax.adam(1e-5), scales=optax.adam(1e-3))
    >>> opt_state = tx.init(({"w": jnp.ones(2)}, {"w": {"scale": jnp.ones(1)}}))
    """

    def labels(tree):
        params, state = tree
        return (jax.tree.map(lambda _: "params", params),
                jax.tree.map(lambda _: "qat", state))  # fmt: skip

    return optax.multi_transform({"params": tx, "qat": scales or tx}, labels)


def nonpositive_scales(state: QATState) -> int:
    """How many learned scales are not positive finite numbers (0 for a healthy state);
    traceable, for a training loop's log."""
    return sum(jnp.sum(~(jnp.isfinite(e["scale"]) & (e["scale"] > 0))) for e in state.values())
