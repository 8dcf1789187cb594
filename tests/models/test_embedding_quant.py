"""Quantized embedding tables and LM heads: tied, untied, and named apart by a recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.models import LlamaConfig, forward, init_model
from jquant.models.convert import head_apart, prepare_head, untie
from jquant.qarray import QArray
from jquant.recipe import Recipe, RuleError

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128, tie_word_embeddings=True)  # fmt: skip


def _tied(seed=0):
    model = init_model(LlamaConfig(**TINY), seed=seed)
    return model, nnx.state(model)


def _tokens(seed=1):
    return jax.random.randint(jax.random.key(seed), (2, 9), 0, TINY["vocab_size"], jnp.int32)


def _with(params, path, value):
    """A float copy of ``params`` with one leaf replaced (the independent reference)."""
    pure = nnx.to_pure_dict(params)
    node = pure
    *head, leaf = path.split("/")
    for key in head:
        node = node[key]
    node[leaf] = value
    state = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _recipe(*rules):
    return Recipe.from_dict({"name": "t", "rules": list(rules)})


@pytest.mark.parametrize("weight,group", [("int8", None), ("uint4", 32), ("int4", 16)])
def test_tied_table_quantized_equals_float_model_on_the_dequantized_table(weight, group):
    model, params = _tied()
    rule = {"pattern": "embed", "weight": weight, "group_size": group}
    q = jquant.quantize(params, _recipe({k: v for k, v in rule.items() if v is not None}))
    table = q["embed_tokens"]["embedding"].get_value()
    assert isinstance(table, QArray) and table.axis == -1
    # The same QArray feeds the gather and the tied head; the reference is the float model
    # whose table is that QArray dequantized.
    ref = _with(params, "embed_tokens/embedding", table.dequantize(jnp.float32))
    tokens = _tokens()
    got, _ = forward(model, q, tokens)
    want, _ = forward(model, ref, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.allclose(np.asarray(want), np.asarray(forward(model, params, tokens)[0]),
                           atol=1e-4)  # the quantization did change the model


def test_untie_keeps_the_logits_and_copies_the_table():
    model, params = _tied()
    untied, uparams = untie(model, params)
    assert not untied.config.tie_word_embeddings
    table = np.asarray(params["embed_tokens"]["embedding"].get_value())
    np.testing.assert_array_equal(np.asarray(uparams["lm_head"]["kernel"].get_value()), table.T)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(forward(untied, uparams, tokens)[0]),
                               np.asarray(forward(model, params, tokens)[0]), rtol=1e-6,
                               atol=1e-6)  # fmt: skip


def test_recipe_names_the_head_apart_from_a_tied_embedding():
    model, params = _tied()
    recipe = _recipe({"pattern": "embed", "weight": "uint4", "group_size": 32},
                     {"pattern": "lm_head", "weight": "int8"})  # fmt: skip
    assert head_apart(recipe, model.config)
    model2, params2 = prepare_head(model, params, recipe)
    q = jquant.quantize(params2, recipe)
    emb = q["embed_tokens"]["embedding"].get_value()
    head = q["lm_head"]["kernel"].get_value()
    assert (emb.qtype, emb.group_size, head.qtype) == ("uint4", 32, "int8")
    assert head.axis in (0, -2)  # the Dense layout (D, V) contracts D
    ref = _with(untie(model, params)[1], "embed_tokens/embedding", emb.dequantize(jnp.float32))
    ref = _with(ref, "lm_head/kernel", head.dequantize(jnp.float32))
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(forward(model2, q, tokens)[0]),
                               np.asarray(forward(model2, ref, tokens)[0]), rtol=2e-5,
                               atol=2e-5)  # fmt: skip


@pytest.mark.parametrize(
    "rules,apart",
    [
        # The same treatment (or no lm_head rule) keeps the table shared.
        ([{"pattern": "embed|lm_head", "weight": "int8"}], False),
        ([{"pattern": "embed", "weight": "int8"}], False),
        ([{"pattern": "embed", "skip": True}, {"pattern": "lm_head", "skip": True},
          {"pattern": "kernel", "weight": "int8"}], False),
        # A float head beside a quantized embedding, or another format: apart.
        ([{"pattern": "embed", "weight": "int8"}, {"pattern": "lm_head", "skip": True}], True),
        ([{"pattern": "embed", "weight": "int8"},
          {"pattern": "lm_head", "weight": "int8", "scale_dtype": "float32"}], True),
    ],
)  # fmt: skip
def test_head_apart_decision(rules, apart):
    assert head_apart(_recipe(*rules), LlamaConfig(**TINY)) is apart
    assert not head_apart(_recipe(*rules), LlamaConfig(**{**TINY, "tie_word_embeddings": False}))


def test_skip_rule_stores_float_weights_in_bfloat16():
    model, params = _tied()
    recipe = _recipe({"pattern": "embed", "skip": True, "dtype": "bfloat16"},
                     {"pattern": "kernel$", "weight": "int8"})  # fmt: skip
    q = jquant.quantize(params, recipe)
    table = q["embed_tokens"]["embedding"].get_value()
    assert table.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(table, np.float32),
        np.asarray(params["embed_tokens"]["embedding"].get_value().astype(jnp.bfloat16),
                   np.float32))  # fmt: skip
    assert jquant.memory_report(q).weight_bytes < jquant.memory_report(
        jquant.quantize(params, _recipe({"pattern": "kernel$", "weight": "int8"}))).weight_bytes
    logits, _ = forward(model, q, _tokens())
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "rule,match",
    [
        ({"pattern": "embed", "skip": True, "dtype": "int8"}, "dtype='int8' is not one of"),
        ({"pattern": "embed", "weight": "int8", "dtype": "bfloat16"}, "needs skip: true"),
    ],
)
def test_bad_dtype_is_one_clear_error(rule, match):
    with pytest.raises(RuleError, match=match):
        _recipe(rule, {"pattern": "kernel", "weight": "int8"})


def test_cli_unties_for_a_head_apart_and_saves_the_untied_model(capsys, tiny_model, tmp_path):
    import json

    from jquant.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: apart\nrules:\n  - {pattern: embed, weight: uint4, group_size: 32}\n"
                      "  - {pattern: lm_head, weight: int8}\n"
                      "  - {pattern: kernel$, weight: int8}\n")  # fmt: skip
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37}" for i in range(200)))
    out = tmp_path / "q"
    assert main(["quantize", tiny_model, "--recipe", str(recipe), "-o", str(out)]) == 0
    window = ["--text", str(text), "--seq-len", "16", "--max-tokens", "64", "--json"]
    capsys.readouterr()
    assert main(["eval", str(out), *window]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert main(["eval", tiny_model, "--recipe", str(recipe), *window]) == 0
    direct = json.loads(capsys.readouterr().out)
    assert saved == direct  # the packed, untied checkpoint is the model eval quantized
    model, params, _ = jquant.models.load(str(out))
    assert not model.config.tie_word_embeddings
    assert params["lm_head"]["kernel"].get_value().qtype == "int8"
    assert params["embed_tokens"]["embedding"].get_value().qtype == "uint4"
