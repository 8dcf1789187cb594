"""Structured output (``response_format``, `jquant.serve.grammar`) through the engine and the
OpenAI-compatible server, driven by the official `openai` client.

Every output is judged by references of its own: ``json.loads``, the `jsonschema` package,
and an llguidance matcher built here from the schema alone (llguidance's default JSON
options, its own tokenizer of the model's `tokenizers` JSON); greedy decoding under a schema
is checked token for token against a NumPy loop over the uncached forward's logits, masked
by such a matcher.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import httpx
import jsonschema
import llguidance as llg
import numpy as np
import openai
import pytest

from jquant import models
from jquant.serve.engine import Engine, SamplingParams
from jquant.serve.grammar import response_format_grammar
from jquant.serve.server import create_app

MODEL = "tiny-llama"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "rank": {"type": "integer", "enum": [1, 2, 3]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "rank", "tags"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "card", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a card as JSON."}]
#: How the server writes JSON (docs/serving.md): one space after ':' and ',', no other
#: whitespace. The checks accept any whitespace (llguidance's default); the greedy reference
#: must choose among the same tokens as the server.
SERVER_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return models.load(tiny_model)


@pytest.fixture(scope="module")
def engine(loaded):
    with Engine(*loaded, max_slots=4, max_context=256, prefill_chunk=32) as engine:
        yield engine


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
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120)


def _ll_tokenizer(tokenizer, vocab_size: int, eos: int):
    return llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)


def _matcher(ll_tokenizer, schema: dict, options: dict | None = None):
    """A matcher of ``schema`` made here, with llguidance's default JSON options (any
    whitespace) unless ``options``."""
    grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    return llg.LLMatcher(ll_tokenizer, grammar, log_level=0)


def _check(text: str, ids: list[int], ll_tokenizer, schema: dict = SCHEMA) -> None:
    """``text`` is JSON valid under ``schema``, and a fresh matcher accepts ``ids``."""
    jsonschema.validate(json.loads(text), schema)
    m = _matcher(ll_tokenizer, schema)
    assert m.consume_tokens(ids), m.get_error()
    assert m.is_accepting()


def _grammar(schema: dict = SCHEMA) -> str:
    return response_format_grammar({"type": "json_schema", "json_schema": {
        "name": "t", "schema": schema}})  # fmt: skip


def _bits(matcher, vocab: int) -> np.ndarray:
    """The tokens ``matcher`` allows next, (vocab,) bool, from its own bitmask bytes."""
    raw = np.frombuffer(matcher.compute_bitmask(), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:vocab].astype(bool)


def _reference_greedy(loaded, prompt: list[int], schema: dict, n: int) -> tuple[list, bool]:
    """Greedy under ``schema`` in NumPy: the uncached forward's logits, ``-inf`` where a fresh
    matcher forbids, argmax; until the matcher is complete, EOS or ``n`` tokens. Returns the
    tokens and whether the grammar was complete (EOS or nothing more allowed)."""
    model, params, tokenizer = loaded
    vocab, eos = model.config.vocab_size, model.config.eos_token_ids[0]
    m = _matcher(_ll_tokenizer(tokenizer, vocab, eos), schema, SERVER_JSON)
    out: list[int] = []
    while len(out) < n:
        seq = prompt + out
        tokens = np.zeros((1, 256), np.int32)  # one compiled shape; causal, so padding is inert
        tokens[0, : len(seq)] = seq
        logits = np.asarray(models.forward(model, params, tokens)[0][0, len(seq) - 1], np.float32)
        token = int(np.argmax(np.where(_bits(m, vocab), logits, -np.inf)))
        if token == eos:
            return out, True
        assert m.consume_token(token)
        out.append(token)
        if m.is_stopped():
            return out, True
    return out, False


def _submit_all(engine, jobs) -> list:
    """``(prompt, params)`` jobs queued at once (`Engine.submit_many`: one batch); their
    outputs, whole."""
    parts = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def collect(i, out):
        parts[i].append(out)
        if out.finish_reason is not None:
            done.release()

    engine.submit_many([(p, s, lambda out, i=i: collect(i, out)) for i, (p, s) in
                        enumerate(jobs)])  # fmt: skip
    for _ in jobs:
        assert done.acquire(timeout=120)
    return [("".join(o.text for o in ps), [t for o in ps for t in o.token_ids],
             ps[-1].finish_reason, ps[-1].error) for ps in parts]  # fmt: skip


PROMPTS = ["hello world", "hell", "or what", "world hello hello"]


@pytest.mark.parametrize("schema,n", [(SCHEMA, 150), ({"type": "object"}, 40)],
                         ids=["schema", "json_object"])  # fmt: skip
def test_greedy_under_a_schema_equals_the_numpy_reference(loaded, engine, schema, n):
    tokenizer = loaded[2]
    ll = _ll_tokenizer(tokenizer, engine.vocab_size, 2)
    params = SamplingParams(max_tokens=n, temperature=0, grammar=_grammar(schema))
    jobs = [(tokenizer.encode(p), params) for p in PROMPTS]
    complete = 0
    for (prompt, _), (text, ids, reason, error) in zip(jobs, _submit_all(engine, jobs)):
        ref, done = _reference_greedy(loaded, prompt, schema, n)
        assert error is None and ids == ref, (text, error)
        assert reason == ("stop" if done else "length")
        if done:
            _check(text, ids, ll, schema)
            complete += 1
    if schema is SCHEMA:  # bounded: the random model completes every one (a free object not)
        assert complete == len(PROMPTS)


def test_unconstrained_rows_are_unchanged_beside_constrained_ones(loaded, engine):
    tokenizer = loaded[2]
    ll = _ll_tokenizer(tokenizer, engine.vocab_size, 2)
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = _submit_all(engine, [(tokenizer.encode(p), free) for p in PROMPTS[:2]])
    programs = list(engine.runner.programs)
    constrained = [SamplingParams(max_tokens=120, temperature=t, seed=7, grammar=_grammar())
                   for t in (0.0, 1.0)]  # fmt: skip
    jobs = [(tokenizer.encode(PROMPTS[0]), free), (tokenizer.encode(PROMPTS[2]), constrained[0]),
            (tokenizer.encode(PROMPTS[1]), free), (tokenizer.encode(PROMPTS[3]), constrained[1])]
    mixed = _submit_all(engine, jobs)
    assert [mixed[0][1], mixed[2][1]] == [alone[0][1], alone[1][1]]  # token for token
    for text, ids, reason, error in (mixed[1], mixed[3]):
        assert error is None and reason == "stop", (text, error)
        _check(text, ids, ll)
    assert engine.runner.programs == programs  # a bitmask compiles no program of its own


def test_chat_json_schema_over_http(client, loaded):
    tokenizer = loaded[2]
    ll = _ll_tokenizer(tokenizer, loaded[0].config.vocab_size, 2)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format=FORMAT,
                                       n=3, temperature=1.0, seed=11, max_tokens=150)
    assert len(r.choices) == 3
    for choice in r.choices:
        text = choice.message.content
        assert choice.finish_reason == "stop", text
        # The output's own token ids are checked in the engine tests; the text's tokens here.
        _check(text, tokenizer.encode(text, add_special_tokens=False), ll)
    chunks = client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                            response_format=FORMAT, temperature=0,
                                            max_tokens=150, stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(streamed), SCHEMA)


def test_json_object_and_completions_over_http(client, loaded, engine):
    tokenizer = loaded[2]
    ll = _ll_tokenizer(tokenizer, loaded[0].config.vocab_size, 2)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                       response_format={"type": "json_object"}, max_tokens=40)
    text = r.choices[0].message.content
    # Greedy, the engine's output for the chat prompt (the random model never closes this
    # object; the engine tests hold it to the NumPy reference).
    want = engine.generate(tokenizer.apply_chat_template(MESSAGES, tokenize=True),
                           SamplingParams(max_tokens=40, temperature=0,
                                          grammar=_grammar({"type": "object"})))  # fmt: skip
    assert text == want.text and r.choices[0].finish_reason == want.finish_reason
    m = _matcher(ll, {"type": "object"})
    assert text.startswith("{") and m.consume_tokens(want.token_ids), m.get_error()
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=150, temperature=0,
                                  extra_body={"response_format": FORMAT})  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0].text
    _check(r.choices[0].text, tokenizer.encode(r.choices[0].text, add_special_tokens=False), ll)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "text"})  # fmt: skip
    assert r.choices[0].finish_reason == "length"  # free text, as without response_format


def _format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize("response_format,param,fragment", [
    ({"type": "xml"}, "response_format.type", "expected one of 'text', 'json_object'"),
    ({"type": "json_schema"}, "response_format.json_schema", "Missing required parameter"),
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}},
     "response_format.json_schema.name", "Missing required parameter"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}},
     "response_format.json_schema.name", "1 to 64 characters"),
    ({"type": "json_schema", "json_schema": {"name": "s"}},
     "response_format.json_schema.schema", "Missing required parameter"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}},
     "response_format.json_schema.schema", "expected a JSON schema object"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": "yes"}},
     "response_format.json_schema.strict", "expected a boolean"),
    ({"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "extra": 1}},
     "response_format.json_schema.extra", "Unrecognized argument"),
    ({"type": "json_object", "json_schema": {}}, "response_format.json_schema",
     "Unrecognized argument"),
    (_format({"type": "banana"}), "response_format.json_schema.schema", "Invalid type: banana"),
    (_format({"not": {"type": "string"}}), "response_format.json_schema.schema",
     "Unimplemented keys: [\"not\"]"),
    (_format({"type": "string", "pattern": "("}), "response_format.json_schema.schema",
     "unclosed group"),
    (_format({"type": "string", "minLength": 5, "maxLength": 2}),
     "response_format.json_schema.schema", "Unsatisfiable schema"),
    (_format({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema",
     "does not exist"),
])  # fmt: skip
def test_bad_response_format_is_a_400_naming_it(base_url, engine, response_format, param,
                                                fragment):  # fmt: skip
    before = engine.metrics()["requests_total"]
    for path, body in (("chat/completions", {"messages": MESSAGES}), ("completions",
                                                                      {"prompt": "hi"})):
        r = httpx.post(f"{base_url}/v1/{path}", timeout=30, json={
            "model": MODEL, "response_format": response_format, **body})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and fragment in error["message"], error
    assert engine.metrics()["requests_total"] == before  # refused before queueing


def test_a_response_format_of_the_wrong_type_is_a_400(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": MESSAGES, "response_format": "json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_without_llguidance_the_400_names_the_extra(base_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance: ImportError
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": MESSAGES, "response_format": FORMAT})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format"
    assert "pip install 'jquant[structured]'" in error["message"], error


def test_a_token_the_grammar_refuses_ends_its_request_alone(loaded, engine, monkeypatch):
    """With the bitmask switched off, greedy picks a token the grammar refuses: the request
    ends with an error naming it, the one beside it finishes, and the engine serves on."""
    tokenizer = loaded[2]
    prompt = tokenizer.encode(PROMPTS[0])
    free = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = engine.generate(prompt, free).token_ids[0]
    ll = _ll_tokenizer(tokenizer, engine.vocab_size, 2)
    assert not _bits(_matcher(ll, SCHEMA), engine.vocab_size)[first]  # the premise
    monkeypatch.setattr(engine.grammars, "bitmask", lambda rows, matchers: None)
    bad, good = _submit_all(engine, [
        (prompt, SamplingParams(max_tokens=8, temperature=0, grammar=_grammar())),
        (prompt, free)])  # fmt: skip
    assert bad[2] == "error" and f"the grammar refused token {first}" in bad[3], bad
    assert good[2] == "length" and good[3] is None
    monkeypatch.undo()
    assert engine.error is None
    text, ids, reason, _ = _submit_all(engine, [(prompt, SamplingParams(
        max_tokens=120, temperature=0, grammar=_grammar()))])[0]  # fmt: skip
    assert reason == "stop"
    _check(text, ids, ll)


def test_the_adapter_sees_each_tokens_bytes_as_tokenizers_decodes_them(loaded, engine):
    """llguidance's bytes of every token sequence decode to the text `tokenizers` decodes."""
    tokenizer = loaded[2]
    ll = engine.grammars.tokenizer
    # The control tokens, and byte 0xFF: llguidance's marker of special tokens, never in UTF-8.
    special = {0, 1, 2, tokenizer.token_to_id("ÿ")}
    rng = np.random.default_rng(0)
    ordinary = [i for i in range(tokenizer.vocab_size) if i not in special]
    assert [i for i in range(tokenizer.vocab_size) if ll.is_special_token(i)] == sorted(special)
    for _ in range(200):
        ids = [int(i) for i in rng.choice(ordinary, rng.integers(1, 8))]
        got = ll.decode_bytes(ids).decode("utf-8", errors="replace")
        assert got == tokenizer.decode(ids), ids
    assert ll.vocab_size == engine.vocab_size and ll.eos_tokens == [2]


def test_the_adapter_reads_a_sentencepiece_vocabulary():
    """A GGUF SentencePiece tokenizer (byte pieces, ``▁`` for spaces): llguidance's bytes are
    what `tokenizers` decodes, bar the one prefix space its decoder strips."""
    from jquant.io.tokenizer import tokenizer_from_gguf_fields
    from jquant.serve.grammar import Grammars

    pieces = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + ["▁", "▁a", "b", "▁ab", "{", "}", '"', "é", "ab"])  # fmt: skip
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
              "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * 9,
              "tokenizer.ggml.scores": [-float(i) for i in range(len(pieces))],
              "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}  # fmt: skip
    tokenizer = tokenizer_from_gguf_fields(fields)
    ll = Grammars(tokenizer, len(pieces) + 5, [2]).tokenizer  # a padded embedding table
    for text in ["ab", "{ab é}", "\"\n\"", "ab ab  b"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        got = ll.decode_bytes(ids).decode("utf-8")
        assert got.removeprefix(" ") == tokenizer.decode(ids) == text.removeprefix(" ")
    m = llg.LLMatcher(ll, _grammar({"type": "string", "maxLength": 3}), log_level=0)
    bits = _bits(m, len(pieces) + 5)
    assert bits[pieces.index('"')] and not bits[pieces.index("{")]
    assert not bits[len(pieces):].any()  # ids past the tokenizer's are never allowed


@pytest.mark.slow
def test_smollm2_greedy_json_schema_over_http():
    """The real SmolLM2-135M-Instruct, greedy, under a schema: valid JSON, ended by the
    grammar."""
    import uvicorn

    model, params, tokenizer = models.load("smollm2-135m")
    engine = Engine(model, params, tokenizer, max_slots=2, max_context=512, prefill_chunk=128)
    engine.start()
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "smollm2"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    schema = {"type": "object", "properties": {
        "city": {"type": "string"}, "country": {"type": "string"},
        "population_millions": {"type": "integer"},
        "landmarks": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["city", "country", "population_millions", "landmarks"],
        "additionalProperties": False}  # fmt: skip
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                               api_key="x", max_retries=0, timeout=300)  # fmt: skip
        messages = [{"role": "user", "content": "Describe Paris as JSON."}]
        r = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=200, response_format={
                                               "type": "json_schema", "json_schema": {
                                                   "name": "city", "schema": schema}})
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, schema)
        ll = _ll_tokenizer(tokenizer, model.config.vocab_size, tokenizer.eos_token_id)
        _check(text, tokenizer.encode(text, add_special_tokens=False), ll, schema)
        assert "Paris" in value["city"]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.close()
