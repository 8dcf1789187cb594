"""jquant.tree: paths of Linen dicts and NNX States, Variables unwrapped and rewrapped,
QArrays kept whole, and the rule a recipe applies to a leaf."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import jquant
from jquant import tree
from jquant.qarray import QArray, quantize_array
from jquant.recipe import Recipe


def test_paths_of_a_linen_dict():
    model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
    assert [p for p, _ in tree.leaves(variables)] == [
        "params/layers_0/bias", "params/layers_0/kernel",
        "params/layers_1/bias", "params/layers_1/kernel",
    ]  # fmt: skip
    values = dict(tree.leaves(variables))
    assert values["params/layers_1/kernel"] is variables["params"]["layers_1"]["kernel"]


def test_paths_of_an_nnx_state_unwrap_variables():
    class Block(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=nnx.Rngs(0))])
            self.norm = nnx.RMSNorm(4, rngs=nnx.Rngs(0))

    state = nnx.state(Block())
    pairs = tree.leaves(state)
    assert [p for p, _ in pairs] == ["layers/0/bias", "layers/0/kernel", "norm/scale"]
    assert all(isinstance(v, jax.Array) for _, v in pairs)
    flat, _ = tree.flatten(state)
    assert all(isinstance(leaf, nnx.Param) for _, leaf in flat)


def test_map_with_path_rewraps_variables_and_keeps_untouched_leaves():
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    seen = []

    def fn(path, value):
        seen.append((path, type(value)))
        return value * 2 if path == "kernel" else value

    out = tree.map_with_path(fn, state)
    assert all(t is not nnx.Param and issubclass(t, jax.Array) for _, t in seen)
    assert type(out["kernel"]) is nnx.Param
    assert out["kernel"] is not state["kernel"]
    assert jnp.array_equal(out["kernel"].get_value(), 2 * state["kernel"].get_value())
    assert out["bias"] is state["bias"]  # fn returned the value itself: the same Variable
    merged = nnx.merge(nnx.graphdef(model), out)
    assert merged(jnp.ones((1, 3))).shape == (1, 4)


def test_qarrays_are_one_leaf():
    q = quantize_array(jnp.ones((8, 4)), "int8", axis=0)
    params = {"a": {"kernel": q}, "b": jnp.zeros(2)}
    pairs = tree.leaves(params)
    assert [(p, type(v)) for p, v in pairs] == [("a/kernel", QArray), ("b", type(params["b"]))]
    out = tree.map_with_path(lambda p, v: v.dequantize() if isinstance(v, QArray) else v,
                             params)  # fmt: skip
    assert out["a"]["kernel"].shape == (8, 4) and out["b"] is params["b"]
    state = nnx.State({"w": nnx.Param(q)})
    assert isinstance(dict(tree.leaves(state))["w"], QArray)


def test_flatten_and_unflatten_round_trip():
    params = {"x": [jnp.ones(2), 3], "y": {"z": jnp.zeros((2, 2))}}
    flat, treedef = tree.flatten(params)
    assert [p for p, _ in flat] == ["x/0", "x/1", "y/z"]
    back = tree.unflatten(treedef, [leaf for _, leaf in flat])
    assert back["x"][1] == 3 and back["y"]["z"] is params["y"]["z"]


def test_rule_decisions():
    recipe = Recipe.from_dict({"name": "t", "rules": [
        {"pattern": "embed", "skip": True},
        {"pattern": "kernel$", "weight": "int8", "min_size": 64}]})  # fmt: skip
    w = jnp.ones((16, 8))
    assert tree.decide(recipe.match("mlp/kernel"), w) is None
    assert tree.decide(recipe.match("mlp/kernel"), jnp.ones((4, 4))) == "skip"  # min_size
    assert tree.decide(recipe.match("embed/kernel"), w) == "skip"
    assert tree.decide(recipe.match("mlp/bias"), w) == "float"
    assert tree.decide(recipe.match("mlp/kernel"), jnp.ones(128)) == "float"
    rule = tree.rule_for(recipe, "mlp/kernel", w)
    assert rule.axis == 0 and rule.weight == "int8"
    assert tree.resolve(recipe.match("mlp/kernel"), "mlp/kernel", w, recipe) == rule
    assert tree.rule_for(recipe, "mlp/kernel", quantize_array(w, "int8", axis=0)) is None
    assert tree.rule_for(recipe, "mlp/kernel", 3) is None


def test_resolve_names_the_recipe():
    recipe = Recipe.from_dict({"name": "axes", "rules": [
        {"pattern": "kernel$", "weight": "int8", "axis": 2}]})  # fmt: skip
    with pytest.raises(ValueError, match="recipe 'axes'"):
        tree.resolve(recipe.rules[0], "kernel", jnp.ones((4, 4)), recipe)


def test_is_array():
    assert tree.is_array(jnp.ones(2)) and tree.is_array(jnp.ones((2, 2), jnp.int8))
    assert not tree.is_array(3) and not tree.is_array(jax.random.key(0))
    assert not tree.is_array(quantize_array(jnp.ones((8, 4)), "int8", axis=0))


def test_public():
    assert jquant.tree is tree
    assert jquant.transform.path_str is tree.path_str
