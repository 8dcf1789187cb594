"""Speculative decoding by n-gram prompt lookup (`jquant.serve.speculative`).

References: the proposer against a brute-force Python search; the engine's greedy outputs
through verify steps against `generate` (the dense-cache decode loop), with stop strings,
stop tokens, ``max_tokens``, page boundaries, preemption and the context's end cut
independently from `generate`'s tokens; penalties against a NumPy greedy loop over the
uncached forward, log-probabilities against its ``log_softmax``; seeded sampling against
`generate` with the same seed; and the distribution of the tokens a verify step yields
against the exact softmax of the uncached forward (chi-square).
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from jquant.models import LlamaConfig, forward, generate, init_model
from jquant.models.sampling import Sampler, Sampling
from jquant.serve import engine_report
from jquant.serve.engine import Engine, SamplingParams
from jquant.serve.runner import Runner
from jquant.serve.speculative import Ngram, accepted, propose

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)  # fmt: skip
SPEC = Ngram(num_tokens=4, min_n=1, max_n=3)
PROMPT_LEN, MAX_CONTEXT, LONGEST = 21, 64, 43  # prompt + LONGEST = the whole context


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)


TEXT = Letters().decode


# ---- the proposer --------------------------------------------------------------------------


def _propose_reference(seq: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(seq):
            continue
        suffix = seq[len(seq) - n :]
        for i in range(len(seq) - n - 1, -1, -1):  # the latest occurrence before the suffix
            if seq[i : i + n] == suffix:
                return seq[i + n : i + n + k]
    return []


@settings(max_examples=400, deadline=None)
@given(alphabet=st.integers(1, 4), data=st.data(), min_n=st.integers(1, 4),
       extra=st.integers(0, 3), k=st.integers(0, 6))  # fmt: skip
def test_propose_equals_a_brute_force_search(alphabet, data, min_n, extra, k):
    seq = data.draw(st.lists(st.integers(0, alphabet - 1), max_size=40))
    want = _propose_reference(seq, k, min_n, min_n + extra)
    assert propose(seq, k=k, min_n=min_n, max_n=min_n + extra) == want
    assert propose(np.asarray(seq, np.int32), k=k, min_n=min_n, max_n=min_n + extra) == want


def test_propose_prefers_the_longest_suffix_then_the_latest_occurrence():
    # "1 2" occurs at 0 and 3; the 3-gram "0 1 2" only at 2: the longest wins.
    assert propose([5, 1, 2, 0, 1, 2, 7, 9, 0, 1, 2], k=2, min_n=1, max_n=3) == [7, 9]
    assert propose([1, 2, 3, 1, 2, 4, 1, 2], k=5, min_n=2, max_n=2) == [4, 1, 2]
    assert propose([1, 2, 3, 4], k=3, min_n=1, max_n=4) == []


@pytest.mark.parametrize("kw, bad", [(dict(num_tokens=0), "num_tokens=0"),
                                     (dict(num_tokens=2, min_n=0), "min_n=0"),
                                     (dict(num_tokens=2, min_n=3, max_n=2), "min_n=3")])
def test_ngram_refuses_bad_settings_naming_them(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Ngram(**kw)


# ---- the engine, greedy: `generate`'s tokens --------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CFG, seed=0)
    # Weights 2x the init: greedy continuations fall into short loops that the drafts copy,
    # and leave them now and then, so drafts are both accepted and rejected.
    return model, jax.tree.map(lambda x: x * 2, nnx.state(model, nnx.Param))


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        base = rng.integers(4, 96, 12).tolist()
        out.append(base + rng.integers(4, 96, 3).tolist() + base[:6])  # a repeat to copy
    return out


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def refs(tiny):
    return generate(*tiny, PROMPTS, max_new_tokens=LONGEST, stop_tokens=()).sequences()


@pytest.fixture(scope="module")
def engine(tiny):
    # Pages of 4 positions: most verify steps cross a page boundary. 24 pages hold one
    # request of the whole context, not two: two long ones at once preempt, and drafts find
    # no free page to grow into.
    with Engine(*tiny, Letters(), max_slots=2, max_context=MAX_CONTEXT, prefill_chunk=16,
                prefill_rows=1, page_size=4, kv_cache_tokens=96, max_queue=64,
                speculative=SPEC) as eng:  # fmt: skip
        yield eng


def _looping(refs) -> list[list[int]]:
    """Each prompt followed by the first 10 tokens of its greedy continuation (a loop)."""
    return [p + r[:10] for p, r in zip(PROMPTS, refs)]


def _run_all(engine, jobs):
    outs = [None] * len(jobs)

    def run(i):
        outs[i] = engine.generate(*jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return outs


def _greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


class _Steps:
    """Records each verify step's drafts and sampled tokens (row 0: run one request)."""

    def __init__(self, engine, monkeypatch):
        self.steps, verify = [], engine.runner.verify

        def recording(tables, tokens, *args, **kw):
            out = verify(tables, tokens, *args, **kw)
            self.steps.append((list(tokens[0][1:]), out.tokens[0].tolist()))
            return out

        monkeypatch.setattr(engine.runner, "verify", recording)

    def yielded(self) -> list[list[int]]:
        """The tokens each step yielded: the accepted drafts, then the next sample."""
        out = []
        for drafts, sampled in self.steps:
            m = 0
            while m < len(drafts) and sampled[m] == drafts[m]:
                m += 1
            out.append(sampled[: m + 1])
        return out


def _delta(before, after, key):
    return after[key] - before[key]


def test_greedy_outputs_equal_generate_for_every_max_tokens(engine, refs):
    before = engine.metrics()
    # The longest first, two at a time: their pages do not fit together.
    jobs = [(p, _greedy(n)) for n in (LONGEST, 29, 17, 11, 6, 3, 2, 1) for p in PROMPTS]
    outs = _run_all(engine, jobs)
    for (prompt, params), out in zip(jobs, outs):
        ref = refs[PROMPTS.index(prompt)]
        assert out.token_ids == ref[: params.max_tokens], (prompt, params.max_tokens)
        assert out.finish_reason == "length" and out.text == TEXT(ref[: params.max_tokens])
    after = engine.metrics()
    drafted = _delta(before, after, "spec_decode_draft_tokens_total")
    taken = _delta(before, after, "spec_decode_accepted_tokens_total")
    assert 0 < taken < drafted  # drafts were both accepted and rejected
    assert _delta(before, after, "preemptions_total") > 0  # two whole contexts: 32 > 24 pages
    assert after["kv_cache_pages_used"] == 0 and after["active_slots"] == 0


def test_a_request_of_the_whole_context_runs_to_its_last_position(engine, refs, monkeypatch):
    steps = _Steps(engine, monkeypatch)
    out = engine.generate(PROMPTS[1], _greedy(LONGEST))
    assert PROMPT_LEN + LONGEST == MAX_CONTEXT and out.token_ids == refs[1]
    assert max(len(y) for y in steps.yielded()) > 2  # steps of several tokens


def test_stop_strings_cut_the_text_as_without_speculation(engine, refs):
    for prompt, ref in zip(PROMPTS, refs):
        text = TEXT(ref)
        for a in (4, 9, 20):
            stop = text[a : a + 2]
            cut = text.index(stop)
            out = engine.generate(prompt, _greedy(LONGEST, stop=(stop,)))
            # The text stops before the stop string; the ids run to the token completing it.
            assert out.text == text[:cut] and out.finish_reason == "stop"
            assert out.token_ids == ref[: cut + len(stop)]


def test_a_stop_token_inside_accepted_drafts_ends_the_request_there(tiny, engine, refs,
                                                                    monkeypatch):  # fmt: skip
    # The first verify step after a prompt that ends in its own loop copies the loop, so a
    # stop token in it is accepted among drafts, with tokens after it.
    prompts = _looping(refs)
    loops = generate(*tiny, prompts, max_new_tokens=20, stop_tokens=()).sequences()
    inside, steps = 0, _Steps(engine, monkeypatch)
    for prompt, ref in zip(prompts, loops):
        for stop in sorted(set(ref)):
            steps.steps.clear()
            out = engine.generate(prompt, _greedy(20, stop_token_ids=(stop,)))
            assert out.token_ids == ref[: ref.index(stop)] and out.finish_reason == "stop"
            inside += any(stop in y[:-1] for y in steps.yielded())
    assert inside > 0  # some step yielded the stop token and tokens after it, dropped


def test_penalties_and_logprobs_equal_the_uncached_references(tiny, engine, refs):
    # Penalties mild enough that loops form (and drafts are accepted) and break later than
    # without them: where depends on counting the accepted drafts before each column.
    prompts = _looping(refs)
    jobs = [(prompts[3], _greedy(24, frequency_penalty=0.1, logprobs=3)),
            (prompts[2], _greedy(24, frequency_penalty=0.2)),
            (prompts[0], _greedy(24, presence_penalty=0.3, logprobs=1)),
            (prompts[1], _greedy(24, repetition_penalty=1.2, presence_penalty=0.05,
                                 logprobs=2))]  # fmt: skip
    before = engine.metrics()
    outs = _run_all(engine, jobs)
    after = engine.metrics()
    for (prompt, params), out in zip(jobs, outs):
        seq, ids = list(prompt), out.token_ids
        for j, token in enumerate(ids):
            logits = _logits(tiny, seq)[-1]
            if params.logprobs is not None:
                logp = _log_softmax(logits)
                np.testing.assert_allclose(out.logprobs[j], logp[token], rtol=1e-4, atol=1e-4)
                top = [t for t, _ in out.top_logprobs[j]]
                assert top == np.argsort(-logp, kind="stable")[: params.logprobs].tolist()
            assert token == int(np.argmax(_penalized(logits, prompt, ids[:j], params)))
            seq.append(token)
        assert len(ids) == 24
    assert _delta(before, after, "spec_decode_accepted_tokens_total") > 0


def test_seeded_sampling_equals_generate_with_the_same_seed(tiny, engine):
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    before = engine.metrics()
    for seed in (1, 2, 3):
        out = engine.generate(PROMPTS[0], SamplingParams(max_tokens=30, seed=seed,
                                                         ignore_eos=True, **kw))  # fmt: skip
        ref = generate(*tiny, [PROMPTS[0]], max_new_tokens=30, stop_tokens=(), seed=seed, **kw)
        assert out.token_ids == ref.sequences()[0]
    assert _delta(before, engine.metrics(), "spec_decode_accepted_tokens_total") > 0


def test_metrics_and_report_count_drafts(engine):
    m = engine.metrics()
    assert m["spec_decode_drafts_total"] > 0
    assert m["spec_decode_acceptance_rate"] == pytest.approx(
        m["spec_decode_accepted_tokens_total"] / m["spec_decode_draft_tokens_total"])
    assert engine_report(engine).endswith(
        f"; speculative n-gram (n 1..3) up to 4 tokens: {m['spec_decode_draft_tokens_total']} "
        f"drafted, {m['spec_decode_accepted_tokens_total']} accepted "
        f"({100 * m['spec_decode_acceptance_rate']:.1f}%)")


def test_verify_refuses_rows_of_too_many_tokens_or_past_the_context(engine):
    with pytest.raises(ValueError, match="1 to 5"):
        engine.runner.verify([[0]], [[1, 2, 3, 4, 5, 6]], [0], Sampling.greedy(1))
    with pytest.raises(ValueError, match="position 64; max_len is 64"):
        engine.runner.verify([[0]], [[1, 2, 3]], [MAX_CONTEXT - 2], Sampling.greedy(1))


def _logits(tiny, seq) -> np.ndarray:
    """float32 logits (len(seq), V) of the uncached forward (over ``seq`` padded to 64
    tokens: causal, so the padding changes no logit before it)."""
    tokens = np.zeros((1, MAX_CONTEXT), np.int32)
    tokens[0, : len(seq)] = seq
    logits, _ = forward(*tiny, tokens)
    return np.asarray(logits[0, : len(seq)], np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _penalized(logits, prompt, generated, p: SamplingParams) -> np.ndarray:
    """Hugging Face's repetition penalty over prompt and generated tokens, then OpenAI's
    presence and frequency penalties over the generated ones."""
    counts = np.bincount(np.asarray(generated, np.int64), minlength=len(logits))
    seen = np.zeros(len(logits), bool)
    seen[list(prompt) + list(generated)] = True
    r = np.float32(p.repetition_penalty)
    logits = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
    return (logits - np.float32(p.presence_penalty) * (counts > 0)
            - np.float32(p.frequency_penalty) * counts.astype(np.float32))  # fmt: skip


# ---- sampling: the distribution of what a verify step yields --------------------------------

SMALL = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=2, num_kv_heads=1, max_position_embeddings=64)  # fmt: skip


def _exact(logits: np.ndarray, temperature: float, top_k: int) -> np.ndarray:
    """The sampling rule's distribution (top-p off): softmax of the ``top_k`` largest
    ``logits / temperature``."""
    scaled = logits.astype(np.float64) / temperature
    kept = scaled >= np.sort(scaled)[::-1][top_k - 1]
    p = np.where(kept, np.exp(scaled - scaled.max()), 0.0)
    return p / p.sum()


def _chi_square_p(tokens: np.ndarray, p: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(p))
    assert counts[p == 0].sum() == 0  # nothing outside the top-k
    return stats.chisquare(counts[p > 0], p[p > 0] * len(tokens)).pvalue


def test_tokens_a_verify_step_yields_are_distributed_as_plain_sampling():
    model = init_model(SMALL, seed=3)
    params = jax.tree.map(lambda x: x * 3, nnx.state(model, nnx.Param))
    rows, calls, temperature, top_k = 32, 100, 0.9, 6
    runner = Runner(model, params, rows=rows, max_len=32, page_size=8, draft_tokens=2)
    prompt, pages = [1, 5, 2, 7, 3], [0, 1]
    runner.prefill([pages], [prompt], [0], Sampling.greedy(1))
    p0 = _exact(np.asarray(forward(model, params, np.asarray([prompt], np.int32))[0][0, -1]),
                temperature, top_k)  # fmt: skip
    d1 = int(np.argmax(p0))  # a likely draft: accepted often
    logits1 = forward(model, params, np.asarray([prompt + [d1]], np.int32))[0][0, -1]
    p1 = _exact(np.asarray(logits1), temperature, top_k)
    d2 = int(np.argsort(p1)[-2])
    first, second, plain = [], [], []
    for call in range(calls):
        sampling = Sampler(temperature, top_k).rows(call * rows + np.arange(rows) + 1000)
        out = runner.verify([pages] * rows, [[prompt[-1], d1, d2]] * rows,
                            [len(prompt) - 1] * rows, sampling)  # fmt: skip
        for row in out:
            yielded = row[: accepted([d1, d2], row) + 1]
            first.append(yielded[0])
            if len(yielded) > 1:  # the draft d1 was accepted: the next token follows it
                second.append(yielded[1])
        # Without speculation: the decode step, with the same seeds.
        plain.extend(runner.decode([pages] * rows, [prompt[-1]] * rows,
                                   [len(prompt) - 1] * rows, sampling).tolist())  # fmt: skip
    assert len(second) > 500 and np.mean(np.asarray(first) == d1) < 0.8
    assert _chi_square_p(np.asarray(first), p0) > 1e-3
    assert _chi_square_p(np.asarray(second), p1) > 1e-3
    assert _chi_square_p(np.asarray(plain), p0) > 1e-3


# ---- SmolLM2 ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_copying_a_passage_equals_generate():
    from pydoc_data.topics import topics

    from jquant import models

    model, params, tokenizer = models.load("smollm2-135m")
    passage = topics["with"][:400].rsplit("\n", 1)[0]
    prompt = models.chat_prompt(tokenizer, f"Here is a passage from the Python documentation:"
                                f"\n\n{passage}\n\nRepeat the passage above word for word.")
    ref = generate(model, params, [prompt], max_new_tokens=48).sequences()[0]
    eos = set(model.config.eos_token_ids)
    ref = ref[: next((i for i, t in enumerate(ref) if t in eos), len(ref))]
    text = tokenizer.decode(ref, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    with Engine(model, params, tokenizer, max_slots=1, max_context=256,
                speculative=Ngram(num_tokens=4)) as eng:  # fmt: skip
        out = eng.generate(prompt, SamplingParams(max_tokens=48, temperature=0))
        cut = eng.generate(prompt, SamplingParams(max_tokens=48, temperature=0, stop=(stop,)))
        m = eng.metrics()
    assert out.token_ids == ref and out.text == text
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop"
    assert m["spec_decode_acceptance_rate"] > 0.5  # it copies: most drafts are right
