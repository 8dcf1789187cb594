"""Memory report: true storage bytes and the serving estimate."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.memory import ACCELERATORS, memory_report
from jquant.qarray import quantize_array


def _llama_like(layers=2, d=256, kv=64):
    return {
        "layers": {
            str(i): {
                "self_attn": {
                    "k_proj": {"kernel": np.zeros((d, kv), np.float32)},
                    "q_proj": {"kernel": np.zeros((d, d), np.float32)},
                }
            }
            for i in range(layers)
        }
    }


def test_int4_g128_bf16_4096_square_bytes():
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)
    report = memory_report({"w": quantize_array(w, "int4", group_size=128)})
    assert report.weight_bytes == 4096 * 4096 // 2 + 4096 * 32 * 2
    assert report.by_format["int4"].bits_per_weight == pytest.approx(4.125)
    assert report.by_format["int4"].tensors == 1


def test_float_and_quantized_leaves_are_counted_apart():
    params = {"a": np.zeros((64, 64), np.float16), "b": quantize_array(np.ones((64, 64),
                                                                       np.float32), "int8")}
    r = memory_report(params)
    assert r.by_format["float16"].nbytes == 64 * 64 * 2
    assert r.by_format["int8"].nbytes == 64 * 64 + 64 * 2  # codes + one bf16 scale per column
    assert r.weight_elements == 2 * 64 * 64


def test_kv_cache_math_from_inferred_layers():
    r = memory_report(_llama_like(layers=3, kv=64), batch=2, context=100, kv_cache="bfloat16",
                      overhead=0.0)
    assert (r.layers, r.kv_width) == (3, 64)
    assert r.kv_cache_bytes == 2 * 3 * 2 * 100 * 64 * 2
    assert r.total_bytes == r.weight_bytes + r.kv_cache_bytes


@pytest.mark.parametrize("q_norm, k_norm, head_dim", [(32, 32, 32), (256, 64, None)])
def test_head_dim_from_a_per_head_k_norm_only(q_norm, k_norm, head_dim):
    """A per-head k_norm (Qwen3) gives head_dim; OLMoE's span the whole projections (its
    q_norm as wide as q_proj), which says nothing of the heads: a quantized cache then needs
    head_dim= or config=."""
    params = _llama_like(layers=2, kv=64)
    for layer in params["layers"].values():
        layer["self_attn"]["q_norm"] = {"scale": np.ones((q_norm,), np.float32)}
        layer["self_attn"]["k_norm"] = {"scale": np.ones((k_norm,), np.float32)}
    if head_dim is None:
        with pytest.raises(ValueError, match="pass head_dim= or config="):
            memory_report(params, kv_cache="int8")
    else:
        r = memory_report(params, kv_cache="int8", context=10, overhead=0)
        assert r.kv_cache_bytes == 2 * 2 * 10 * 64 + 2 * 2 * 10 * 2 * 2  # codes + bf16 scales


def test_kv_cache_from_config_and_quantized_cache_scales():
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576}
    r = memory_report({}, batch=8, context=8192, kv_cache="int8", config=config, overhead=0)
    elems = 2 * 30 * 8 * 8192 * 3 * 64
    assert r.kv_cache_bytes == elems + elems // 64 * 2  # head_dim 64: one scale per head


def test_fits_on_compares_total_with_each_device():
    big = {"w": np.zeros((1,), np.float32)}
    r = memory_report(big, batch=1, context=90, layers=80, kv_width=1024 * 1024,
                      kv_cache="float32", overhead=0)
    assert r.total_bytes > 40e9 and r.total_bytes < 80e9
    assert r.fits_on["H100 80GB"] and not r.fits_on["A100 40GB"]
    assert set(r.fits_on) == set(ACCELERATORS)
    assert "fits on: H100 80GB yes" in r.format()


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(kv_cache="int3"), "kv_cache='int3' is unknown"), (dict(batch=0), "batch"),
     (dict(context=-1), "context"), (dict(overhead=-0.5), "overhead")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory_report({}, **kwargs)


def _numpy_cache_bytes(layers, slots, kv_heads, max_len, head_dim, code_bytes, scale_bytes):
    """K and V codes ``(layers, slots, kv_heads, max_len, head_dim)`` plus one scale each per
    ``(layer, slot, head, position)``: counted from the shapes, not from jquant."""
    codes = np.prod((layers, slots, kv_heads, max_len, head_dim)) * code_bytes
    scales = np.prod((layers, slots, kv_heads, max_len)) * scale_bytes
    return int(2 * (codes + scales))


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kv_cache,code_bytes,scale_bytes",
                         [("int8", 1, 2), ("fp8", 1, 2), ("bfloat16", 2, 0), ("none", 4, 0)])
def test_report_counts_the_serving_cache_bytes(head_dim, kv_cache, code_bytes, scale_bytes):
    """The report's KV bytes are the bytes the serving cache really allocates, at every
    head_dim (a scale per 64 elements agreed only at head_dim 64)."""
    import jax
    import jax.numpy as jnp

    from jquant.models import LlamaConfig
    from jquant.models.cache import init_paged_cache, kv_format

    cfg = LlamaConfig(vocab_size=16, hidden_size=2 * head_dim, intermediate_size=8,
                      num_layers=3, num_heads=2, num_kv_heads=2, head_dim=head_dim)  # fmt: skip
    slots, max_len = 2, 40
    cache = jax.eval_shape(lambda: init_paged_cache(cfg, slots, max_len, kv_format(kv_cache),
                                                   jnp.float32))  # fmt: skip
    allocated = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    expected = _numpy_cache_bytes(3, slots, 2, max_len, head_dim, code_bytes, scale_bytes)
    assert allocated == expected
    config = {"num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
              "hidden_size": 2 * head_dim, "head_dim": head_dim}
    r = memory_report({}, batch=slots, context=max_len, kv_cache=kv_cache, config=config,
                      dtype="float32", overhead=0)  # fmt: skip
    assert r.kv_cache_bytes == expected


def test_quantized_cache_without_head_dim_is_refused():
    with pytest.raises(ValueError, match="head_dim"):
        memory_report(_llama_like(), kv_cache="int8")


def test_mixture_of_experts_counts_total_and_active_weights():
    """A tiny Qwen3-MoE-like model, layer 0 MoE and layer 1 dense: every weight counts in
    the total; per token, k of the E experts of the MoE layer (and everything else).
    Expected sizes come from the config's shapes by hand, not from the tree the report
    walks."""
    from jquant.models import LlamaConfig, init_model

    v, d, f, fe, e, k, n = 32, 16, 40, 24, 6, 2, 2
    config = LlamaConfig(model_type="qwen3_moe", vocab_size=v, hidden_size=d,
                         intermediate_size=f, num_layers=n, num_heads=2, num_kv_heads=1,
                         head_dim=8, num_experts=e, num_experts_per_tok=k,
                         moe_intermediate_size=fe, moe_layers=(0,),
                         tie_word_embeddings=False)  # fmt: skip
    params = nnx.state(init_model(config, seed=0))
    attn = d * 16 + 2 * d * 8 + 16 * d  # q, k, v, o
    moe = attn + e * d + 3 * e * d * fe + 2 * d  # router, experts, two norms
    dense = attn + 3 * d * f + 2 * d
    total = 2 * v * d + d + moe + dense  # table, head, final norm
    r = memory_report(params, experts_per_token=k)
    assert r.weight_elements == total
    assert r.active_elements == total - 3 * (e - k) * d * fe
    assert r.active_bytes == 4 * r.active_elements  # float32
    assert (r.experts, r.experts_per_token) == (e, k) and "2 of 6 experts" in r.format()
    q = jquant.quantize(params, "w8a16")
    rq = memory_report(q, config={"num_experts_per_tok": k, "num_attention_heads": 2,
                                  "num_hidden_layers": n, "num_key_value_heads": 1,
                                  "head_dim": 8, "hidden_size": d})  # fmt: skip
    # int8 experts: one byte a weight and one bfloat16 scale per expert and output channel.
    expert_bytes = 2 * (e * d * fe + 2 * e * fe) + (e * fe * d + 2 * e * d)
    assert rq.weight_bytes - rq.active_bytes == expert_bytes * (e - k) // e
    unknown = memory_report(params)  # no top-k: nothing to say of what a token reads
    assert unknown.active_elements == total and "active" not in unknown.format()
    with pytest.raises(ValueError, match="not in 1..6"):
        memory_report(params, experts_per_token=7)


def test_dense_model_active_equals_total():
    r = memory_report({"layers/0/mlp/up_proj/kernel": np.zeros((8, 4), np.float32)})
    assert (r.active_elements, r.active_bytes, r.experts) == (32, 128, 0)
    assert "active" not in r.format()


def test_qwen3_30b_a3b_total_and_active_from_its_config():
    """Qwen3-30B-A3B priced abstractly: the counts its shapes give by hand (its model card
    says 30.5B total and 3.3B activated; counted with both embedding tables, 3.35B)."""
    from jquant.models import LlamaConfig, abstract_model

    config = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                  intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                  moe_intermediate_size=768, tie_word_embeddings=False)  # fmt: skip
    model = abstract_model(LlamaConfig.from_hf(config), param_dtype=jnp.bfloat16)
    r = memory_report(nnx.state(model), config=config)
    d, q, kv, e, k, f = 2048, 32 * 128, 4 * 128, 128, 8, 768
    layer = 2 * d * q + 2 * d * kv + 2 * 128 + 2 * d + e * d  # attention, norms, router
    total = 48 * (layer + 3 * e * d * f) + 2 * 151936 * d + d
    active = 48 * (layer + 3 * k * d * f) + 2 * 151936 * d + d
    assert (r.weight_elements, r.active_elements) == (total, active)
    assert round(total / 1e9, 1) == 30.5 and round(active / 1e9, 2) == 3.35
    assert r.active_bytes == 2 * active
