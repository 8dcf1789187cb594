"""The shipped recipes: they load, round-trip, and select the right parameters of both
jquant's Llama layout and stock Flax models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.qarray import QArray
from jquant.recipe import Recipe
from jquant.transform import quantize

SHIPPED = ["fp8", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-q8_0", "mixed", "nf4",
           "w3a16-gptq-g64", "w3a16-gptq-g64-had", "w4a16-awq-g128", "w4a16-awq-gptq-uint4-g64",
           "w4a16-awq-gptq-uint4-g64-emb8", "w4a16-gptq-g128", "w4a16-gptq-g64",
           "w4a16-gptq-uint4-g64", "w4a16-hqq-g64", "w4a16-mxfp4", "w4a16-nvfp4",
           "w4a16-rtn-g128", "w4a16-rtn-g64", "w4a16-uint4-g64", "w8a16", "w8a16-emb8", "w8a8",
           "w8a8-smoothquant"]  # fmt: skip
# Recipes whose algorithms need calibration data: tests/calib/test_recipes.py runs them.
CALIBRATED = ["w3a16-gptq-g64", "w3a16-gptq-g64-had", "w4a16-awq-g128", "w4a16-awq-gptq-uint4-g64",
              "w4a16-awq-gptq-uint4-g64-emb8", "w4a16-gptq-g128", "w4a16-gptq-g64",
              "w4a16-gptq-uint4-g64", "w8a8-smoothquant"]  # fmt: skip
# How a recipe stores the embedding table and an untied head: (qtype, group size, scale
# dtype), or "bfloat16" (kept float in that dtype). The table is SmolLM2's largest tensor.
TABLE = {name: ("int8", 32, "float16") if name.startswith("gguf-") else ("int8", None, "bfloat16")
         for name in SHIPPED}  # fmt: skip
TABLE["fp8"] = "bfloat16"
PLAIN = [n for n in SHIPPED if n not in CALIBRATED]

# recipe → (qtype, group_size, activation, double-quantized) of an MLP projection.
EXPECT = {
    "w8a16": ("int8", None, None, False),
    "w4a16-rtn-g128": ("int4", 128, None, False),
    "w4a16-rtn-g64": ("int4", 64, None, False),
    "w4a16-uint4-g64": ("uint4", 64, None, False),
    "w8a8": ("int8", None, "int8", False),
    "fp8": ("fp8_e4m3", None, "fp8_e4m3", False),
    "nf4": ("nf4", 64, None, True),
    "mixed": ("int4", 128, None, False),
    "w4a16-hqq-g64": ("uint4", 64, None, False),
    "w8a16-emb8": ("int8", None, None, False),
    "w4a16-mxfp4": ("mxfp4", 32, None, False),
    "w4a16-nvfp4": ("nvfp4", 16, None, True),  # its scale: a QArray of E4M3 block scales
    "gguf-q4_0": ("int4", 32, None, False),
    "gguf-q4_1": ("uint4", 32, None, False),
    "gguf-q5_0": ("int5", 32, None, False),
    "gguf-q5_1": ("uint5", 32, None, False),
    "gguf-q8_0": ("int8", 32, None, False),
}

D, F, V, LAYERS = 64, 96, 80, 2


def llama_params():
    """A tiny tree with the parameter paths of jquant's Llama model (tied head omitted)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    attn = {f"{p}_proj": {"kernel": normal(D, D), "bias": jnp.zeros(D)} for p in "qkvo"}
    mlp = {"gate_proj": {"kernel": normal(D, F)}, "up_proj": {"kernel": normal(D, F)},
           "down_proj": {"kernel": normal(F, D)}}  # fmt: skip
    layer = lambda: {"self_attn": attn, "mlp": mlp, "input_layernorm": {"scale": jnp.ones(D)},
                     "post_attention_layernorm": {"scale": jnp.ones(D)}}  # fmt: skip
    return {"embed_tokens": {"embedding": normal(V, D)},
            "layers": {i: layer() for i in range(LAYERS)},
            "norm": {"scale": jnp.ones(D)}, "lm_head": {"kernel": normal(D, V)}}  # fmt: skip


@pytest.fixture(scope="module")
def llama():
    return llama_params()


def test_list_shipped():
    assert Recipe.list_shipped() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_loads_and_round_trips(name):
    r = Recipe.load(name)
    assert r.name == name and r.description
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert r.rules[0].matches("embed_tokens/embedding") and r.rules[1].matches("lm_head/kernel")
    # The table and an untied head alike (so a tied head stays tied).
    assert r.rules[0].to_dict() | {"pattern": ""} == r.rules[1].to_dict() | {"pattern": ""}


@pytest.mark.parametrize("name", PLAIN)
def test_shipped_on_llama_paths(name, llama):
    q = quantize(llama, name)
    check_table(q["embed_tokens"]["embedding"], llama["embed_tokens"]["embedding"], TABLE[name],
                axis=-1)  # fmt: skip
    check_table(q["lm_head"]["kernel"], llama["lm_head"]["kernel"], TABLE[name], axis=-2)
    assert q["norm"]["scale"] is llama["norm"]["scale"]
    qtype, group, act, dq = EXPECT[name]
    for i in range(LAYERS):
        layer, qlayer = llama["layers"][i], q["layers"][i]
        assert qlayer["input_layernorm"]["scale"] is layer["input_layernorm"]["scale"]
        assert qlayer["self_attn"]["q_proj"]["bias"] is layer["self_attn"]["q_proj"]["bias"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w = qlayer["mlp"][proj]["kernel"]
            assert isinstance(w, QArray) and w.axis == -2
            assert (w.qtype, w.group_size, w.activation) == (qtype, group, act)
            assert isinstance(w.scale, QArray) == dq
        attn_q = qlayer["self_attn"]["o_proj"]["kernel"]
        assert attn_q.qtype == ("fp8_e4m3" if name == "mixed" else qtype)
    quantized = sum(isinstance(x, QArray) for x in jax.tree.leaves(q, is_leaf=is_q))
    assert quantized == 7 * LAYERS + (0 if TABLE[name] == "bfloat16" else 2)


def is_q(x):
    return isinstance(x, QArray)


def check_table(got, table, fmt, *, axis):
    """``got``, the table (or head) ``table`` as stored by format ``fmt`` (see TABLE):
    int8 along ``axis`` within half a step of the float values, or the values in bfloat16."""
    if fmt == "bfloat16":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(table).astype(jnp.bfloat16))
        return
    qtype, group, scale_dtype = fmt
    assert (got.qtype, got.axis, got.group_size) == (qtype, axis, group)
    assert got.scale.dtype == jnp.dtype(scale_dtype)
    w = np.asarray(table)
    k = w.shape[axis]
    g = group or k
    blocks = np.moveaxis(w, axis, -1).reshape(-1, k // g, g)
    step = np.abs(blocks).max(-1, keepdims=True) / 127  # symmetric absmax, 127 steps a side
    err = np.abs(np.moveaxis(np.asarray(got.dequantize(jnp.float32)), axis, -1).reshape(
        blocks.shape) - blocks)  # fmt: skip
    assert np.all(err <= 0.51 * step + 1e-6)


class Stock(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D)(ids)
        return nn.Dense(V, name="lm_head")(nn.Dense(D)(nn.Dense(F)(h)))


@pytest.mark.parametrize("name", ["w4a16-rtn-g128", "mixed", "fp8"])
def test_shipped_on_stock_linen(name):
    params = Stock().init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    q = quantize(params, name)["params"]
    float_params = params["params"]
    check_table(q["Embed_0"]["embedding"], float_params["Embed_0"]["embedding"], TABLE[name],
                axis=-1)  # fmt: skip
    check_table(q["lm_head"]["kernel"], float_params["lm_head"]["kernel"], TABLE[name], axis=-2)
    assert isinstance(q["Dense_0"]["kernel"], QArray) and isinstance(q["Dense_1"]["kernel"], QArray)
    assert q["Dense_0"]["bias"] is params["params"]["Dense_0"]["bias"]


@pytest.mark.parametrize("name, ggml", [("gguf-q4_0", "Q4_0"), ("gguf-q4_1", "Q4_1"),
                                        ("gguf-q5_0", "Q5_0"), ("gguf-q5_1", "Q5_1"),
                                        ("gguf-q8_0", "Q8_0")])  # fmt: skip
def test_gguf_recipes_map_onto_their_ggml_type(name, ggml):
    from jquant.io._gguf_types import rule_type

    kernel = Recipe.load(name).rules[2]
    assert kernel.scale_dtype == "float16"
    assert rule_type({k: getattr(kernel, k) for k in ("weight", "group_size", "scale_dtype",
                                                      "double_quant", "activation")}) == ggml
