"""The continuous-batching engine on a tiny model: every request equals its own `generate`."""

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.eval import perplexity
from jquant.models import LlamaConfig, generate, init_model
from jquant.serve.engine import Engine, SamplingParams
from jquant.serve.runner import Runner, cache_perplexity

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                  eos_token_ids=(3,))  # fmt: skip


class Letters:
    """A tokenizer stand-in: token i is one character, so text positions are token counts."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CFG, seed=0)
    # Larger weights than the 0.02 init, so greedy continuations vary from token to token.
    params = jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))
    return model, params


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    # Lengths from 1 to 70: several prompts span more than one 16-token prefill chunk.
    return [rng.integers(4, 96, size=int(rng.integers(1, 71))).tolist() for _ in range(n)]


def _reference(tiny, prompt, n):
    return generate(*tiny, [prompt], max_new_tokens=n, stop_tokens=()).sequences()[0]


@pytest.fixture(scope="module")
def engine(tiny):
    with Engine(*tiny, Letters(), max_slots=4, max_context=128, prefill_chunk=16) as eng:
        yield eng


def test_concurrent_requests_equal_their_single_greedy_runs(tiny, engine):
    prompts = _prompts(10)
    refs = [_reference(tiny, p, 12) for p in prompts]
    assert len({tuple(r) for r in refs}) == len(refs)  # the check can see cross-talk
    outs = [None] * len(prompts)

    def run(i):
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        outs[i] = engine.generate(prompts[i], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out, ref, prompt in zip(outs, refs, prompts):
        assert out.token_ids == ref and out.finish_reason == "length"
        assert out.text == Letters().decode(ref)
        assert (out.prompt_tokens, out.completion_tokens) == (len(prompt), 12)
    m = engine.metrics()
    assert m["active_slots"] == 0 and m["queue_depth"] == 0 and m["kv_cache_used_tokens"] == 0


def test_stop_token_and_stop_string(tiny, engine):
    prompt = _prompts(1, seed=5)[0]
    ref = _reference(tiny, prompt, 12)
    stop_tok = ref[4]
    first = ref.index(stop_tok)
    out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                 stop_token_ids=(stop_tok,)))  # fmt: skip
    assert out.finish_reason == "stop" and out.token_ids == ref[:first]
    text = Letters().decode(ref)
    stop = text[6:8]
    out = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop,),
                                                 ignore_eos=True))  # fmt: skip
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]


def test_streamed_pieces_add_up_and_end_once(engine):
    events = []
    done = threading.Event()

    def on(out):
        events.append(out)
        if out.finish_reason:
            done.set()

    engine.submit([5, 6, 7], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True), on)
    assert done.wait(60)
    assert [e.finish_reason for e in events].count("length") == 1 and events[-1].finish_reason
    assert sum(len(e.token_ids) for e in events) == 9
    assert "".join(e.text for e in events) == Letters().decode(
        [t for e in events for t in e.token_ids])


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(engine):
    params = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7,
                            ignore_eos=True)  # fmt: skip
    alone = engine.generate([9, 8, 7, 6], params).token_ids
    outs = {}

    def run(i, p):
        outs[i] = engine.generate([9, 8, 7, 6] if i == 0 else [4, 5, 6], p).token_ids

    other = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    threads = [threading.Thread(target=run, args=a) for a in ((0, params), (1, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs[0] == alone
    assert engine.generate([9, 8, 7, 6], params.__class__(**{**params.__dict__, "seed": 8})
                           ).token_ids != alone  # fmt: skip


def test_cancel_frees_the_slot(engine):
    events = []
    done = threading.Event()

    def on(out):
        events.append(out)
        if len(events) == 2:
            engine.cancel(out.request_id)
        if out.finish_reason:
            done.set()

    engine.submit([5, 6], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), on)
    assert done.wait(60)
    assert events[-1].finish_reason == "abort" and events[-1].completion_tokens < 100
    assert engine.metrics()["active_slots"] == 0


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(), "empty"),
        (list(range(4, 100)) + [5] * 40, SamplingParams(), "context is 128"),
        ([5] * 100, SamplingParams(max_tokens=40), "ask for at most 28"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=-1), "temperature"),
        ([5], SamplingParams(top_p=0), "top_p"),
        ([500], SamplingParams(), "outside"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, params, lambda out: None)
    out = engine.generate([5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert out.completion_tokens == 3


def test_float_cache_perplexity_equals_the_cacheless_perplexity(tiny):
    text = np.random.default_rng(3).integers(0, 96, 700).tolist()
    ref = perplexity(*tiny, text, seq_len=64, progress=False)
    got = cache_perplexity(*tiny, text, seq_len=64, batch_size=3)
    assert got.tokens == ref.tokens
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    int8 = cache_perplexity(*tiny, text, seq_len=64, kv_cache="int8")
    assert int8.perplexity != got.perplexity  # the cache is really quantized
    assert int8.nll == pytest.approx(ref.nll, rel=0.01)


def test_cache_perplexity_adds_bos_as_perplexity_does(tiny):
    class AddsBos:
        add_bos_token, bos_token_id = True, 1

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return [4 + ord(c) % 90 for c in text]

    text = "".join(chr(0x41 + i % 26) for i in range(700))
    ids = AddsBos().encode(text, add_special_tokens=False)
    ref = perplexity(*tiny, ids, seq_len=64, bos_token_id=1, progress=False)
    assert (ref.windows, ref.tokens) == (700 // 63, 11 * 63)
    got = cache_perplexity(*tiny, text, tokenizer=AddsBos(), seq_len=64, batch_size=3)
    assert (got.windows, got.tokens, got.bos_token_id) == (ref.windows, ref.tokens, 1)
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    by_ids = cache_perplexity(*tiny, ids, seq_len=64, bos_token_id=1)
    assert by_ids.perplexity == pytest.approx(ref.perplexity, rel=1e-5)


def test_mixed_layer_structures_run_unrolled(tiny):
    from jquant.qarray import quantize_array

    model, params = tiny
    params = jax.tree.map(lambda x: x, params)
    kernel = params["layers"][1]["mlp"]["up_proj"]["kernel"]
    kernel.set_value(quantize_array(kernel.get_value(), "int8"))
    runner = Runner(model, params, slots=2, max_len=64, prefill_chunk=16)
    assert not runner.stacked
    prompt = _prompts(1, seed=9)[0][:20]
    ref = generate(model, params, [prompt], max_new_tokens=1, stop_tokens=()).sequences()[0]
    sampling = __import__("jquant.serve.runner", fromlist=["Sampling"]).Sampling.greedy(1)
    runner.prefill(1, prompt[:16], 0, sampling)
    assert runner.prefill(1, prompt[16:], 16, sampling) == ref[0]
