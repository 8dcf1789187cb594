"""Scale folding and the sequential calibration driver on a tiny random Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import algorithms
from jquant.algorithms import rtn
from jquant.calib import llama_folds, quantize_model
from jquant.calib.fold import apply_fold
from jquant.models import LlamaConfig, blocks, init_model
from jquant.recipe import Recipe

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, qkv_bias=True)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CONFIG, seed=0)
    params = nnx.state(model, nnx.Param)
    tokens = np.random.RandomState(0).randint(0, 64, (3, 12))
    return model, params, tokens


def _copy(params):
    return jax.tree.map(lambda v: v, params)


def _family(model_type: str) -> LlamaConfig:
    return LlamaConfig.from_hf(dict(
        model_type=model_type, vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8,
        attn_logit_softcapping=20.0, final_logit_softcapping=10.0))  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3_text"])
def test_folding_any_scales_leaves_the_float_model_unchanged(family):
    """For every family: Gemma's norms multiply by 1 + w, and its MLP reads the
    pre-feed-forward norm (a fold into the wrong norm, or one ignoring the offset, fails)."""
    config = CONFIG if family == "llama" else _family(family)
    model = init_model(config, seed=0)
    params = nnx.state(model, nnx.Param)
    rng = np.random.RandomState(1)
    for path, var in nnx.to_flat_state(params):  # norms away from their neutral value
        if path[-1] == "scale":
            var.set_value(jnp.asarray(rng.uniform(-0.5, 0.5, var.get_value().shape), jnp.float32))
    tokens = rng.randint(0, 64, (3, 12))
    before = np.asarray(blocks.layerwise_forward(model, params, tokens))
    folded = _copy(params)
    for i in range(config.num_layers):
        state = blocks.layer_params(folded, i)
        for fold in llama_folds(config):
            src = state
            for key in fold.source.split("/"):
                src = src[key]
            n = src.get_value().shape[-1]
            apply_fold(state, fold, jnp.asarray(rng.uniform(0.2, 5.0, n), jnp.float32))
    after = np.asarray(blocks.layerwise_forward(model, folded, tokens))
    norm = lambda p: np.asarray(blocks.layer_params(p, 0)["input_layernorm"]["scale"].get_value())  # noqa: E731
    assert not np.allclose(norm(folded), norm(params))  # the fold did change the parameters
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5 * np.abs(before).max())


def test_rtn_through_the_driver_gives_plain_quantize_codes(tiny):
    model, params, tokens = tiny
    qparams, report = quantize_model(model, params, "w4a16-rtn-g128", tokens, progress=False)
    plain = jquant.quantize(params, "w4a16-rtn-g128")
    a, b = jax.tree.leaves(qparams), jax.tree.leaves(plain)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    layers = [r for r in report.rows if r.path.startswith("layers/")]
    assert len(layers) == 7 * CONFIG.num_layers
    assert all(0 < r.output_error < 0.1 for r in layers)
    # The recipe's int8 head has a row of its own (the lookup table is quantized, not reported).
    assert [r.path for r in report.rows if r not in layers] == ["lm_head/kernel"]


def _probe(weight, rule, *, path, calibration=None):
    """RTN, reporting the trace of the Hessian it was given."""
    q = rtn.rtn(weight, rule, path=path)
    return q, {"h_trace": jnp.trace(calibration.hessian), "tokens": calibration.count}


if "trace-probe" not in algorithms.names():
    algorithms.register("trace-probe")(_probe)


def _rms_norm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def test_each_layer_is_calibrated_on_the_outputs_of_the_quantized_layers_before_it(tiny):
    model, params, tokens = tiny
    recipe = Recipe.from_dict({"name": "probe", "rules": [
        {"pattern": "embed", "skip": True},
        {"pattern": "kernel$", "weight": "int2", "group_size": 16, "algorithm": "trace-probe"},
    ]})  # fmt: skip
    qparams, report = quantize_model(model, params, recipe, tokens, progress=False)
    traces = {r.path: r.info["h_trace"] for r in report.rows}
    assert {r.info["tokens"] for r in report.rows} == {tokens.size}
    x, ctx = blocks.embed(model, params, tokens)

    def q_proj_trace(layer_params_0):
        x1 = blocks.run_layer(blocks.layer_graphdef(model, 0), layer_params_0, x, ctx)
        w = np.asarray(blocks.layer_params(params, 1)["input_layernorm"]["scale"].get_value())
        h = _rms_norm(np.asarray(x1), w, CONFIG.rms_norm_eps).reshape(-1, CONFIG.hidden_size)
        return float(np.sum(h * h) / len(h))

    quantized = q_proj_trace(blocks.layer_params(qparams, 0))
    floating = q_proj_trace(blocks.layer_params(params, 0))
    got = traces["layers/1/self_attn/q_proj/kernel"]
    assert abs(got - quantized) < 1e-5 * quantized
    assert abs(got - floating) > 1e-3 * quantized  # the check can tell them apart


def test_an_untied_lm_head_is_calibrated_on_the_final_norm_output():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2, tie_word_embeddings=False)  # fmt: skip
    model = init_model(config, seed=1)
    params = nnx.state(model, nnx.Param)
    tokens = np.random.RandomState(2).randint(0, 64, (2, 16))
    recipe = Recipe.from_dict({"name": "head", "rules": [
        {"pattern": "embed", "skip": True},
        {"pattern": "kernel$", "weight": "int4", "group_size": 16, "algorithm": "trace-probe"},
    ]})  # fmt: skip
    qparams, report = quantize_model(model, params, recipe, tokens, progress=False)
    head = qparams["lm_head"]["kernel"].get_value()
    assert isinstance(head, jquant.QArray)
    row = next(r for r in report.rows if r.path == "lm_head/kernel")
    h, ctx = blocks.embed(model, params, tokens)
    h = blocks.run_layer(blocks.layer_graphdef(model, 0), blocks.layer_params(qparams, 0), h, ctx)
    w = np.asarray(params["norm"]["scale"].get_value())
    normed = _rms_norm(np.asarray(h), w, config.rms_norm_eps).reshape(-1, config.hidden_size)
    assert row.info["h_trace"] == pytest.approx(np.sum(normed**2) / len(normed), rel=1e-5)
