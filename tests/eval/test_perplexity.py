"""Perplexity: the project's definition, checked on hand-made cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.eval import cut_windows, perplexity
from jquant.models import LlamaConfig, forward, init_model

CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1,
                     num_heads=2, num_kv_heads=1, max_position_embeddings=64)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CONFIG, seed=0)
    return model, nnx.state(model)


def test_cut_windows_non_overlapping_tail_dropped():
    np.testing.assert_array_equal(cut_windows(range(11), 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    np.testing.assert_array_equal(cut_windows(range(11), 4, max_tokens=7), [[0, 1, 2, 3]])
    assert cut_windows(np.arange(12), 4).shape == (3, 4)
    with pytest.raises(ValueError, match="3 tokens make no window of seq_len=4"):
        cut_windows(range(3), 4)
    with pytest.raises(ValueError, match="seq_len=1"):
        cut_windows(range(3), 1)


def test_uniform_logits_give_vocab_size(tiny):
    model, params = tiny
    zero_norm = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "norm" in str(p[0]) else x, params)  # fmt: skip
    result = perplexity(model, zero_norm, list(range(40)), seq_len=8, progress=False)
    assert result.perplexity == pytest.approx(CONFIG.vocab_size, rel=1e-5)
    assert (result.windows, result.tokens, result.seq_len) == (5, 35, 8)


def test_matches_numpy_definition(tiny):
    model, params = tiny
    ids = np.asarray(jax.random.randint(jax.random.key(0), (70,), 0, 50), np.int32)
    seq_len, max_tokens = 6, 64  # 10 windows of 6 from the first 64 tokens; 4 left over
    total, count = 0.0, 0
    for w in ids[:60].reshape(10, seq_len):
        logits = np.asarray(forward(model, params, jnp.asarray(w[None]))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= sum(logp[i - 1, w[i]] for i in range(1, seq_len))
        count += seq_len - 1
    # batch_size 3 leaves a short last batch, which is padded and must not count.
    got = perplexity(model, params, ids, seq_len=seq_len, max_tokens=max_tokens, batch_size=3,
                     progress=False)  # fmt: skip
    assert (got.windows, got.tokens) == (10, count)
    assert got.nll == pytest.approx(total / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def test_text_is_tokenized_without_special_tokens(tiny):
    class Tokenizer:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return [ord(c) % 50 for c in text]

    model, params = tiny
    text = "the quick brown fox jumps over the lazy dog"
    by_text = perplexity(model, params, text, tokenizer=Tokenizer(), seq_len=8, progress=False)
    by_ids = perplexity(model, params, [ord(c) % 50 for c in text], seq_len=8, progress=False)
    assert by_text == by_ids
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(model, params, text, seq_len=8)
