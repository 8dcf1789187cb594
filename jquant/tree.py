"""Parameter trees by path: the walk every jquant transform shares.

A parameter tree is a Flax Linen variable dict (FrozenDict too), a Flax NNX ``nnx.State``
(whose leaves are ``nnx.Variable``s), or nested dicts/lists of arrays. Its **paths** join
dict keys (and NNX state keys) with ``"/"`` and write list indices as numbers:
``"params/Dense_0/kernel"``, ``"layers/3/mlp/down_proj/kernel"``; recipes' patterns are
searched in them. A QArray (or a VQArray, ``jquant.vq``) is one leaf (not its packed
fields), and an ``nnx.Variable`` is
one leaf whose *value* the functions below hand out and put back (:func:`unwrap`,
:func:`rewrap`), keeping its type and metadata.

>>> import jax.numpy as jnp
>>> params = {"params": {"Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
>>> [(path, value.shape) for path, value in leaves(params)]
[('params/Dense_0/bias', (2,)), ('params/Dense_0/kernel', (4, 2))]
>>> doubled = map_with_path(lambda path, v: v * 2 if path.endswith("kernel") else v, params)
>>> float(doubled["params"]["Dense_0"]["kernel"][0, 0])
2.0

The rule a recipe applies to one leaf: :func:`decide` says whether it stays as it is,
:func:`resolve` gives the rule with its defaults filled in for that leaf, and
:func:`rule_for` does both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from jquant.qarray import QArray, is_qarray
from jquant.recipe import Recipe, Rule
from jquant.vq import VQArray

__all__ = [
    "decide", "flatten", "is_array", "is_leaf", "leaves", "map_with_path", "path_str",
    "resolve", "rewrap", "rule_for", "unflatten", "unwrap",
]  # fmt: skip


def path_str(keys) -> str:
    """A JAX key path as a parameter path: ``(DictKey('a'), SequenceKey(0))`` → ``"a/0"``.

    >>> path_str(jax.tree_util.tree_flatten_with_path({"a": [1]})[0][0][0])
    'a/0'
    """
    parts = []
    for k in keys:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def is_leaf(x) -> bool:
    """Whether the walk stops at ``x``: an ``nnx.Variable``, a QArray or a VQArray
    (``is_leaf=`` of ``jax.tree_util``'s functions)."""
    return isinstance(x, nnx.Variable | VQArray) or is_qarray(x)


def unwrap(leaf):
    """The value an ``nnx.Variable`` holds; any other leaf itself."""
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def rewrap(leaf, value):
    """``value`` in place of ``leaf``: in a new Variable of ``leaf``'s type and metadata
    when ``leaf`` is an ``nnx.Variable``, else ``value`` itself."""
    return leaf.replace(value=value) if isinstance(leaf, nnx.Variable) else value


def is_array(x) -> bool:
    """A numeric array that could be a weight: has ``shape`` and ``dtype``, is not a QArray
    or VQArray, and is not a PRNG key array (or another extended dtype).

    >>> import jax.numpy as jnp
    >>> is_array(jnp.ones(3)), is_array(3), is_array(jax.random.key(0))
    (True, False, False)
    """
    if isinstance(x, QArray | VQArray) or not (hasattr(x, "shape") and hasattr(x, "dtype")):
        return False
    return not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)


def flatten(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` in tree order, Variables and QArrays kept whole
    (not unwrapped): :func:`unflatten` rebuilds the tree from new leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(keys), leaf) for keys, leaf in flat], treedef


def unflatten(treedef, leaves_) -> Any:
    """The tree of ``treedef`` (from :func:`flatten`) with ``leaves_`` in tree order."""
    return jax.tree_util.tree_unflatten(treedef, list(leaves_))


def leaves(tree) -> list[tuple[str, Any]]:
    """``[(path, value), ...]`` in tree order, each ``nnx.Variable`` unwrapped to its value;
    ``dict(leaves(tree))`` looks values up by path.

    >>> from flax import nnx
    >>> state = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    >>> [(p, v.shape) for p, v in leaves(state)]
    [('bias', (2,)), ('kernel', (3, 2))]
    """
    return [(path, unwrap(leaf)) for path, leaf in flatten(tree)[0]]


def map_with_path(fn: Callable[[str, Any], Any], tree):
    """The same tree with every leaf's value replaced by ``fn(path, value)``.

    Variables are unwrapped for ``fn`` and its answer rewrapped in a Variable of the same
    type; a leaf for which ``fn`` returns its value itself (``is``) is kept as the very
    same object. QArrays reach ``fn`` whole.
    """
    flat, treedef = flatten(tree)
    out = []
    for path, leaf in flat:
        value = unwrap(leaf)
        new = fn(path, value)
        out.append(leaf if new is value else rewrap(leaf, new))
    return unflatten(treedef, out)


# ---- the rule a recipe applies to one leaf ---------------------------------------------


def decide(rule: Rule | None, value) -> str | None:
    """``"float"`` (no rule, or rank < 2) or ``"skip"`` (a skip rule, or fewer elements than
    its ``min_size``) when the array ``value`` stays as it is; None when ``rule``
    quantizes it."""
    if rule is None or value.ndim < 2:
        return "float"
    if rule.skip or math.prod(value.shape) < rule.min_size:
        return "skip"
    return None


def resolve(rule: Rule, path: str, value, recipe: Recipe) -> Rule:
    """``rule`` with its leaf-dependent defaults (axis) filled in for ``value`` at ``path``;
    a ``ValueError`` names the path, the rule and the recipe."""
    try:
        return rule.resolve(path, value.ndim)
    except ValueError as e:
        raise ValueError(f"{e} [recipe {recipe.name!r}]") from None


def rule_for(recipe: Recipe, path: str, value) -> Rule | None:
    """The resolved rule by which ``recipe`` quantizes the leaf value ``value`` at ``path``,
    or None when it stays as it is (not an array, already a QArray, no rule, a skip rule,
    rank < 2 or below ``min_size``).

    >>> import jax.numpy as jnp
    >>> recipe = Recipe.load("w4a16-rtn-g128")
    >>> rule_for(recipe, "mlp/kernel", jnp.ones((256, 8))).axis
    0
    >>> rule_for(recipe, "mlp/bias", jnp.ones(8)) is None
    True
    """
    if not is_array(value):
        return None
    rule = recipe.match(path)
    if decide(rule, value) is not None:
        return None
    return resolve(rule, path, value, recipe)
