"""QAT with real models: stock Flax Linen and NNX layers, jquant's Llama, a sharded step."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jquant
from jquant import models, qat


def _adam_step(loss, tx):
    @jax.jit
    def step(p, s, opt, *args):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(p, s, *args)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            updates, opt = tx.update(grads, opt, (p, s))
        p, s = optax.apply_updates((p, s), updates)
        return p, s, opt, value

    return step


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16)(jax.nn.gelu(nn.Dense(128)(x)))


W4A8 = jquant.Recipe.from_dict({"name": "w4a8", "rules": [
    {"pattern": "kernel$", "weight": "int4", "group_size": 64, "activation": "int8"}]})


@pytest.mark.parametrize("recipe", ["w4a16-rtn-g128", W4A8], ids=["w4a16", "w4a8"])
def test_linen_model_trains_and_converts(recipe):
    model, rng = Mlp(), np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 256)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    teacher = model.apply(variables, x)
    state = qat.init(variables, recipe)
    assert sorted(state) == ["params/Dense_0/kernel", "params/Dense_1/kernel"]

    def loss(v):  # jquant.apply: stock Dense layers run W4A8's activation fake-quant too
        return jnp.mean((jquant.apply(model, v, x) - teacher) ** 2)

    tx = qat.optimizer(optax.adam(1e-4), scales=optax.adam(1e-4))
    step = _adam_step(qat.wrap(loss, recipe), tx)
    p, s, opt, first = step(variables, state, tx.init((variables, state)))
    for _ in range(30):
        p, s, opt, last = step(p, s, opt)
    assert float(last) < 0.8 * float(first)
    packed = qat.convert(p, s, recipe)
    assert isinstance(packed["params"]["Dense_0"]["kernel"], jquant.QArray)
    served = jquant.apply(model, packed, x)
    faked = jquant.apply(model, qat.fake_quantize(p, recipe, s), x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(faked), rtol=1e-4, atol=1e-5)


def test_nnx_model_state_trains_and_converts():
    model = nnx.Sequential(nnx.Linear(64, 96, rngs=nnx.Rngs(0)), jax.nn.relu,
                           nnx.Linear(96, 8, rngs=nnx.Rngs(1)))  # fmt: skip
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 64)), jnp.float32)
    target = model(x)
    recipe = "w4a16-uint4-g64"

    def loss(p):
        return jnp.mean((jquant.nnx_apply(nnx.merge(graphdef, p), x) - target) ** 2)

    state = qat.init(params, recipe)
    assert all("zero_point" in e for e in state.values())  # uint4: LSQ+ offsets
    tx = qat.optimizer(optax.adam(3e-4))
    step = _adam_step(qat.wrap(loss, recipe), tx)
    p, s, opt, first = step(params, state, tx.init((params, state)))
    for _ in range(30):
        p, s, opt, last = step(p, s, opt)
    assert float(last) < 0.8 * float(first)
    packed = qat.convert(p, s, recipe)
    served = jquant.nnx_apply(nnx.merge(graphdef, packed), x)
    faked = nnx.merge(graphdef, qat.fake_quantize(p, recipe, s))(x)
    np.testing.assert_allclose(np.asarray(served), np.asarray(faked), rtol=1e-4, atol=1e-5)


def test_llama_convert_gives_the_fake_quant_logits():
    config = models.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                tie_word_embeddings=True, max_position_embeddings=256)
    model = models.init_model(config, seed=0)
    params = nnx.state(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 64)), jnp.int32)
    recipe = "w4a16-rtn-g128"
    state = qat.init(params, recipe)
    # move the scales away from their RTN start, as training would
    state = {p: {"scale": e["scale"] * 1.05} for p, e in state.items()}
    fake, _ = models.forward(model, qat.fake_quantize(params, recipe, state), tokens)
    packed = qat.convert(params, state, recipe)
    served, _ = models.forward(model, packed, tokens)
    np.testing.assert_allclose(np.asarray(served), np.asarray(fake), rtol=0, atol=2e-5)
    rtn, _ = models.forward(model, jquant.quantize(params, recipe), tokens)
    assert float(jnp.abs(rtn - served).max()) > 1e-3  # the moved scales are what is served


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jquant import qat
    from jquant.recipe import Recipe

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    # a: column-parallel (N sharded); b: row-parallel, K sharded on group boundaries.
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(256, 128)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(128, 64)) * 0.1, jnp.float32)}}
    x = jnp.asarray(rng.normal(size=(16, 256)), jnp.float32)
    recipe = Recipe.from_dict({"name": "t", "rules": [
        {"pattern": "a/kernel", "weight": "int4", "group_size": 64},
        {"pattern": "b/kernel", "weight": "uint4", "group_size": 32}]})
    state = qat.init(params, recipe)
    # SGD: updates linear in the gradients (Adam's normalisation would magnify the
    # reduction-order rounding of near-zero gradients into whole steps)
    tx = qat.optimizer(optax.sgd(0.1), scales=optax.sgd(1e-3))

    def loss(p, s, x):
        fq = qat.fake_quantize(p, recipe, s)
        return jnp.mean((jnp.tanh(x @ fq["a"]["kernel"]) @ fq["b"]["kernel"]) ** 2)

    @jax.jit
    def step(p, s, opt, x):
        value, g = jax.value_and_grad(loss, argnums=(0, 1))(p, s, x)
        u, opt = tx.update(g, opt, (p, s))
        p, s = optax.apply_updates((p, s), u)
        return p, s, opt, value

    def run(p, s, x):
        opt = tx.init((p, s))
        values = []
        for _ in range(3):
            p, s, opt, v = step(p, s, opt, x)
            values.append(float(v))
        return jax.device_get((p, s)), values

    ref, ref_values = run(params, state, x)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    sp = {"a": {"kernel": put(params["a"]["kernel"], P(None, "model"))},
          "b": {"kernel": put(params["b"]["kernel"], P("model", None))}}
    ss = {"a/kernel": {"scale": put(state["a/kernel"]["scale"], P("model", None))},
          "b/kernel": {k: put(v, P(None, "model")) for k, v in state["b/kernel"].items()}}
    out, values = run(sp, ss, put(x, P("data", None)))
    assert sp["b"]["kernel"].addressable_shards[0].data.shape == (32, 64)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("OK", values)
""")


def test_sharded_training_step_equals_unsharded(eight_cpu_devices):
    env = eight_cpu_devices
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")


def _leaf(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


def test_from_quantized_starts_at_the_calibrated_model():
    config = models.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                tie_word_embeddings=True, max_position_embeddings=256)
    model = models.init_model(config, seed=3)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(4)
    calib = jnp.asarray(rng.integers(0, 256, (4, 64)), jnp.int32)
    recipe = "w4a16-awq-gptq-uint4-g64"  # AWQ scales folded into the norms, GPTQ codes
    gptq, _ = jquant.calib.quantize_model(model, params, recipe, calib, progress=False)
    start, state = qat.from_quantized(gptq, recipe)
    fake = qat.fake_quantize(start, recipe, state)
    tokens = jnp.asarray(rng.integers(0, 256, (2, 32)), jnp.int32)
    want, _ = models.forward(model, gptq, tokens)
    got, _ = models.forward(model, fake, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5)
    packed = qat.convert(start, state, recipe)
    q, g = (_leaf(t["layers"][0]["mlp"]["down_proj"]["kernel"]) for t in (packed, gptq))
    np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(g.codes()))
    rtn_start = qat.convert(params, qat.init(params, recipe), recipe)  # not the same model
    r = _leaf(rtn_start["layers"][0]["mlp"]["down_proj"]["kernel"])
    assert not np.array_equal(np.asarray(r.codes()), np.asarray(g.codes()))
    with pytest.raises(ValueError, match="double-quantized"):
        qat.from_quantized(jquant.quantize(params, "nf4"), "nf4")
