"""Mixture-of-experts models (Mixtral, Qwen2/3-MoE, OLMoE) against Hugging Face transformers,
and the grouped matmul and routing against NumPy loops.

The transformers models are tiny random ones built with transformers' own classes (torch,
float32), written with ``save_pretrained`` (one Linear per expert on disk) and read back by
`jquant.models.load`; their in-memory ``state_dict()`` (experts fused into 3-D
``gate_up_proj`` / ``down_proj``) is imported too. Routers are scaled up so that tokens
really pick different experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.models import LlamaConfig, blocks, core, forward, generate, load, params_from_hf
from jquant.models.moe import MoE, grouped_matmul, route
from jquant.qarray import QArray, quantize_array

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-5,
            eos_token_id=2, bos_token_id=1, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip

CASES = {
    # Every layer sparse; top-2 of 4, always renormalized.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2)),
    # Every layer sparse, top-3 of 6, renormalized.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
                       norm_topk_prob=True)),
    # Layers dense, MoE, dense (decoder_sparse_step=2 and mlp_only_layers=[2]); the top-2
    # weights are not renormalized (norm_topk_prob=False, the Qwen3-MoE default).
    "qwen3_moe-mixed": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                             norm_topk_prob=False, decoder_sparse_step=2,
                             mlp_only_layers=[2])),
    # Qwen2-MoE: q/k/v biases, a shared expert beside the routed ones; layer 0 dense.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, norm_topk_prob=False,
                       mlp_only_layers=[0])),
    # OLMoE: q/k RMSNorms over the whole projection (not per head); every layer sparse, the
    # top-2 weights not renormalized (norm_topk_prob=False, its default).
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
}  # fmt: skip
MOE_LAYERS = {"mixtral": (0, 1, 2), "qwen3_moe": (0, 1, 2), "qwen3_moe-mixed": (1,),
              "qwen2_moe": (1, 2), "olmoe": (0, 1, 2)}  # fmt: skip
MIXED = ("qwen3_moe-mixed", "qwen2_moe")


def _hf_model(case):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # routers: spread the logits out
                p.mul_(20.0)
            elif "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _close(got, want) -> float:
    scale = max(1.0, float(np.abs(want).max()))
    return float(np.abs(np.asarray(got) - want).max()) / scale


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, transformers model, jquant model, params) loaded from save_pretrained's dir."""
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params, _ = load(path, dtype=jnp.float32)
    return request.param, hf, model, params


IDS = np.random.default_rng(0).integers(3, VOCAB, (2, 24))


def _hf_logits(hf, ids=IDS):
    import torch

    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


@pytest.mark.reference
def test_config_reads_the_experts(pair):
    case, hf, model, _ = pair
    c, hc = model.config, hf.config
    assert c.model_type == hc.model_type and c.moe_layers == MOE_LAYERS[case]
    assert c.num_experts == getattr(hc, "num_local_experts", None) or hc.num_experts
    assert c.num_experts_per_tok == hc.num_experts_per_tok
    assert c.norm_topk_prob == (case in ("mixtral", "qwen3_moe"))
    assert c.shared_expert_intermediate_size == (40 if case == "qwen2_moe" else 0)


@pytest.mark.reference
def test_routing_is_real(pair):
    """Every expert of every MoE layer gets some of the prompt's tokens (a router that
    sent everything to one expert would make the logit test weak)."""
    _, hf, model, params = pair
    x, ctx = blocks.embed(model, params, IDS)
    for i in range(model.config.num_layers):
        layer = nnx.merge(nnx.graphdef(model.layers[i]), params["layers"][i])
        if model.config.is_moe(i):
            logits = layer.mlp.gate(layer.mlp_norm(x).reshape(-1, x.shape[-1]))
            _, experts = route(logits, model.config.num_experts_per_tok, normalize=True)
            assert set(np.asarray(experts).ravel()) == set(range(model.config.num_experts))
        x = blocks.apply_layer(nnx.graphdef(model.layers[i]), params["layers"][i], x,
                               ctx.at(model.config, i))  # fmt: skip


@pytest.mark.reference
def test_logits_match(pair):
    """The saved checkpoint (per-expert Linears), read by `load`, under `forward` (layers
    stacked under one scan where their trees match: all-MoE models) and stage by stage
    (`layerwise_forward`: every layer unrolled)."""
    case, hf, model, params = pair
    want = _hf_logits(hf)
    got, _ = forward(model, params, jnp.asarray(IDS, jnp.int32))
    stacked = core.is_stacked(core.weights(params, model.config.num_layers)["layers"])
    assert stacked == (case not in MIXED)
    assert _close(got, want) < 2e-5
    assert _close(blocks.layerwise_forward(model, params, IDS), want) < 2e-5


@pytest.mark.reference
def test_fused_state_dict_imports(pair):
    """transformers 5's in-memory layout (3-D gate_up_proj / down_proj, router at mlp.gate)."""
    _, hf, _, _ = pair
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in tensors)
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(hf.config.to_dict()))
    got, _ = forward(model, params, jnp.asarray(IDS, jnp.int32))
    assert _close(got, _hf_logits(hf)) < 2e-5


@pytest.mark.reference
def test_greedy_matches(pair):
    _, hf, model, params = pair
    import torch

    prompt, steps = IDS[0, :12].tolist(), 24
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    want = out[0, len(prompt) :].tolist()
    got = generate(model, params, prompt, max_new_tokens=steps, stop_tokens=())
    assert got.sequences()[0] == want


@pytest.mark.reference
def test_quantized_experts_run(pair):
    """A recipe quantizes the stacked experts along each expert's K (int8, per channel) and
    leaves the router float; the model runs them (under scan where stacked) as it runs
    their dequantized float weights, and stays near transformers' float logits at most
    positions (a routing near a tie may flip, and a flip moves its position and those after it
    by far more: the tiny OLMoE flips one, 0.18 of the largest logit)."""
    _, hf, model, params = pair
    qparams = jquant.quantize(params, jquant.Recipe.load("w8a16"))
    i = model.config.moe_layers[0]
    q = qparams["layers"][i]["mlp"]["experts"]["down_proj"]["kernel"].get_value()
    assert isinstance(q, QArray) and q.shape == (model.config.num_experts,
                                                 model.config.moe_intermediate_size, 32)
    assert q.k == model.config.moe_intermediate_size
    assert not isinstance(qparams["layers"][i]["mlp"]["gate"]["weight"].get_value(), QArray)
    got, _ = forward(model, qparams, jnp.asarray(IDS, jnp.int32))
    dequantized = jax.tree.map(lambda v: v.dequantize() if isinstance(v, QArray) else v,
                               qparams, is_leaf=lambda v: isinstance(v, QArray))  # fmt: skip
    want, _ = forward(model, dequantized, jnp.asarray(IDS, jnp.int32))
    assert _close(got, np.asarray(want)) < 1e-5
    want = _hf_logits(hf)
    per_position = np.abs(np.asarray(got) - want).max(-1) / max(1.0, float(np.abs(want).max()))
    assert float(np.median(per_position)) < 0.05  # measured 0.01 to 0.02


@pytest.mark.reference
def test_lazy_layers_read_the_saved_experts(pair, tmp_path_factory):
    """`layer_params_from_hf` on a lazily read checkpoint assembles each layer's expert
    stacks from the per-expert tensors, equal to the eager load's."""
    case, hf, _, params = pair
    from jquant.io import load_checkpoint
    from jquant.models import layer_params_from_hf

    path = tmp_path_factory.mktemp(f"{case}-lazy")
    hf.save_pretrained(path)
    ckpt = load_checkpoint(str(path), lazy=True)
    config = LlamaConfig.from_hf(ckpt.config)
    for i in range(config.num_layers):
        got = nnx.to_flat_state(layer_params_from_hf(ckpt.tensors, config, i))
        want = dict(nnx.to_flat_state(params["layers"][i]))
        assert [k for k, _ in got] == list(want)
        for k, v in got:
            np.testing.assert_array_equal(v.get_value(), want[k].get_value())


@pytest.mark.reference
def test_greedy_through_serving_runner(pair):
    """The serving engine's slot cache (chunked prefill, then one-token decode steps) gives
    `generate`'s greedy tokens."""
    from jquant.serve.runner import Runner, Sampling

    _, _, model, params = pair
    prompt = IDS[0, :12].tolist()
    want = generate(model, params, prompt, max_new_tokens=8, stop_tokens=()).sequences()[0]
    runner = Runner(model, params, rows=2, max_len=64, prefill_chunk=8)
    greedy, table = Sampling.greedy(1), [list(range(8))]
    token = int(runner.prefill(table, [prompt[:8]], [0], greedy)[0])
    token = int(runner.prefill(table, [prompt[8:]], [8], greedy)[0])
    out, pos = [token], len(prompt)
    for _ in range(7):
        token = int(runner.decode(table, [token], [pos], greedy)[0])
        out.append(token)
        pos += 1
    assert out == want


# ---- the grouped matmul and the routing against NumPy -----------------------------------


def _grouped_loop(x, w, sizes):
    out, start = np.zeros((x.shape[0], w.shape[-1]), np.float64), 0
    for e, n in enumerate(sizes):
        out[start : start + n] = x[start : start + n].astype(np.float64) @ w[e]
        start += n
    return out


SIZES = [3, 0, 5, 1, 7]  # an expert with no rows among them


def test_grouped_matmul_float():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 24), dtype=np.float32)
    w = rng.standard_normal((5, 24, 40), dtype=np.float32)
    got = grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(SIZES, jnp.int32))
    np.testing.assert_allclose(got, _grouped_loop(x, w, SIZES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype, group_size", [("int8", None), ("int4", 8)])
def test_grouped_matmul_quantized(qtype, group_size):
    """An expert stack quantized as one QArray (axis K of each expert) dequantizes per expert
    exactly as each expert quantized alone, and the grouped matmul uses those weights."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 24), dtype=np.float32)
    w = rng.standard_normal((5, 24, 40), dtype=np.float32)
    q = quantize_array(jnp.asarray(w), qtype, axis=1, group_size=group_size)
    assert q.shape == w.shape and q.k == 24
    alone = np.stack([np.asarray(quantize_array(jnp.asarray(w[e]), qtype, axis=0,
                                                group_size=group_size).dequantize())
                      for e in range(5)])  # fmt: skip
    np.testing.assert_array_equal(np.asarray(q.dequantize()), alone)
    got = grouped_matmul(jnp.asarray(x), q, jnp.asarray(SIZES, jnp.int32))
    np.testing.assert_allclose(got, _grouped_loop(x, alone, SIZES), rtol=1e-5, atol=1e-5)


def _moe_loop(x, router, gate, up, down, k, normalize):
    """Token by token: softmax, the k largest, renormalized, the chosen experts' SwiGLU."""
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    out = np.zeros_like(x, np.float64)
    for t, row in enumerate(x.astype(np.float64)):
        logits = router.astype(np.float64) @ row
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        w = p[top] / p[top].sum() if normalize else p[top]
        for e, we in zip(top, w):
            out[t] += we * ((silu(row @ gate[e]) * (row @ up[e])) @ down[e])
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_moe_layer_against_loop(normalize):
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=24, num_layers=1,
                         num_heads=2, num_kv_heads=1, num_experts=5, num_experts_per_tok=2,
                         moe_intermediate_size=12, norm_topk_prob=normalize,
                         moe_layers=(0,))  # fmt: skip
    layer = MoE(config, jax.nn.silu, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    router = rng.standard_normal((5, 16)).astype(np.float32)
    layer.gate.weight.set_value(jnp.asarray(router))
    x = rng.standard_normal((3, 7, 16)).astype(np.float32)
    weights = []
    for m in (layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj):
        weights.append(0.5 * rng.standard_normal(m.kernel.get_value().shape).astype(np.float32))
        m.kernel.set_value(jnp.asarray(weights[-1]))
    want = _moe_loop(x.reshape(-1, 16), router, *weights, 2, normalize).reshape(x.shape)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(layer(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)


# ---- bad configs and checkpoints ---------------------------------------------------------

BASE = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip


@pytest.mark.parametrize("config, match", [
    (dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=5),
     "num_experts_per_tok=5 must be an int in \\[1, num_experts=4\\]"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=0),
     "num_experts_per_tok=0"),
    (dict(model_type="mixtral", num_experts_per_tok=2), "needs 'num_local_experts'"),
    (dict(model_type="qwen3_moe", num_experts=4), "needs 'num_experts_per_tok'"),
    (dict(model_type="mixtral", num_local_experts=0, num_experts_per_tok=1),
     "num_local_experts=0 must be at least 1"),
    (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=6),
     "num_experts_per_tok=6 must be an int in \\[1, num_experts=4\\]"),
    (dict(model_type="olmoe", num_experts=0, num_experts_per_tok=1),
     "num_experts=0 must be at least 1"),
    (dict(model_type="olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=8.0),
     "olmoe with clip_qkv=8.0 is not supported"),
])  # fmt: skip
def test_bad_moe_config(config, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**BASE, **config})


def test_missing_router_names_the_tensor():
    config = LlamaConfig.from_hf({**BASE, "model_type": "qwen3_moe", "num_experts": 3,
                                  "num_experts_per_tok": 2})  # fmt: skip
    model = jquant.models.init_model(config)
    tensors = jquant.models.params_to_hf(nnx.state(model))
    assert tensors["model.layers.1.mlp.experts.up_proj.weight"].shape == (3, 32, 16)
    params_from_hf(tensors, config)  # the stacked names round-trip
    del tensors["model.layers.1.mlp.gate.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.gate.weight'"):
        params_from_hf(tensors, config)
