"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP.

The tiny random Llama of conftest.py (byte-level tokenizer, chat template) behind the real
`Engine`, served by uvicorn on a free 127.0.0.1 port in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from jquant import models
from jquant.serve.engine import Engine, SamplingParams
from jquant.serve.server import create_app

MODEL = "tiny-llama"
MAX_CONTEXT = 256  # the tiny model's max_position_embeddings
SLOTS = 4


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, params, tokenizer = models.load(tiny_model)
    engine = Engine(model, params, tokenizer, max_slots=SLOTS, max_context=MAX_CONTEXT,
                    prefill_chunk=32)  # fmt: skip
    engine._test_model, engine._test_params = model, params  # the uncached references'
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base_url(engine):
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, MODEL), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)


def _greedy(engine, ids, max_tokens, **kw):
    return engine.generate(list(ids), SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw))


def server_encode(engine, text):
    from jquant.serve.server import _encode

    return _encode(engine, text)


def _chat_ids(engine, messages):
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)  # fmt: skip
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_raw_prompts_get_bos_and_chat_prompts_only_the_templates(tmp_path, tiny):
    from types import SimpleNamespace

    from jquant.io import load_gguf
    from jquant.serve import server

    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for add_bos in (True, False):
        path = tiny.write_gguf(tmp_path / f"{add_bos}.gguf", tiny.tensors(), add_bos=add_bos,
                               template=template)  # fmt: skip
        engine = SimpleNamespace(tokenizer=load_gguf(path).tokenizer)
        text = engine.tokenizer.encode("hello", add_special_tokens=False)
        assert server._encode(engine, "hello") == ([1] if add_bos else []) + text
        assert server._encode(engine, "<|im_start|>hello") == [1] + text  # BOS is id 1
        chat = server._chat_prompt(engine, [{"role": "user", "content": "hello"}])
        assert chat == [1] + text  # the template's BOS, not a second one


def _wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.metrics()["active_slots"] or engine.metrics()["queue_depth"]:
        assert time.monotonic() < deadline, f"slots still busy: {engine.metrics()}"
        time.sleep(0.02)


def test_models_health_and_metrics(client, base_url, engine):
    from prometheus_client.parser import text_string_to_metric_families

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "jquant"
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{base_url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    for name in ("jquant_active_slots", "jquant_queue_depth", "jquant_kv_cache_used_tokens",
                 "jquant_kv_cache_capacity_tokens", "jquant_generated_tokens_total",
                 "jquant_prompt_tokens_total", "jquant_requests_total",
                 "jquant_tokens_per_second", "jquant_spec_decode_draft_tokens_total",
                 "jquant_spec_decode_accepted_tokens_total",
                 "jquant_spec_decode_acceptance_rate"):  # fmt: skip
        assert name in samples, name
    assert samples["jquant_kv_cache_capacity_tokens"] > 0


def test_completion_is_the_engines_greedy_output(client, engine):
    ids = engine.tokenizer.encode("hello world", add_special_tokens=False)
    want = _greedy(engine, ids, 12)
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                  temperature=0)  # fmt: skip
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert choice.index == 0 and choice.logprobs is None
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == len(ids) + want.completion_tokens
    # Token ids as the prompt, and a batch of prompts: one choice per prompt.
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want.text
    batch = client.completions.create(model=MODEL, prompt=["hello world", "hello"],
                                      max_tokens=12, temperature=0)  # fmt: skip
    other = _greedy(engine, engine.tokenizer.encode("hello", add_special_tokens=False), 12)
    assert [c.text for c in batch.choices] == [want.text, other.text]


def test_chat_is_the_engines_greedy_output_of_the_template(client, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    ids = _chat_ids(engine, messages)
    want = _greedy(engine, ids, 10)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                       temperature=0, user="u1", metadata={"k": "v"},
                                       store=False)  # fmt: skip
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), want.completion_tokens)
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "hello"}]}]  # fmt: skip
    r2 = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=10,
                                        temperature=0)  # fmt: skip
    assert r2.choices[0].message.content == want.text


def test_chat_default_max_tokens_is_the_rest_of_the_context(client, engine):
    messages = [{"role": "user", "content": "hi"}]
    ids = _chat_ids(engine, messages)
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == MAX_CONTEXT - len(ids)


def test_streaming_completion_equals_the_whole_one(client, engine):
    kw = dict(model=MODEL, prompt="hello world", max_tokens=12, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == whole.choices[0].finish_reason and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_equals_the_whole_one(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=10,
              temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_raw_event_stream_format(base_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first, usage = json.loads(events[0][6:]), json.loads(events[-2][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_n_choices_are_seeded_seed_plus_i(client, engine):
    ids = engine.tokenizer.encode("hello", add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt="hello", n=3, max_tokens=8,
                                  temperature=1.0, top_p=0.9, seed=5,
                                  extra_body={"top_k": 20})  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        want = engine.generate(ids, SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9,
                                                   top_k=20, seed=5 + i))  # fmt: skip
        assert c.text == want.text
    assert r.usage.prompt_tokens == len(ids)  # counted once, as OpenAI does
    streamed = client.completions.create(model=MODEL, prompt="hello", n=3, max_tokens=8,
                                         temperature=1.0, top_p=0.9, seed=5, stream=True,
                                         extra_body={"top_k": 20})  # fmt: skip
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


def _reference_logprobs(engine, prompt, generated):
    """log_softmax (NumPy) of the uncached forward's logits at each generated position."""
    import numpy as np

    tokens = np.asarray([prompt + generated[:-1]], np.int32)
    logits, _ = models.forward(engine._test_model, engine._test_params, tokens)
    x = np.asarray(logits[0, len(prompt) - 1 :], np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _top(ref_row, k):
    import numpy as np

    ids = np.argsort(-ref_row)[:k]
    return ids, ref_row[ids]


def test_completion_logprobs_equal_the_uncached_log_softmax(client, engine):
    tok = engine.tokenizer
    prompts = ["hello world", "the cat"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    for text, choice in zip(prompts, r.choices):
        ids = server_encode(engine, text)
        out = _greedy(engine, ids, 8, ignore_eos=True)
        ref = _reference_logprobs(engine, ids, out.token_ids)
        lp = choice.logprobs
        assert lp.tokens == [tok.decode([t]) for t in out.token_ids]
        assert lp.token_logprobs == pytest.approx(
            [ref[j, t] for j, t in enumerate(out.token_ids)], abs=1e-4)  # fmt: skip
        offsets = [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
        assert lp.text_offset == offsets
        for j, top in enumerate(lp.top_logprobs):
            want_ids, want = _top(ref[j], 3)
            expected = {}
            for t, v in zip(want_ids, want):  # keyed by text: the first (likelier) of a text
                expected.setdefault(tok.decode([int(t)]), v)
            assert top == pytest.approx(expected, abs=1e-4)
    # Streamed: the chunks' log-probabilities add up to the whole one's.
    kw = dict(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)
              if c.choices and c.choices[0].logprobs]  # fmt: skip
    assert [t for c in chunks for t in c.tokens] == whole.tokens
    assert [x for c in chunks for x in c.token_logprobs] == whole.token_logprobs
    assert [x for c in chunks for x in c.top_logprobs] == whole.top_logprobs
    assert [x for c in chunks for x in c.text_offset] == whole.text_offset


def test_chat_logprobs_equal_the_uncached_log_softmax(client, engine):
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "hello"}]
    ids = _chat_ids(engine, messages)
    out = _greedy(engine, ids, 6, ignore_eos=True)
    ref = _reference_logprobs(engine, ids, out.token_ids)
    kw = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})  # fmt: skip
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert len(content) == len(out.token_ids)
    for j, (item, t) in enumerate(zip(content, out.token_ids)):
        assert item.token == tok.decode([t]) and item.bytes == list(item.token.encode())
        assert item.logprob == pytest.approx(ref[j, t], abs=1e-4)
        want_ids, want = _top(ref[j], 4)
        assert [x.logprob for x in item.top_logprobs] == pytest.approx(list(want), abs=1e-4)
        assert {x.token for x in item.top_logprobs} == {tok.decode([int(i)]) for i in want_ids}
    # logprobs without top_logprobs: the tokens' own, no alternatives; and streamed alike.
    plain = client.chat.completions.create(**kw, logprobs=True).choices[0].logprobs.content
    assert [x.logprob for x in plain] == [x.logprob for x in content]
    assert all(x.top_logprobs == [] for x in plain)
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=4,
                                                 stream=True))  # fmt: skip
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]  # fmt: skip
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]
    assert client.chat.completions.create(**kw).choices[0].logprobs is None
    # Sampled (seeded: the engine's own tokens are known): each token's own log-probability
    # of the model's distribution, not the most likely one's, nor the tempered one's.
    sampled = engine.generate(ids, SamplingParams(max_tokens=6, temperature=1.5, seed=11,
                                                  ignore_eos=True))  # fmt: skip
    ref = _reference_logprobs(engine, ids, sampled.token_ids)
    r = client.chat.completions.create(**{**kw, "temperature": 1.5}, seed=11, logprobs=True)
    content = r.choices[0].logprobs.content
    assert [x.token for x in content] == [tok.decode([t]) for t in sampled.token_ids]
    assert [x.logprob for x in content] == pytest.approx(
        [ref[j, t] for j, t in enumerate(sampled.token_ids)], abs=1e-4)  # fmt: skip
    assert any(ref[j, t] < ref[j].max() - 1e-3 for j, t in enumerate(sampled.token_ids))


def test_penalties_over_http_are_the_engines(client, engine):
    ids = server_encode(engine, "hello world")
    for penalty in ({"presence_penalty": 1.5, "frequency_penalty": 0.5},
                    {"repetition_penalty": 1.7}):  # fmt: skip
        want = _greedy(engine, ids, 12, ignore_eos=True, **penalty)
        kw = {k: v for k, v in penalty.items() if k != "repetition_penalty"}
        extra = {"ignore_eos": True}
        if "repetition_penalty" in penalty:
            extra["repetition_penalty"] = penalty["repetition_penalty"]
        r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=12,
                                      temperature=0, extra_body=extra, **kw)  # fmt: skip
        assert r.choices[0].text == want.text


def test_non_finite_penalty_is_a_400_naming_it(base_url):
    raw = b'{"model": "%s", "prompt": "hi", "presence_penalty": 1e999}' % MODEL.encode()
    r = httpx.post(f"{base_url}/v1/completions", content=raw,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "presence_penalty"


def test_stop_string_cuts_the_text(client, engine):
    ids = engine.tokenizer.encode("hello world", add_special_tokens=False)
    full = _greedy(engine, ids, 24, ignore_eos=True).text
    # A two-character stop string whose first occurrence is past the start.
    pairs = [(i, full[i : i + 2]) for i in range(2, len(full) - 2)]
    stop = next(p for i, p in pairs if full.index(p) == i and "\ufffd" not in p)
    r = client.completions.create(model=MODEL, prompt="hello world", max_tokens=24,
                                  temperature=0, stop=[stop, "never-seen"],
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


_LONG = "hello world " * 400  # over 512 tokens


@pytest.mark.parametrize(
    "path,body,param,fragment",
    [
        ("completions", {"prompt": "hi", "model": "gpt-4"}, "model", "does not exist"),
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "between 1 and"),
        ("completions", {"prompt": "hi", "max_tokens": -3}, "max_tokens", "between 1 and"),
        ("completions", {"prompt": "hi", "max_tokens": MAX_CONTEXT}, "max_tokens",
         "maximum context length"),
        ("completions", {"prompt": _LONG}, "prompt", "maximum context length"),
        ("chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, "messages",
         "maximum context length"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 10**6}, "max_completion_tokens",
         "maximum context length"),
        ("completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature", "valid number"),
        ("completions", {"prompt": "hi", "n": True}, "n", "valid integer"),
        ("completions", {"prompt": {"text": "hi"}}, "prompt", "Invalid type"),
        ("chat/completions", {"messages": "hi"}, "messages", "Invalid type"),
        ("chat/completions", {"messages": []}, "messages", "empty array"),
        ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]},
         "messages[0].role", "expected one of"),
        ("chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
         "messages[0].content[0]", "only text"),
        ("completions", {}, "prompt", "Missing required parameter"),
        ("completions", {"prompt": "hi", "n": 10**6}, "n", "between 1 and"),
        ("completions", {"prompt": "hi", "n": 0}, "n", "between 1 and"),
        ("completions", {"prompt": "hi", "temperature": 2.5}, "temperature", "between 0 and 2"),
        ("completions", {"prompt": "hi", "top_p": 1.5}, "top_p", "between 0 and 1"),
        ("completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop",
         "maximum length 4"),
        ("completions", {"prompt": "hi", "foo": 1}, "foo",
         "Unrecognized request argument supplied: foo"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "bar": None},
         "bar", "Unrecognized request argument supplied: bar"),
        ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "between 0 and 20"),
        ("completions", {"prompt": "hi", "logprobs": -1}, "logprobs", "between 0 and 20"),
        ("completions", {"prompt": "hi", "logprobs": True}, "logprobs", "valid integer"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": True, "top_logprobs": 21}, "top_logprobs",
         "between 0 and 20"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, "top_logprobs", "only allowed when"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": 3}, "logprobs", "valid boolean"),
        ("completions", {"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty",
         "between -2 and 2"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": -2.01}, "frequency_penalty",
         "between -2 and 2"),
        ("completions", {"prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty",
         "valid number"),
        ("completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty",
         "above 0"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "repetition_penalty": 2.5}, "repetition_penalty", "above 0"),
        ("completions", {"prompt": "hi", "repetition_penalty": -1.0}, "repetition_penalty",
         "above 0"),
        ("completions", {"prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias",
         "not supported"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "f"}}]}, "tools", "not supported"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "xml"}}, "response_format.type",
         "expected one of"),
        ("completions", {"prompt": "hi", "echo": True}, "echo", "not supported"),
        ("completions", {"prompt": "hi", "best_of": 2}, "best_of", "not supported"),
        ("completions", {"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
        ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
         "stream_options", "only allowed when 'stream' is enabled"),
        ("completions", {"prompt": [10**6]}, "prompt", "token ids"),
        # Bounded above as well as below: the limits the engine checks (jquant.serve.limits).
        ("completions", {"prompt": "hi", "top_k": 2**31}, "top_k", "between -1 and"),
        ("completions", {"prompt": "hi", "top_k": 10**6}, "top_k", "vocabulary size"),
        ("completions", {"prompt": "hi", "top_k": -2}, "top_k", "between -1 and"),
        ("completions", {"prompt": "hi", "seed": 2**64}, "seed", "between"),
        ("completions", {"prompt": "hi", "max_tokens": 2**40}, "max_tokens", "between 1 and"),
        ("completions", {"prompt": "hi", "stop": "s" * 257}, "stop", "at most 256"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, "max_completion_tokens",
         "between 1 and"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "temperature": -0.5}, "temperature", "between 0 and 2"),
        ("completions", {"prompt": [[5, 6], [-1]]}, "prompt", "token ids"),
    ],
)  # fmt: skip
def test_bad_request_is_a_400_with_openais_error_body(base_url, path, body, param, fragment):
    body = {"model": MODEL, **body}
    r = httpx.post(f"{base_url}/v1/{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"], error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'{"model": NaN}'])
def test_malformed_json_is_a_400_and_the_server_keeps_serving(base_url, client, content):
    r = httpx.post(f"{base_url}/v1/completions", content=content,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"frobnicate": 1})
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text


@pytest.mark.parametrize(
    "path,raw,param",
    [
        ("completions", '"prompt": "\\ud800"', "prompt"),
        ("completions", '"prompt": ["ok", "a\\udfffb"]', "prompt[1]"),
        ("chat/completions", '"messages": [{"role": "user", "content": "x\\ud800"}]',
         "messages[0].content"),
        ("chat/completions", '"messages": [{"role": "user", "content": [{"type": "text", '
         '"text": "\\udc00"}]}]', "messages[0].content[0].text"),
        ("completions", '"prompt": "hi", "stop": ["\\ud83d"]', "stop[0]"),
        ("completions", '"prompt": "hi", "metadata": {"\\ud800": "x"}', "metadata"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_naming_the_field(base_url, client, path, raw, param):
    body = f'{{"model": "{MODEL}", {raw}}}'.encode()
    assert b"\\ud" in body  # the JSON escape itself: no Python string can encode it
    r = httpx.post(f"{base_url}/v1/{path}", content=body,
                   headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"], error
    # A surrogate pair is one valid character (U+1F600).
    pair = json.dumps({"model": MODEL, "prompt": "\U0001f600", "max_tokens": 2})
    assert "\\ud83d\\ude00" in pair
    r = httpx.post(f"{base_url}/v1/completions", content=pair.encode(),
                   headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("depth", [65, 900, 100_000])
def test_a_deeply_nested_body_is_a_400_and_the_server_keeps_serving(base_url, client, depth):
    body = (f'{{"model": "{MODEL}", "prompt": "hi", "metadata": {{"a": ' + "[" * depth
            + "]" * depth + "}}")  # fmt: skip
    r = httpx.post(f"{base_url}/v1/completions", content=body.encode(),
                   headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and "nested more than 64 levels" in error["message"]
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text


def test_a_body_over_the_limit_is_a_413(base_url, client, monkeypatch):
    from jquant.serve import protocol

    monkeypatch.setattr(protocol, "MAX_BODY_BYTES", 1000)
    body = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    chunks = [body[i : i + 100] for i in range(0, len(body), 100)]
    for content in (body, iter(chunks)):  # with a Content-Length, then chunked without one
        r = httpx.post(f"{base_url}/v1/completions", content=content,
                       headers={"content-type": "application/json"}, timeout=30)  # fmt: skip
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text


def test_a_request_failing_in_the_engine_is_a_500_and_the_others_are_served(
    base_url, client, engine, monkeypatch
):
    """One request whose prefill raises in the engine's thread: HTTP 500 (streamed: an error
    event, then [DONE]); the engine keeps serving the next requests."""
    _wait_idle(engine)
    prefill = engine.runner.prefill
    marker = [7, 7, 7, 7]

    def failing_prefill(tables, chunks, starts, sampling, *rest, **kw):
        if any(list(c[:4]) == marker for c in chunks):
            raise RuntimeError("planted failure")
        return prefill(tables, chunks, starts, sampling, *rest, **kw)

    monkeypatch.setattr(engine.runner, "prefill", failing_prefill)
    body = {"model": MODEL, "prompt": [*marker, 5], "max_tokens": 4}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and "planted failure" in error["message"]
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True},
                      timeout=30) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert "planted failure" in json.loads(lines[0][len("data: "):])["error"]["message"]
    assert lines[-1] == "data: [DONE]"
    assert engine.error is None and httpx.get(f"{base_url}/health").status_code == 200
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_unknown_url_is_an_openai_404(base_url):
    r = httpx.post(f"{base_url}/v1/embeddings", json={})
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (POST " \
        "/v1/embeddings)"  # fmt: skip


def test_client_disconnect_mid_stream_frees_the_slot(base_url, engine, monkeypatch):
    _wait_idle(engine)
    # The engine decodes text after every token: hold it there from the third token until
    # the server has cancelled the request, so the request cannot end on its own first.
    gate, cancelled = threading.Event(), []
    decode, cancel = engine.tokenizer.decode, engine.cancel

    def held_decode(ids, **kwargs):
        if len(ids) > 2:
            gate.wait(30)
        return decode(ids, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", held_decode)
    monkeypatch.setattr(engine, "cancel", lambda rid: (cancelled.append(rid), cancel(rid)))
    before = engine.metrics()["generated_tokens_total"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "ignore_eos": True}  # fmt: skip
    try:
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # the role chunk
            metrics = engine.metrics()
            assert metrics["active_slots"] + metrics["queue_depth"] == 1
        deadline = time.monotonic() + 10
        while not cancelled:
            assert time.monotonic() < deadline, "the server did not cancel the request"
            time.sleep(0.01)
    finally:
        gate.set()
    _wait_idle(engine)
    assert len(cancelled) == 1
    assert engine.metrics()["generated_tokens_total"] - before <= 4


def test_32_concurrent_streams_equal_their_single_greedy_outputs(base_url, engine):
    prompts = [f"hello {i} world" * (1 + i % 3) for i in range(32)]
    want = [_greedy(engine, engine.tokenizer.encode(p, add_special_tokens=False), 8,
                    ignore_eos=True).text for p in prompts]  # fmt: skip

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})  # fmt: skip
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:  # fmt: skip
            return await asyncio.gather(*(one(client, p) for p in prompts))

    assert len(set(want)) > 24  # distinct outputs, so a mix-up would show
    assert asyncio.run(main()) == want
    _wait_idle(engine)


def test_cli_serve_answers_over_http(tiny_model, capsys, monkeypatch):
    import uvicorn

    from jquant.cli import main

    servers, status = [], []
    init = uvicorn.Server.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        servers.append(self)

    monkeypatch.setattr(uvicorn.Server, "__init__", record)
    argv = ["serve", tiny_model, "--port", "0", "--max-slots", "2", "--max-context", "64",
            "--prefill-chunk", "16", "--served-model-name", "tiny"]  # fmt: skip
    thread = threading.Thread(target=lambda: status.append(main(argv)), daemon=True)
    thread.start()
    out, deadline = "", time.monotonic() + 120
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, capsys.readouterr()
        time.sleep(0.05)
    out = capsys.readouterr().out
    (line,) = out.splitlines()
    url = line.split(" at ", 1)[1].split()[0]
    assert line.startswith("jquant serve: tiny at http://127.0.0.1:") and url.endswith("/v1")
    assert re.search(r"\((\d+) programs compiled in [\d.]+ s\)$", line), line
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="hello", max_tokens=3,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert r.usage.completion_tokens == 3
    servers[0].should_exit = True
    thread.join(timeout=60)
    assert status == [0]


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--mesh", "dp=2"], "--mesh 'dp=2': expected tp=N"),
        (["--mesh", "tp=0"], "expected tp=N with N >= 1"),
        (["--mesh", "tp=2,dp=1"], "expected tp=N"),
        (["--mesh", "tp=64"], "tp=64 needs 64 devices"),  # checked before the model loads
        (["--mesh", "tp=2,ep=64"], "tp=2,ep=64 needs 128 devices"),
        (["--port", "70000"], "--port 70000 is not a TCP port"),
        (["--recipe", "no-such-recipe"], "no-such-recipe"),
        (["--coordinator", "127.0.0.1:1"], "--coordinator given alone"),
        (["--speculative-ngram", "4", "--ngram-min", "3", "--ngram-max", "2"],
         "--ngram-min 3 must be <= --ngram-max 2"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
         "expected HOST:PORT"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id 2 is out of range"),
    ],
)
def test_cli_serve_bad_arguments_are_one_line_errors(capsys, tmp_path, extra, expected):
    from jquant.cli import main

    assert main(["serve", str(tmp_path / "missing.gguf"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jquant serve: error: ") and expected in err and err.count("\n") == 1


def test_cli_serve_kv_cache_choices(capsys):
    from jquant.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "m", "--kv-cache", "int4"])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--max-queue", "-1", "must be >= 0"),
        ("--request-timeout", "0", "must be > 0"),
        ("--shutdown-grace", "-1", "must be >= 0"),
        ("--shutdown-grace", "nan", "must be >= 0"),
    ],
)
def test_cli_serve_limit_flags_are_checked(capsys, flag, value, expected):
    from jquant.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "m", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}: {expected}" in err, err


@pytest.mark.slow
def test_smollm2_chat_over_http():
    """The real SmolLM2-135M-Instruct: its tokenizer, chat template and EOS."""
    import uvicorn

    model, params, tokenizer = models.load("smollm2-135m")
    engine = Engine(model, params, tokenizer, max_slots=2, max_context=256, prefill_chunk=64)
    engine.start()
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "smollm2"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                               api_key="x", max_retries=0, timeout=120)  # fmt: skip
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=40)  # fmt: skip
        want = _greedy(engine, _chat_ids(engine, messages), 40)
        assert r.choices[0].message.content == want.text and "Paris" in want.text
        assert r.choices[0].finish_reason == "stop"  # <|im_end|>, not in the text
        assert "<|im_end|>" not in want.text
        chunks = client.chat.completions.create(model="smollm2", messages=messages,
                                                temperature=0, max_tokens=40, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.close()
