"""Perplexity: the project's definition, checked on hand-made cases."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.eval import cut_windows, perplexity
from jquant.eval.perplexity import _head_nll, _window_nll
from jquant.models import Llama, LlamaConfig, blocks, forward, init_model
from jquant.recipe import Recipe
from jquant.transform import quantize

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


def test_cut_windows_with_bos():
    np.testing.assert_array_equal(cut_windows(range(11), 4, bos_token_id=49),
                                  [[49, 0, 1, 2], [49, 3, 4, 5], [49, 6, 7, 8]])  # fmt: skip
    np.testing.assert_array_equal(cut_windows(range(11), 4, max_tokens=7, bos_token_id=49),
                                  [[49, 0, 1, 2], [49, 3, 4, 5]])  # fmt: skip
    assert cut_windows(range(3), 2, bos_token_id=9).tolist() == [[9, 0], [9, 1], [9, 2]]
    with pytest.raises(ValueError, match=r"2 tokens make no window of seq_len=4 \(BOS \+ 3"):
        cut_windows(range(2), 4, bos_token_id=0)


BOS = 7


class _CharTokenizer:
    """One token per character; says whether to add BOS as a model's tokenizer does."""

    bos_token_id = BOS

    def __init__(self, add_bos_token):
        self.add_bos_token = add_bos_token

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) % 50 for c in text]


def test_bos_windows_match_numpy_definition(tiny):
    model, params = tiny
    text = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs"
    ids = np.asarray([ord(c) % 50 for c in text], np.int32)
    seq_len, max_tokens = 6, 64  # 12 windows of BOS + 5 text tokens from the first 64 tokens
    total, count = 0.0, 0
    for chunk in ids[:60].reshape(12, seq_len - 1):
        w = np.concatenate([[BOS], chunk])
        logits = np.asarray(forward(model, params, jnp.asarray(w[None]))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= sum(logp[i - 1, w[i]] for i in range(1, seq_len))  # every text token
        count += seq_len - 1
    kw = dict(seq_len=seq_len, max_tokens=max_tokens, batch_size=5, progress=False)
    by_ids = perplexity(model, params, ids, bos_token_id=BOS, **kw)
    assert (by_ids.windows, by_ids.tokens, by_ids.bos_token_id) == (12, count, BOS)
    assert by_ids.nll == pytest.approx(total / count, rel=1e-5)
    # A text whose tokenizer says add_bos_token gets the same windows.
    by_text = perplexity(model, params, text, tokenizer=_CharTokenizer(True), **kw)
    assert by_text == by_ids


def test_without_bos_the_windows_are_unchanged(tiny):
    model, params = tiny
    text = "the quick brown fox jumps over the lazy dog"
    kw = dict(seq_len=8, progress=False)
    plain = perplexity(model, params, [ord(c) % 50 for c in text], **kw)
    assert (plain.windows, plain.tokens, plain.bos_token_id) == (5, 35, None)
    assert perplexity(model, params, text, tokenizer=_CharTokenizer(False), **kw) == plain
    with_bos = perplexity(model, params, text, tokenizer=_CharTokenizer(True), **kw)
    assert (with_bos.windows, with_bos.tokens) == (6, 42) and with_bos.nll != plain.nll


# Two layers, so that running layer 0's weights twice (or skipping a layer) changes the result.
DEEP = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                   num_heads=2, num_kv_heads=1, max_position_embeddings=64)  # fmt: skip
INT8 = Recipe.from_dict({"name": "t", "rules": [{"pattern": "_proj/kernel$", "weight": "int8"}]})


def _ids(n, seed=1):
    return np.asarray(jax.random.randint(jax.random.key(seed), (n,), 0, 50), np.int32)


def _whole_model_nll(model, params, ids, seq_len):
    """The definition on `forward`'s logits (the unrolled model, one program)."""
    windows = cut_windows(ids, seq_len)
    logits = np.asarray(forward(model, params, jnp.asarray(windows))[0], np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, windows[:, 1:, None], axis=-1)
    return -picked.mean()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("recipe", [None, INT8], ids=["float", "int8"])
def test_stage_by_stage_equals_the_whole_model(tied, recipe):
    model = init_model(dataclasses.replace(DEEP, tie_word_embeddings=tied), seed=1)
    params = nnx.state(model)
    params = params if recipe is None else quantize(params, recipe)
    ids = _ids(48)
    expected = _whole_model_nll(model, params, ids, seq_len=8)
    for m in (model, nnx.graphdef(model)):  # a module or its GraphDef
        got = perplexity(m, params, ids, seq_len=8, batch_size=4, progress=False)
        assert got.nll == pytest.approx(expected, rel=1e-5)


def test_layers_of_one_structure_compile_once():
    # seq_len 9 appears in no other test, so every program here is new to the jit caches.
    programs = (blocks.run_layer, _head_nll, _window_nll)
    config = dataclasses.replace(DEEP, num_layers=3)
    model, other = init_model(config, seed=0), init_model(config, seed=1)
    ids = _ids(36)

    def compiled(m, params):
        before = [f._cache_size() for f in programs]
        perplexity(m, params, ids, seq_len=9, progress=False)
        return [f._cache_size() - b for f, b in zip(programs, before, strict=True)]

    # Three float layers: one layer program, one head, no whole-model program.
    assert compiled(model, nnx.state(model)) == [1, 1, 0]
    # Another model of the same shapes, and then an int8 recipe: only the new layer format.
    assert compiled(other, nnx.state(other)) == [0, 0, 0]
    assert compiled(model, quantize(nnx.state(model), INT8)) == [1, 0, 0]


def test_other_models_run_their_own_call():
    class Uniform(Llama):
        """Changes ``__call__`` (zero logits): the stages of `blocks` would not compute it."""

        def __call__(self, tokens, *args, **kwargs):
            logits, cache = super().__call__(tokens, *args, **kwargs)
            return jnp.zeros_like(logits), cache

    model = Uniform(DEEP, rngs=nnx.Rngs(0))
    result = perplexity(model, nnx.state(model), _ids(24), seq_len=8, progress=False)
    assert result.perplexity == pytest.approx(DEEP.vocab_size, rel=1e-5)


def test_progress_shows_a_bar(tiny, capsys):
    model, params = tiny
    perplexity(model, params, list(range(40)), seq_len=8, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "perplexity" in err and "3/3" in err
    perplexity(model, params, list(range(40)), seq_len=8, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_non_finite_logits_are_an_error_not_a_perplexity(tiny):
    model, params = tiny
    nan_norm = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, jnp.nan) if "embed" in str(p[0]) else x, params)  # fmt: skip
    with pytest.raises(ValueError, match="perplexity is nan: .*non-finite logits; check the "
                                         "checkpoint"):  # fmt: skip
        perplexity(model, nan_norm, list(range(40)), seq_len=8, progress=False)


@pytest.mark.parametrize("nll, message", [
    (math.nan, "perplexity is nan"),
    (math.inf, "perplexity is inf"),
    (1e6, "too large to exponentiate"),
])  # fmt: skip
def test_every_result_refuses_a_non_finite_value(nll, message):
    # What the serving runner's cache_perplexity builds, too: the check is in the result.
    from jquant.eval.perplexity import PerplexityResult, _exp

    with pytest.raises(ValueError, match=message):
        PerplexityResult(perplexity=_exp(nll), nll=nll, tokens=7, windows=1, seq_len=8)
    assert PerplexityResult(perplexity=math.exp(2.0), nll=2.0, tokens=7, windows=1,
                            seq_len=8).nll == 2.0  # fmt: skip
