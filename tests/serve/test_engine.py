"""The continuous-batching engine on a tiny model: every request equals its own `generate`."""

import threading

import jax
import jax.numpy as jnp
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


def test_sampled_tokens_equal_generate_with_the_same_seed(tiny, engine):
    """One sampler: the engine's seeded sample is `generate`'s (row 0 draws with its seed)."""
    prompt = [9, 8, 7, 6, 5]
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    out = engine.generate(prompt, SamplingParams(max_tokens=10, seed=7, ignore_eos=True, **kw))
    ref = generate(*tiny, [prompt], max_new_tokens=10, stop_tokens=(), seed=7, **kw)
    greedy = _reference(tiny, prompt, 10)
    assert out.token_ids == ref.sequences()[0] != greedy


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
        ([5] * 130, SamplingParams(), "maximum context length is 128"),
        ([5] * 100, SamplingParams(max_tokens=40), "ask for at most 28"),
        ([5], SamplingParams(max_tokens=0), "max_tokens"),
        ([5], SamplingParams(temperature=-1), "temperature"),
        ([5], SamplingParams(top_p=1.5), "top_p"),
        ([500], SamplingParams(), r"token ids must be integers in \[0, 96\)"),
        # Every numeric field is bounded above too (`jquant.serve.limits`).
        ([5], SamplingParams(top_k=2**31), "top_k"),  # once overflowed int32 in the loop
        ([5], SamplingParams(top_k=97), r"top_k.*between -1 and 96"),  # > the vocabulary
        ([5], SamplingParams(top_k=-2), "top_k"),
        ([5], SamplingParams(temperature=2.5), "temperature"),
        ([5], SamplingParams(temperature=float("nan")), "temperature"),
        ([5], SamplingParams(top_p=float("inf")), "top_p"),
        ([5], SamplingParams(max_tokens=2**31), "max_tokens"),
        ([5], SamplingParams(seed=2**32), "seed"),
        ([5], SamplingParams(seed=-1), "seed"),
        ([5], SamplingParams(stop=("a",) * 5), "stop"),
        ([5], SamplingParams(stop=("a" * 257,)), "stop"),
        ([5], SamplingParams(stop_token_ids=(96,)), "stop_token_ids"),
        ([5, True], SamplingParams(), "token ids"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(engine, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, params, lambda out: None)
    out = engine.generate([5, 6], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert out.completion_tokens == 3


def test_request_limits_are_the_same_for_every_caller():
    """The limits are `jquant.serve.limits`' alone: the error is a ValueError naming the
    field, and in-range extremes pass."""
    from jquant.serve import limits

    with pytest.raises(limits.LimitError) as e:
        limits.check_request([5], SamplingParams(top_k=2**31), vocab_size=96, max_context=128)
    assert isinstance(e.value, ValueError) and e.value.param == "top_k"
    limits.check_request([95] * 3, SamplingParams(
        max_tokens=125, temperature=2.0, top_p=0.0, top_k=96, seed=2**32 - 1,
        stop=("s" * 256,) * 4, stop_token_ids=(95,)), vocab_size=96, max_context=128)  # fmt: skip


@pytest.mark.parametrize("where", ["prefill", "sampling"])
def test_a_request_failing_in_the_engine_fails_alone(engine, monkeypatch, where):
    """An exception in the loop fails only the request it was for: its stream ends with
    finish_reason "error", a request decoding beside it and the next one are served."""
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    want = engine.generate([5, 6], greedy).token_ids
    failures = engine.metrics()["failed_requests_total"]
    if where == "sampling":  # the bug once: top_k past int32 stopped the engine for good
        monkeypatch.setattr(engine, "check", lambda prompt, params: None)
        bad = SamplingParams(max_tokens=4, top_k=2**31, ignore_eos=True)
    else:
        bad = greedy
        prefill = engine.runner.prefill

        def failing_prefill(tables, chunks, starts, sampling, *rest, **kw):
            if any(list(c[:3]) == [77, 77, 77] for c in chunks):
                raise RuntimeError("planted prefill failure")
            return prefill(tables, chunks, starts, sampling, *rest, **kw)

        monkeypatch.setattr(engine.runner, "prefill", failing_prefill)
    beside, done = [], threading.Event()  # a long request decoding beside the failing ones

    def on_beside(out):
        beside.append(out)
        if out.finish_reason:
            done.set()

    engine.submit([5, 6, 7], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True),
                  on_beside)  # fmt: skip
    failed = []
    engine.submit([77, 77, 77, 5], bad, failed.append)
    with pytest.raises(RuntimeError, match="failed in the engine"):
        engine.generate([77, 77, 77, 6], bad)
    assert done.wait(60)
    monkeypatch.undo()
    assert [o.finish_reason for o in failed] == ["error"] and failed[0].error
    assert beside[-1].finish_reason == "length" and beside[-1].completion_tokens == 60
    assert engine.error is None
    assert engine.generate([5, 6], greedy).token_ids == want
    assert engine.metrics()["failed_requests_total"] == failures + 2


def test_float_cache_perplexity_equals_the_cacheless_perplexity(tiny):
    text = np.random.default_rng(3).integers(0, 96, 700).tolist()
    ref = perplexity(*tiny, text, seq_len=64, progress=False)
    got = cache_perplexity(*tiny, text, seq_len=64, batch_size=3)
    assert got.tokens == ref.tokens
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-5)
    int8 = cache_perplexity(*tiny, text, seq_len=64, kv_cache="int8")
    assert int8.perplexity != got.perplexity  # the cache is really quantized
    assert int8.nll == pytest.approx(ref.nll, rel=0.01)


def test_a_bfloat16_cache_stores_bfloat16_whatever_the_compute_dtype(tiny):
    """`--kv-cache bfloat16` on a float32 model: keys and values rounded to bfloat16 (their
    bytes halve), attention still in float32; close to, and not equal to, the float cache."""
    runner = Runner(*tiny, rows=2, max_len=64, kv_cache="bfloat16")
    assert runner.cache.k.dtype == jnp.bfloat16 and runner.cache.k_scale is None
    assert runner.cache.nbytes == Runner(*tiny, rows=2, max_len=64).cache.nbytes // 2
    text = np.random.default_rng(3).integers(0, 96, 700).tolist()
    exact = cache_perplexity(*tiny, text, seq_len=64)
    bf16 = cache_perplexity(*tiny, text, seq_len=64, kv_cache="bfloat16")
    assert bf16.perplexity != exact.perplexity
    assert bf16.nll == pytest.approx(exact.nll, rel=0.01)


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
    runner = Runner(model, params, rows=2, max_len=64, prefill_chunk=16)
    assert not runner.stacked
    prompt = _prompts(1, seed=9)[0][:20]
    ref = generate(model, params, [prompt], max_new_tokens=1, stop_tokens=()).sequences()[0]
    sampling = __import__("jquant.serve.runner", fromlist=["Sampling"]).Sampling.greedy(1)
    table = [[5, 2]]  # two pages of 16
    runner.prefill(table, [prompt[:16]], [0], sampling)
    assert runner.prefill(table, [prompt[16:]], [16], sampling)[0] == ref[0]
