"""Log-probabilities and repetition penalties through the engine, against NumPy references
built on the uncached forward (`jquant.models.forward`): ``log_softmax`` of its logits, and a
greedy loop that applies OpenAI's and Hugging Face's penalty formulas in NumPy."""

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.models import LlamaConfig, forward, generate, init_model
from jquant.serve.engine import Engine, SamplingParams
from jquant.serve.limits import LimitError

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                  eos_token_ids=(3,))  # fmt: skip
PROMPTS = [[5, 9, 9, 40, 17, 5, 61], [70, 12, 12, 12], list(range(10, 40)), [88]]


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CFG, seed=1)
    # Weights 4x the init: logits spread enough that greedy continuations vary, close enough
    # that penalties of -2..2 change which token wins.
    params = jax.tree.map(lambda x: x * 4, nnx.state(model, nnx.Param))
    return model, params


@pytest.fixture(scope="module")
def engine(tiny):
    with Engine(*tiny, Letters(), max_slots=4, max_context=96, prefill_chunk=16) as eng:
        yield eng


def _logits(tiny, seq) -> np.ndarray:
    """float32 logits (len(seq), V) of the uncached forward (run over ``seq`` padded to 96
    tokens, one compiled shape: causal, so the padding changes no logit before it)."""
    tokens = np.zeros((1, 96), np.int32)
    tokens[0, : len(seq)] = seq
    logits, _ = forward(*tiny, tokens)
    return np.asarray(logits[0, : len(seq)], np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _run_all(engine, jobs):
    """``engine.generate`` of every ``(prompt, params)`` at once (threads: one batch)."""
    outs = [None] * len(jobs)

    def run(i):
        outs[i] = engine.generate(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def _check_logprobs(tiny, prompt, out, k):
    """``out``'s log-probabilities equal log_softmax of the uncached forward's logits."""
    ids = out.token_ids
    assert len(out.logprobs) == len(out.top_logprobs) == len(ids) > 0
    ref = _log_softmax(_logits(tiny, prompt + ids[:-1]))[len(prompt) - 1 :]
    for j, token in enumerate(ids):
        np.testing.assert_allclose(out.logprobs[j], ref[j, token], rtol=1e-4, atol=1e-4)
        top = out.top_logprobs[j]
        assert len(top) == k
        got_ids = [t for t, _ in top]
        got = np.array([v for _, v in top])
        # Theirs by the reference, most likely first, and the k largest of the reference.
        np.testing.assert_allclose(got, ref[j, got_ids], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, np.sort(ref[j])[::-1][:k], rtol=1e-4, atol=1e-4)
        assert len(set(got_ids)) == k


def test_logprobs_of_concurrent_requests_equal_the_uncached_log_softmax(tiny, engine):
    jobs = [(p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=k))
            for p, k in zip(PROMPTS, (5, 0, 20, 3))]  # fmt: skip
    # A sampled request with penalties beside them: its log-probabilities are still the
    # model's own distribution (before penalties and temperature).
    jobs.append((PROMPTS[1], SamplingParams(max_tokens=10, temperature=0.7, seed=3, logprobs=4,
                                            frequency_penalty=1.5, repetition_penalty=1.3,
                                            ignore_eos=True)))  # fmt: skip
    outs = _run_all(engine, jobs)
    for (prompt, params), out in zip(jobs, outs):
        _check_logprobs(tiny, prompt, out, params.logprobs)
    # Without logprobs: none.
    out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))
    assert out.logprobs is None and out.top_logprobs is None


def test_streamed_logprobs_line_up_with_the_streamed_tokens(engine):
    events, done = [], threading.Event()

    def on(out):
        events.append(out)
        if out.finish_reason:
            done.set()

    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2)
    engine.submit(PROMPTS[2], params, on)
    assert done.wait(60)
    whole = engine.generate(PROMPTS[2], params)
    for e in events:
        assert len(e.logprobs) == len(e.top_logprobs) == len(e.token_ids)
    assert [x for e in events for x in e.logprobs] == whole.logprobs


def _numpy_penalized_greedy(tiny, prompt, n, presence=0.0, frequency=0.0, repetition=1.0):
    """Greedy decoding re-running the uncached forward over the growing sequence, with
    OpenAI's presence/frequency penalties over the generated tokens and Hugging Face's
    repetition penalty over prompt and generated tokens, in NumPy."""
    seq, out = list(prompt), []
    for _ in range(n):
        logits = _logits(tiny, seq)[-1]
        counts = np.bincount(np.asarray(out, np.int64), minlength=CFG.vocab_size)
        seen = np.zeros(CFG.vocab_size, bool)
        seen[seq] = True
        r = np.float32(repetition)
        logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
        logits = (logits - np.float32(presence) * (counts > 0)
                  - np.float32(frequency) * counts.astype(np.float32))  # fmt: skip
        token = int(np.argmax(logits.astype(np.float32)))
        seq.append(token)
        out.append(token)
    return out


PENALTIES = [
    dict(presence_penalty=2.0),
    dict(presence_penalty=-1.5),
    dict(frequency_penalty=2.0),
    dict(frequency_penalty=-2.0),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.3),
]
_NAMES = {"presence_penalty": "presence", "frequency_penalty": "frequency",
          "repetition_penalty": "repetition"}  # fmt: skip


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: "-".join(f"{k}={v}" for k, v in
                                                                        p.items()))
def test_penalized_greedy_equals_the_numpy_reference(tiny, engine, penalty):
    n = 16
    greedy = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    jobs = []
    for i, prompt in enumerate(PROMPTS):  # rows with and without penalties in one batch
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **penalty)
        jobs.append((prompt, params if i % 2 == 0 else greedy))
    outs = _run_all(engine, jobs)
    kw = {_NAMES[k]: v for k, v in penalty.items()}
    changed = 0
    for (prompt, params), out in zip(jobs, outs):
        plain = generate(*tiny, [prompt], max_new_tokens=n, stop_tokens=()).sequences()[0]
        if params is greedy:
            assert out.token_ids == plain  # a row without penalties: as without the feature
        else:
            ref = _numpy_penalized_greedy(tiny, prompt, n, **kw)
            assert out.token_ids == ref
            changed += ref != plain
    assert changed  # the penalty changes the output here, so the check can see it ignored


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.5), ("presence_penalty", float("nan")), ("frequency_penalty", -2.1),
    ("frequency_penalty", float("inf")), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("repetition_penalty", 2.5),
    ("repetition_penalty", float("nan")), ("logprobs", 21), ("logprobs", -1),
])  # fmt: skip
def test_bad_penalties_and_logprobs_are_refused_naming_the_field(engine, field, value):
    with pytest.raises(LimitError, match=field) as e:
        engine.generate([5, 6], SamplingParams(max_tokens=2, **{field: value}))
    assert e.value.param == field


def test_penalties_compile_no_program_of_their_own(engine):
    before = list(engine.runner.programs)
    engine.generate(PROMPTS[0], SamplingParams(max_tokens=4, presence_penalty=1.0, logprobs=20,
                                               repetition_penalty=1.5, temperature=0))
    assert engine.runner.programs == before
    assert len(before) == len(set(before))
