"""The engine on its paged cache: prefix caching, preemption, batched prefill, more requests
than whole contexts would fit, and sliding-window pages; every greedy output equals
`generate`'s for the same prompt."""

import dataclasses
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from jquant.models import LlamaConfig, generate, init_model
from jquant.serve.engine import Engine, SamplingParams

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)  # fmt: skip
GREEDY = dict(temperature=0, ignore_eos=True)


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)


def _tiny(cfg=CFG):
    model = init_model(cfg, seed=0)
    return model, jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _reference(tiny, prompt, n):
    return generate(*tiny, [prompt], max_new_tokens=n, stop_tokens=()).sequences()[0]


def _run_all(engine, prompts, max_tokens):
    outs = [None] * len(prompts)

    def run(i):
        outs[i] = engine.generate(prompts[i], SamplingParams(max_tokens=max_tokens, **GREEDY))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return outs


def test_a_shared_prefix_is_prefilled_once_and_outputs_are_unchanged(tiny):
    rng = np.random.default_rng(0)
    system = rng.integers(4, 96, 40).tolist()  # 2.5 pages of 16
    prompts = [system + rng.integers(4, 96, int(n)).tolist() for n in (3, 9, 17)]
    refs = [_reference(tiny, p, 6) for p in prompts]
    with Engine(*tiny, Letters(), max_slots=4, max_context=96, prefill_chunk=32,
                page_size=16) as eng:  # fmt: skip
        first = eng.generate(prompts[0], SamplingParams(max_tokens=6, **GREEDY))
        prefilled = eng.metrics()["prompt_tokens_total"]
        rest = [eng.generate(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts[1:]]
        m = eng.metrics()
    assert [o.token_ids for o in (first, *rest)] == refs
    assert m["prefix_cache_hit_tokens"] == 2 * 32  # two full pages of the system prompt, twice
    assert m["prompt_tokens_total"] - prefilled == sum(len(p) - 32 for p in prompts[1:])


def test_requests_arriving_together_prefill_their_shared_prefix_once(tiny):
    rng = np.random.default_rng(5)
    system = rng.integers(4, 96, 40).tolist()  # two full pages of 16 shared
    prompts = [system + rng.integers(4, 96, int(n)).tolist() for n in (3, 5, 8, 11, 2, 6)]
    refs = [_reference(tiny, p, 5) for p in prompts]
    with Engine(*tiny, Letters(), max_slots=6, max_context=96, prefill_chunk=64,
                page_size=16) as eng:  # fmt: skip
        outs, done = [[] for _ in prompts], threading.Semaphore(0)

        def on(out, i):
            outs[i].extend(out.token_ids)
            if out.finish_reason:
                done.release()

        # One call queues all six at once (`submit_many`): they are admitted together.
        eng.submit_many([(p, SamplingParams(max_tokens=5, **GREEDY),
                          lambda out, i=i: on(out, i)) for i, p in enumerate(prompts)])
        for _ in prompts:
            assert done.acquire(timeout=120)
        m = eng.metrics()
    assert outs == refs
    # Whichever arrived first computed the two pages; the five others read them.
    assert m["prefix_cache_hit_tokens"] == 5 * 32
    assert m["prompt_tokens_total"] == sum(len(p) for p in prompts) - 5 * 32


def test_pages_run_out_preempt_and_recompute_with_the_same_outputs(tiny):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, 96, int(n)).tolist() for n in rng.integers(10, 30, 6)]
    refs = [_reference(tiny, p, 30) for p in prompts]
    # 6 requests of up to 59 positions in a cache of 96: some must give their pages back.
    with Engine(*tiny, Letters(), max_slots=6, max_context=64, prefill_chunk=16,
                page_size=8, kv_cache_tokens=96, prefix_caching=False) as eng:  # fmt: skip
        outs = _run_all(eng, prompts, 30)
        m = eng.metrics()
    assert m["preemptions_total"] > 0
    assert [o.token_ids for o in outs] == refs
    assert m["kv_cache_pages_used"] == 0 and m["active_slots"] == 0


def test_more_short_requests_than_whole_contexts_run_at_once(tiny):
    """The memory of 2 whole contexts (2 x 128 positions) holds 8 requests of <= 32."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(4, 96, 12).tolist() for _ in range(8)]
    refs = [_reference(tiny, p, 16) for p in prompts]
    with Engine(*tiny, Letters(), max_slots=8, max_context=128, prefill_chunk=16,
                page_size=16, kv_cache_tokens=256) as eng:  # fmt: skip
        seen = []
        decode = eng.runner.decode

        def counting(tables, tokens, positions, sampling, *rest, **kw):
            seen.append(len(tokens))
            return decode(tables, tokens, positions, sampling, *rest, **kw)

        eng.runner.decode = counting
        outs = _run_all(eng, prompts, 16)
    assert [o.token_ids for o in outs] == refs
    assert max(seen) == 8  # all eight decoded in one step


def test_prompts_are_prefilled_together(tiny):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(4, 96, int(n)).tolist() for n in (5, 20, 40, 7)]
    refs = [_reference(tiny, p, 4) for p in prompts]
    with Engine(*tiny, Letters(), max_slots=4, max_context=128, prefill_chunk=32,
                prefill_rows=4) as eng:  # fmt: skip
        rows, held = [], threading.Event()
        prefill = eng.runner.prefill

        def counting(tables, chunks, starts, sampling, *rest, **kw):
            held.wait(60)  # the first prefill waits until every request is queued
            rows.append(len(chunks))
            return prefill(tables, chunks, starts, sampling, *rest, **kw)

        eng.runner.prefill = counting
        outs = [None] * 4
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, eng.generate(
            prompts[i], SamplingParams(max_tokens=4, **GREEDY)))) for i in range(4)]
        threads[0].start()
        while not eng.metrics()["active_slots"]:
            threading.Event().wait(0.01)
        for t in threads[1:]:
            t.start()
        while eng.metrics()["queue_depth"] + eng.metrics()["active_slots"] < 4:
            threading.Event().wait(0.01)
        held.set()
        for t in threads:
            t.join(120)
    assert [o.token_ids for o in outs] == refs
    # The first prompt alone, then the other three (five chunks of at most 32 tokens one by
    # one: 20, 32 + 8, 7) in two or three steps, whatever order they arrived in.
    assert rows[0] == 1 and max(rows) >= 2 and len(rows) <= 4 and sum(rows) == 5


def test_sliding_window_model_gives_back_pages_behind_its_window():
    cfg = dataclasses.replace(CFG, sliding_window=12, layer_types=("sliding_attention",) * 2)
    tiny = _tiny(cfg)
    prompt = np.random.default_rng(4).integers(4, 96, 10).tolist()
    ref = _reference(tiny, prompt, 50)
    with Engine(*tiny, Letters(), max_slots=1, max_context=64, prefill_chunk=16,
                page_size=4) as eng:  # fmt: skip
        held = []
        decode = eng.runner.decode

        def counting(tables, tokens, positions, sampling, *rest, **kw):
            held.append(sum(p is not None for p in tables[0]))
            return decode(tables, tokens, positions, sampling, *rest, **kw)

        eng.runner.decode = counting
        out = eng.generate(prompt, SamplingParams(max_tokens=50, **GREEDY))
    assert out.token_ids == ref
    assert max(held) <= 12 // 4 + 2  # the window's pages and the one being written
