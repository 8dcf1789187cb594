"""The Llama model: config parsing, RoPE scaling, KV cache, padding, conversion, QArrays."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant.models import (
    LlamaConfig,
    forward,
    hf_name,
    init_cache,
    init_model,
    params_from_hf,
    rope_inv_freq,
)

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128)  # fmt: skip


def _tiny(seed=0, **overrides):
    config = LlamaConfig(**{**TINY, **overrides})
    model = init_model(config, seed=seed)
    params = nnx.state(model)
    if config.qkv_bias or config.o_bias:  # zero biases would not test their plumbing
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.random.normal(jax.random.key(len(p)), x.shape, x.dtype) * 0.1
            if "bias" in str(p) else x, params)  # fmt: skip
    return model, params


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY["vocab_size"], jnp.int32)


# ---- config --------------------------------------------------------------------------


HF_LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=256,
                tie_word_embeddings=True, eos_token_id=[5, 7])  # fmt: skip


def test_config_from_hf_llama():
    cfg = LlamaConfig.from_hf(HF_LLAMA)
    assert (cfg.head_dim, cfg.num_groups, cfg.rope_type) == (16, 2, "default")
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and not cfg.o_bias
    assert cfg.eos_token_ids == (5, 7)
    hash(cfg)  # jit-static


def test_config_qwen2_has_qkv_bias_only():
    cfg = LlamaConfig.from_hf({**HF_LLAMA, "model_type": "qwen2"})
    assert cfg.qkv_bias and not cfg.o_bias
    llama_bias = LlamaConfig.from_hf({**HF_LLAMA, "attention_bias": True})
    assert llama_bias.qkv_bias and llama_bias.o_bias


def test_config_rope_parameters_style():
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=64)  # fmt: skip
    raw = {k: v for k, v in HF_LLAMA.items() if k != "rope_theta"}
    cfg = LlamaConfig.from_hf({**raw, "rope_parameters": rope})
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 500000.0, 8.0)
    assert cfg.rope_original_max_position == 64


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (dict(rope_scaling={"type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
        (dict(num_key_value_heads=3), "multiple of num_kv_heads=3"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**HF_LLAMA, **change})


def _llama3_numpy(head_dim, base, factor, low_freq_factor, high_freq_factor, old_context_len):
    """transformers' `_compute_llama3_parameters`, transcribed line by line (float64)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2) / head_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return np.where(is_medium_freq, smoothed, inv_freq_llama)


def test_rope_llama3_matches_transformers_formula():
    cfg = LlamaConfig(**{**TINY, "num_heads": 1, "num_kv_heads": 1}, rope_theta=500000.0,
                      rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                      rope_high_freq_factor=4.0, rope_original_max_position=8192)  # fmt: skip
    got = rope_inv_freq(cfg)
    want = _llama3_numpy(64, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert got.dtype == np.float32 and got.shape == (32,)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    # All three bands are exercised: unchanged, divided by factor, and interpolated.
    plain = _llama3_numpy(64, 500000.0, 1.0, 1.0, 4.0, 8192)
    ratio = want / plain
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()


def test_rope_linear_divides_by_factor():
    base = rope_inv_freq(LlamaConfig(**TINY))
    lin = rope_inv_freq(LlamaConfig(**TINY, rope_type="linear", rope_factor=4.0))
    np.testing.assert_allclose(lin, base / 4, rtol=1e-7)


# ---- model ---------------------------------------------------------------------------


def test_param_paths():
    _, params = _tiny(qkv_bias=True)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert "embed_tokens/embedding" in paths and "norm/scale" in paths
    assert "layers/1/self_attn/q_proj/bias" in paths
    assert "layers/1/self_attn/o_proj/bias" not in paths
    assert "layers/0/mlp/down_proj/kernel" in paths and "lm_head/kernel" in paths
    assert "layers/0/post_attention_layernorm/scale" in paths
    shapes = {"/".join(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(params)}
    assert shapes["layers/0/self_attn/k_proj/kernel"] == (64, 32)  # (K, N): 2 kv heads x 16
    assert shapes["lm_head/kernel"] == (64, 101)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_with_cache_equals_full_prefill(tied):
    model, params = _tiny(qkv_bias=True, tie_word_embeddings=tied)
    tokens = _tokens((2, 12))
    full, none = forward(model, params, tokens)
    assert none is None and full.shape == (2, 12, 101) and full.dtype == jnp.float32
    cache = init_cache(model.config, 2, 16)
    first, cache = forward(model, params, tokens[:, :5], cache=cache)
    steps = [first]
    for i in range(5, 12):
        logits, cache = forward(model, params, tokens[:, i : i + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5)
    assert int(cache.index) == 12 and bool(cache.valid[:, :12].all())


def test_left_padded_batch_equals_single_runs():
    model, params = _tiny()
    a, b = _tokens((1, 9), seed=2)[0], _tokens((1, 4), seed=3)[0]
    pad = 5
    tokens = jnp.stack([a, jnp.concatenate([jnp.full((pad,), 7, jnp.int32), b])])
    mask = jnp.arange(9)[None, :] >= jnp.array([[0], [pad]])
    cache = init_cache(model.config, 2, 12)
    batched, cache = forward(model, params, tokens, cache=cache, mask=mask)
    step, _ = forward(model, params, jnp.array([[3], [4]]), cache=cache)
    for row, seq, next_token in ((0, a, 3), (1, b, 4)):
        alone, _ = forward(model, params, jnp.concatenate([seq, jnp.array([next_token])])[None])
        n = len(seq)
        np.testing.assert_allclose(batched[row, 9 - n :], alone[0, :n], atol=2e-5)
        np.testing.assert_allclose(step[row, 0], alone[0, n], atol=2e-5)


def test_left_padded_without_cache_matches_too():
    model, params = _tiny()
    seq = _tokens((1, 6), seed=4)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), seq], axis=1)
    mask = jnp.arange(9)[None] >= 3
    got, _ = forward(model, params, padded, mask=mask)
    want, _ = forward(model, params, seq)
    np.testing.assert_allclose(got[:, 3:], want, atol=2e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding rows attend to nothing, yet no NaN


def test_explicit_positions_shift_rope():
    model, params = _tiny()
    tokens = _tokens((1, 5))
    base, _ = forward(model, params, tokens)
    same, _ = forward(model, params, tokens, positions=jnp.arange(5)[None])
    shifted, _ = forward(model, params, tokens, positions=jnp.arange(5)[None] + 3)
    np.testing.assert_allclose(same, base, atol=1e-6)
    # RoPE is relative: logits depend on position differences only (up to float error).
    np.testing.assert_allclose(shifted, base, atol=1e-4)


def test_bfloat16_compute_is_close():
    model, params = _tiny()
    bf16 = jquant.models.Llama(model.config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    tokens = _tokens((1, 8))
    want, _ = forward(model, params, tokens)
    got, _ = forward(bf16, params, tokens)
    assert got.dtype == jnp.float32
    # Measured: max |Δ| = 3.1e-3 (logit std 0.16). Above 3e-4 proves bf16 really ran.
    delta = np.abs(np.asarray(got - want)).max()
    assert 3e-4 < delta < 1e-2


def test_quantized_params_run_the_same_code():
    model, params = _tiny(tie_word_embeddings=True)

    def quantize(path, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if name.endswith("kernel/value"):
            return jquant.quantize_array(x, "int8", axis=0)
        if name.endswith("embedding/value"):
            return jquant.quantize_array(x, "int8", axis=1)
        return x

    qparams = jax.tree_util.tree_map_with_path(quantize, params)
    leaves = jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, jquant.QArray))
    assert sum(isinstance(x, jquant.QArray) for x in leaves) == 2 * 7 + 1
    tokens = _tokens((2, 7))
    want, _ = forward(model, params, tokens)
    got, _ = forward(model, qparams, tokens)
    assert np.abs(np.asarray(got - want)).max() < 0.05 * np.abs(np.asarray(want)).max()


# ---- conversion ----------------------------------------------------------------------


def _hf_tensors(params):
    return {hf_name(p): np.asarray(v.get_value()).T if p[-1] == "kernel"
            else np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}  # fmt: skip


def test_convert_round_trip():
    model, params = _tiny(qkv_bias=True)
    tensors = _hf_tensors(params)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (128, 64)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)
    _, converted = params_from_hf(tensors, model.config)
    tokens = _tokens((1, 6))
    np.testing.assert_array_equal(forward(model, converted, tokens)[0],
                                  forward(model, params, tokens)[0])  # fmt: skip


def test_convert_head_tied_and_untied():
    """One set of tensors whose lm_head.weight is the negated embedding: the untied model
    must use lm_head (logits = -tied logits), the tied one must ignore it as a duplicate."""
    model, params = _tiny(tie_word_embeddings=False)
    tensors = _hf_tensors(params)
    tensors["lm_head.weight"] = -tensors["model.embed_tokens.weight"]
    tied_config = dataclasses.replace(model.config, tie_word_embeddings=True)
    tied_model, tied = params_from_hf(tensors, tied_config)
    untied_model, untied = params_from_hf(tensors, model.config)
    assert "lm_head" not in tied and "lm_head" in untied
    tokens = _tokens((1, 6))
    want, _ = forward(tied_model, tied, tokens)
    got, _ = forward(untied_model, untied, tokens)
    assert np.abs(np.asarray(want)).max() > 0.1  # the sign is visible
    np.testing.assert_allclose(got, -want, atol=1e-6)


def test_convert_errors_name_the_tensor():
    model, params = _tiny()
    tensors = _hf_tensors(params)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.gate_proj"):
        params_from_hf(missing, model.config)
    wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 32), np.float32)}
    expect = r"k_proj\.weight' has shape \(64, 32\), expected \(32, 64\)"
    with pytest.raises(ValueError, match=expect):
        params_from_hf(wrong, model.config)
    extra = {**tensors, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match="o_proj.bias"):
        params_from_hf(extra, model.config)


def test_load_from_a_checkpoint_object():
    from jquant.io import Checkpoint

    model, params = _tiny()
    hf_config = dict(HF_LLAMA, vocab_size=101, tie_word_embeddings=False)
    ckpt = Checkpoint(config=hf_config, tensors=_hf_tensors(params), tokenizer=None, source="t")
    loaded, loaded_params, tokenizer, config = jquant.models.load(ckpt, with_config=True)
    assert tokenizer is None and config == hf_config
    assert loaded.config.rope_theta == 500000.0 and loaded.dtype == jnp.float32
    leaves = jax.tree.leaves(loaded_params)
    assert len(leaves) == len(jax.tree.leaves(params))
    assert all(x.dtype == jnp.float32 for x in leaves)
