"""QLoRA: adapters on a frozen quantized base, through jquant.ops; merge, requantize, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jquant
from jquant import models
from jquant.qat import lora

ATTN = r"attn/(q|k|v|o)_proj/kernel$"


def _tiny():
    config = models.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                num_layers=2, num_heads=4, num_kv_heads=2,
                                tie_word_embeddings=True, max_position_embeddings=256)
    model = models.init_model(config, seed=0)
    return model, nnx.state(model, nnx.Param)


def test_lora_matmul_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(128, 32)).astype(np.float32)
    base = jquant.quantize_array(w, "nf4", group_size=64, double_quant=True)
    a = rng.normal(size=(128, 4)).astype(np.float32)
    b = rng.normal(size=(4, 32)).astype(np.float32)
    x = rng.normal(size=(3, 5, 128)).astype(np.float32)
    weight = lora.apply({"k": base}, {"k": {"a": jnp.asarray(a), "b": jnp.asarray(b)}},
                        alpha=8)["k"]  # fmt: skip
    got = np.asarray(jquant.ops.qdot(jnp.asarray(x), weight))
    deq = np.asarray(base.dequantize(), np.float64)
    want = x @ deq + 2.0 * (x @ a) @ b  # alpha / rank = 8 / 4
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_qlora_trains_adapters_only_and_serves_three_ways():
    model, params = _tiny()
    base = jquant.quantize(params, "nf4")
    adapters = lora.init(base, ATTN, rank=4, key=jax.random.key(1))
    assert len(adapters) == 8 and lora.num_trainable(adapters) == sum(
        4 * (a["a"].shape[0] + a["b"].shape[1]) for a in adapters.values())
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 64)), jnp.int32)
    start, _ = models.forward(model, lora.apply(base, adapters, alpha=8), tokens)
    plain, _ = models.forward(model, base, tokens)
    np.testing.assert_allclose(np.asarray(start), np.asarray(plain), atol=2e-6)  # b = 0

    def loss(ad):
        logits, _ = models.forward(model, lora.apply(base, ad, alpha=8), tokens)
        return jquant.qat.next_token_loss(logits, tokens)

    tx = optax.adam(1e-2)

    @jax.jit
    def step(ad, opt):
        value, g = jax.value_and_grad(loss)(ad)
        with jax.numpy_dtype_promotion("standard"):
            u, opt = tx.update(g, opt, ad)
        return optax.apply_updates(ad, u), opt, value

    ad, opt = adapters, tx.init(adapters)
    ad, opt, first = step(ad, opt)
    for _ in range(20):
        ad, opt, last = step(ad, opt)
    assert float(last) < float(first) - 0.1
    kept, _ = models.forward(model, lora.apply(base, ad, alpha=8), tokens)
    merged, _ = models.forward(model, lora.merge(base, ad, alpha=8), tokens)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(kept), rtol=1e-4, atol=1e-4)
    requant = lora.requantize(base, ad, "nf4", alpha=8)
    q = requant["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q.get_value() if hasattr(q, "get_value") else q, jquant.QArray)
    rq, _ = models.forward(model, requant, tokens)
    assert float(jquant.qat.next_token_loss(rq, tokens)) < float(first)
    mem = lora.memory(base, ad)
    assert mem["adapters"] == 4 * lora.num_trainable(ad) and mem["optimizer"] == 2 * mem["adapters"]
    assert mem["total"] == mem["base"] + 3 * mem["adapters"]


def test_lora_bad_input():
    _, params = _tiny()
    base = jquant.quantize(params, "nf4")
    with pytest.raises(ValueError, match=r"target 'mlp/nothing' matches no parameter"):
        lora.init(base, [ATTN, "mlp/nothing"])
    with pytest.raises(ValueError, match="adapters go on 2-D kernels"):
        lora.init(base, "embed_tokens/embedding")
    with pytest.raises(ValueError, match="rank=0"):
        lora.init(base, ATTN, rank=0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lora.init(base, "attn/(")
    ad = lora.init(base, ATTN, rank=2)
    with pytest.raises(ValueError, match="has no parameter in the base tree"):
        q0 = ad["layers/0/self_attn/q_proj/kernel"]
        lora.apply(base, {**ad, "layers/9/self_attn/q_proj/kernel": q0})
    wrong = dict(ad)
    wrong["layers/0/self_attn/q_proj/kernel"] = {"a": jnp.zeros((64, 2)), "b": jnp.zeros((2, 128))}
    with pytest.raises(ValueError, match=r"the kernel is \(128, 128\)"):
        lora.merge(base, wrong)
