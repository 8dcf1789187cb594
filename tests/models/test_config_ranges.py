"""`LlamaConfig` refuses values no real checkpoint of the families has, naming the field and
the range (``rope_theta: 1`` or ``rms_norm_eps: 10`` used to evaluate to garbage silently)."""

from __future__ import annotations

import math

import pytest

from jquant.models import LlamaConfig

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2)  # fmt: skip


@pytest.mark.parametrize("field, value, message", [
    ("rope_theta", 1.0, r"rope_theta=1\.0 is out of range: .*>= 100"),
    ("rope_theta", math.nan, r"rope_theta=nan is out of range"),
    ("rms_norm_eps", 10.0, r"rms_norm_eps=10\.0 is out of range: .*> 0, at most 0\.001"),
    ("rms_norm_eps", 0.0, r"rms_norm_eps=0\.0 is out of range"),
    ("rope_local_theta", 0.5, r"rope_local_theta=0\.5 is out of range"),
    ("query_pre_attn_scalar", -1.0, r"query_pre_attn_scalar=-1\.0 is out of range: .*> 0"),
    ("attn_logit_softcap", 0.0, r"attn_logit_softcap=0\.0 is out of range"),
    ("final_logit_softcap", math.inf, r"final_logit_softcap=inf is out of range"),
    ("embed_scale", 0.0, r"embed_scale=0\.0 is out of range"),
    ("sliding_window", 0, r"sliding_window=0 must be an int >= 1"),
    ("head_dim", -16, r"head_dim=-16 must be a positive int"),
    ("num_kv_heads", 3, r"num_heads=4 must be a multiple of num_kv_heads=3"),
    ("hidden_size", 66, r"hidden_size=66 is not divisible by num_heads=4"),
    ("vocab_size", 0, r"vocab_size=0 must be a positive int"),
    ("bos_token_id", 128, r"bos_token_id 128 is out of range: .*\[0, vocab_size=128\)"),
    ("eos_token_ids", (5, -1), r"eos_token_ids -1 is out of range"),
])  # fmt: skip
def test_out_of_range_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**BASE, field: value})


def test_rope_scaling_ranges():
    with pytest.raises(ValueError, match=r"rope_factor=0\.5 is out of range: .*>= 1"):
        LlamaConfig(**BASE, rope_type="linear", rope_factor=0.5)
    with pytest.raises(ValueError, match=r"rope_high_freq_factor=1\.0 is out of range"):
        LlamaConfig(**BASE, rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=1.0)  # fmt: skip


def test_from_hf_names_the_field():
    hf = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    with pytest.raises(ValueError, match="rope_theta=1.0 is out of range"):
        LlamaConfig.from_hf({**hf, "rope_theta": 1})
    with pytest.raises(ValueError, match="rms_norm_eps=10.0 is out of range"):
        LlamaConfig.from_hf({**hf, "rms_norm_eps": 10})


@pytest.mark.parametrize("values", [
    dict(rope_theta=10_000.0, rms_norm_eps=1e-5),  # Llama 2, SmolLM2
    dict(rope_theta=500_000.0, rms_norm_eps=1e-5, rope_type="llama3", rope_factor=8.0,
         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0),  # Llama 3.1
    dict(rope_theta=1e6, rms_norm_eps=1e-6, sliding_window=4096),  # Qwen2, Mistral
    dict(rope_theta=1e6, rope_local_theta=10_000.0, rms_norm_eps=1e-6,
         query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0),  # Gemma
])  # fmt: skip
def test_real_model_values_build(values):
    """Values real checkpoints use are accepted (a range too tight raises here) and kept."""
    config = LlamaConfig(**BASE, **values)
    for field, value in values.items():
        assert getattr(config, field) == value, field
