"""`jquant.arch.param_shapes` (what `jquant.io.packed` checks checkpoints against without
importing the model) agrees with the model itself, for every family and option."""

from __future__ import annotations

import pytest
from flax import nnx

from jquant.arch import FAMILIES, LlamaConfig, param_shapes
from jquant.models import abstract_model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
@pytest.mark.parametrize("tied, bias", [(False, True), (True, False)])
def test_param_shapes_match_the_model(model_type, tied, bias):
    config = LlamaConfig.from_hf(dict(
        model_type=model_type, vocab_size=96, hidden_size=64, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        tie_word_embeddings=tied, attention_bias=bias,
        # MoE families only (dense ones ignore them): qwen*_moe's layer 0 dense, layer 1 MoE;
        # qwen2_moe's shared expert.
        num_local_experts=3, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=40,
        decoder_sparse_step=2, shared_expert_intermediate_size=24))  # fmt: skip
    _, state = nnx.split(abstract_model(config))
    model = {"/".join(map(str, k)): tuple(v.get_value().shape) for k, v in
             nnx.to_flat_state(state)}  # fmt: skip
    assert param_shapes(config) == model
