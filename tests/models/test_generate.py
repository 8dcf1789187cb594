"""Generation: the jitted prefill + while_loop decode against a naive argmax loop."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import LlamaConfig, Sampler, chat_prompt, forward, generate, init_model
from jquant.models.sampling import sample

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64, eos_token_ids=(3,))  # fmt: skip
PROMPT = [5, 17, 23, 9, 44, 61, 2]


@pytest.fixture(scope="module")
def tiny():
    model = init_model(LlamaConfig(**TINY), seed=0)
    return model, nnx.state(model)


def _naive_greedy(model, params, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        logits, _ = forward(model, params, jnp.asarray([seq]))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) :]


def test_greedy_matches_naive_argmax_loop(tiny):
    out = generate(*tiny, [PROMPT], max_new_tokens=10, stop_tokens=())
    assert out.tokens.shape == (1, 10) and out.tokens.dtype == np.int32
    assert out.tokens[0].tolist() == _naive_greedy(*tiny, PROMPT, 10)
    assert out.lengths.tolist() == [10] and out.decode_steps == 9
    assert out.prefill_seconds > 0 and out.decode_tokens_per_second > 0


def test_top_k_1_equals_greedy(tiny):
    greedy = generate(*tiny, PROMPT, max_new_tokens=10, stop_tokens=())
    top1 = generate(*tiny, PROMPT, max_new_tokens=10, stop_tokens=(), temperature=0.7, top_k=1)
    tiny_p = generate(*tiny, PROMPT, max_new_tokens=10, stop_tokens=(), temperature=1.0,
                      top_p=1e-6)  # fmt: skip
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(tiny_p.tokens, greedy.tokens)


def test_sampling_is_seeded(tiny):
    kw = dict(max_new_tokens=12, stop_tokens=(), temperature=1.5, top_k=20, top_p=0.95)
    a = generate(*tiny, PROMPT, seed=1, **kw).tokens
    b = generate(*tiny, PROMPT, seed=1, **kw).tokens
    c = generate(*tiny, PROMPT, seed=2, **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    draw = lambda s: np.asarray(sample(jnp.repeat(logits, 200, 0), s.rows(np.arange(200))))  # noqa: E731
    assert set(draw(Sampler(1.0, top_k=2))) == {0, 1}
    assert set(draw(Sampler(1.0, top_p=0.7))) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(Sampler(1.0, top_p=0.85))) == {0, 1, 2}
    with pytest.raises(ValueError, match="top_p=1.5"):
        Sampler(1.0, top_p=1.5)


def test_batch_with_left_padding_equals_single_prompts(tiny):
    prompts = [PROMPT, [8, 30], [12, 1, 19, 77]]
    batched = generate(*tiny, prompts, max_new_tokens=8, stop_tokens=())
    for row, prompt in enumerate(prompts):
        alone = generate(*tiny, [prompt], max_new_tokens=8, stop_tokens=())
        assert batched.tokens[row].tolist() == alone.tokens[0].tolist()
    assert batched.prompt_lengths.tolist() == [7, 2, 4]


def test_stop_token_ends_a_row(tiny):
    greedy = generate(*tiny, PROMPT, max_new_tokens=10, stop_tokens=()).tokens[0].tolist()
    stop = greedy[3]
    first = greedy.index(stop)
    out = generate(*tiny, [PROMPT, PROMPT], max_new_tokens=10, stop_tokens=(stop,), pad_id=-1)
    assert out.lengths.tolist() == [first + 1] * 2
    assert out.sequences()[0] == greedy[: first + 1]
    assert (out.tokens[:, first + 1 :] == -1).all()
    assert out.decode_steps == first  # the loop ends once every row has stopped


def test_default_stop_tokens_come_from_config(tiny):
    model, params = tiny
    out = generate(model, params, PROMPT, max_new_tokens=30)
    seq = out.sequences()[0]
    assert 3 not in seq[:-1]
    assert len(seq) == 30 or seq[-1] == 3


def test_prompt_longer_than_context_is_an_error(tiny):
    with pytest.raises(ValueError, match="prompt has 70 tokens.*max_position_embeddings is 64"):
        generate(*tiny, [1] * 70, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"60 tokens and max_new_tokens=8: 68 > max_pos"):
        generate(*tiny, [1] * 60, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_len is 16"):
        generate(*tiny, [1] * 20, max_new_tokens=4, max_len=16)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(*tiny, [[1, 2], []], max_new_tokens=4)


def test_prompt_near_context_still_runs(tiny):
    out = generate(*tiny, [PROMPT * 8], max_new_tokens=8, stop_tokens=())  # 56 + 8 == 64
    assert out.tokens.shape == (1, 8)


def test_chat_prompt_uses_the_tokenizer_template():
    class FakeTokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "|".join(f"{m['role']}:{m['content']}" for m in messages)

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return [ord(c) for c in text]

    ids = chat_prompt(FakeTokenizer(), "hi", system="be brief")
    assert "".join(map(chr, ids)) == "system:be brief|user:hi"


def _word_tokenizer(add_bos: bool):
    """A word-level `jquant.io.Tokenizer` whose backend adds BOS as its configuration says,
    and whose chat template writes ``{{ bos_token }}`` itself (as Gemma's and Llama's do)."""
    import tokenizers
    from tokenizers import pre_tokenizers, processors

    from jquant.io import Tokenizer

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "hello": 3, "world": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<bos>", "<eos>"])
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 1)])  # fmt: skip
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return Tokenizer(backend, bos_token_id=1, eos_token_id=2, chat_template=template,
                     add_bos_token=add_bos)  # fmt: skip


@pytest.mark.parametrize("add_bos", [True, False])
def test_prompts_start_with_one_bos_iff_the_tokenizer_says(add_bos):
    from jquant.io import encode_prompt

    tok = _word_tokenizer(add_bos)
    # Raw text: BOS exactly when add_bos_token, and never twice.
    assert encode_prompt(tok, "hello world") == ([1, 3, 4] if add_bos else [3, 4])
    assert encode_prompt(tok, "<bos> hello") == [1, 3]
    # A chat: the template's own BOS, nothing added to it.
    assert chat_prompt(tok, "hello world") == [1, 3, 4]


def test_chat_prompt_without_or_with_a_failing_template_is_a_value_error():
    from jquant.io.tokenizer import NoChatTemplateError
    from jquant.io.tokenizer import chat_prompt as render

    tok = _word_tokenizer(True)
    messages = [{"role": "user", "content": "hello"}]
    assert render(tok, messages) == chat_prompt(tok, "hello") == [1, 3]
    tok.chat_template = None
    with pytest.raises(NoChatTemplateError, match="no chat template"):
        chat_prompt(tok, "hello")
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ValueError, match="the chat template failed: roles must alternate"):
        render(tok, messages)
    tok.chat_template = "{% for %}"  # not even a template
    with pytest.raises(ValueError, match="the chat template failed"):
        render(tok, messages)


def test_top_k_beyond_int32_keeps_every_token(tiny):
    """A top_k past the vocabulary (even past int32) means no top-k filter, not an overflow."""
    kw = dict(max_new_tokens=6, stop_tokens=(), temperature=1.0, seed=3)
    huge = generate(*tiny, PROMPT, top_k=2**40, **kw)
    off = generate(*tiny, PROMPT, **kw)
    np.testing.assert_array_equal(huge.tokens, off.tokens)
