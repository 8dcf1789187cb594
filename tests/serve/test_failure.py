"""The server under bad requests, load and shutdown: every request is answered (served, or
refused with an error) within seconds, and the engine keeps serving.

The tiny random Llama of conftest.py behind the real `Engine` and uvicorn (`Server`, as
``jquant serve`` runs it), driven over real HTTP by httpx. A slowed tokenizer decode keeps
requests running for as long as a test needs them to.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time

import httpx
import pytest

from jquant import models
from jquant.serve import engine as engine_module
from jquant.serve.engine import Engine, QueueFull, SamplingParams
from jquant.serve.server import Server, create_app

MODEL = "tiny-llama"
SLOTS, QUEUE = 4, 8


def _serve(engine, grace: float = 5.0):
    """``engine`` served by `Server` on a free port: (server, its thread, base URL)."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(engine, MODEL), log_level="warning")
    server = Server(config, engine, grace)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return models.load(tiny_model)


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(*loaded, max_slots=SLOTS, max_context=256, prefill_chunk=32,
                    max_queue=QUEUE)  # fmt: skip
    engine.start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def base_url(engine):
    server, thread, url = _serve(engine)
    yield url
    server.should_exit = True
    thread.join(timeout=30)


def _slow_decode(monkeypatch, engine, seconds: float) -> None:
    """Every token the engine accepts takes ``seconds`` longer (the tokenizer's decode)."""
    decode = engine.tokenizer.decode

    def slow(ids, **kwargs):
        time.sleep(seconds)
        return decode(ids, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "decode", slow)


def _wait_idle(engine, timeout=30.0):
    deadline = time.monotonic() + timeout
    while engine.metrics()["active_slots"] or engine.metrics()["queue_depth"]:
        assert time.monotonic() < deadline, f"slots still busy: {engine.metrics()}"
        time.sleep(0.02)


def _events(lines) -> list[dict | str]:
    return [json.loads(x[6:]) if x != "data: [DONE]" else x for x in lines if x]


# ---- load ------------------------------------------------------------------------------


def test_300_concurrent_requests_are_served_or_refused_with_429(base_url, engine, monkeypatch):
    """300 requests at once against 4 slots and a queue of 8: each is answered, 200 or 429
    with Retry-After, none waits past the test's timeout; the engine never holds more than
    slots + queue requests."""
    _wait_idle(engine)
    _slow_decode(monkeypatch, engine, 0.01)
    held, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            m = engine.metrics()
            held.append(m["active_slots"] + m["queue_depth"])
            time.sleep(0.005)

    async def one(client, i):
        body = {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 4, "ignore_eos": True}
        return await client.post("/v1/completions", json=body)

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(300))), 120)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        answers = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, [r.text for r in answers if r.status_code not in (200, 429)]
    assert codes.count(200) >= SLOTS and codes.count(429) > 0, codes
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert error["code"] == "queue_full" and set(error) == {"message", "type", "param",
                                                                    "code"}  # fmt: skip
        else:
            assert r.json()["usage"]["completion_tokens"] == 4
    assert max(held) <= SLOTS + QUEUE
    _wait_idle(engine)


def test_one_request_counts_prompts_times_n_against_the_bound(base_url, engine):
    """A request of more completions than slots + queue could never be queued: a 400 naming
    the limit; one that fits is served whole."""
    too_many = [
        ({"prompt": ["a"] * (SLOTS + QUEUE + 1)}, "prompt"),
        ({"prompt": ["a", "b", "c", "d"], "n": SLOTS}, "n"),  # 16 > 12
    ]
    for extra, param in too_many:
        r = httpx.post(f"{base_url}/v1/completions", timeout=30,
                       json={"model": MODEL, "max_tokens": 2, **extra})  # fmt: skip
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "too_many_completions"
        assert f"at most {SLOTS + QUEUE} per request" in error["message"], error
    r = httpx.post(f"{base_url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": ["a", "b", "c"], "n": SLOTS,
                         "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200 and len(r.json()["choices"]) == 12


def test_submit_many_is_all_or_none(engine, monkeypatch):
    """A group that does not fit beside the requests held raises QueueFull and queues none."""
    _wait_idle(engine)
    _slow_decode(monkeypatch, engine, 0.02)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    ids = engine.submit_many([([5, 6], long, lambda out: None)] * (SLOTS + QUEUE - 2))
    with pytest.raises(QueueFull, match="try again later"):
        engine.submit_many([([5, 6], long, lambda out: None)] * 3)
    m = engine.metrics()
    assert m["active_slots"] + m["queue_depth"] == SLOTS + QUEUE - 2
    for rid in ids:
        engine.cancel(rid)
    _wait_idle(engine)


# ---- time limits -----------------------------------------------------------------------


def test_request_timeout_ends_running_and_waiting_requests(base_url, engine, monkeypatch):
    """Past the engine's request_timeout a request ends with an error: a 504, or for a
    stream an error event then [DONE]; those waiting for a slot too."""
    _wait_idle(engine)
    _slow_decode(monkeypatch, engine, 0.05)
    monkeypatch.setattr(engine, "request_timeout", 1.0)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 200, "ignore_eos": True}

    async def stream(client):
        async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            return r.status_code, [line async for line in r.aiter_lines()]

    async def main():
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            start = time.monotonic()
            # 6 streams and one plain request: 4 run, 3 wait for a slot.
            answers = await asyncio.gather(*(stream(client) for _ in range(6)),
                                           client.post("/v1/completions", json=body))
            return answers, time.monotonic() - start

    answers, took = asyncio.run(main())
    assert took < 6, took  # 200 tokens would take 10 s each, 20 s in all
    for status, lines in answers[:6]:
        events = _events(lines)
        assert status == 200 and events[-1] == "data: [DONE]", events
        error = events[-2]["error"]
        assert error["code"] == "request_timeout" and "request timeout (1 s)" in error["message"]
    plain = answers[6]
    assert plain.status_code == 504 and plain.json()["error"]["code"] == "request_timeout"
    assert engine.metrics()["timed_out_requests_total"] >= 7
    monkeypatch.undo()
    _wait_idle(engine)
    r = httpx.post(f"{base_url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- the engine thread survives --------------------------------------------------------


def test_a_huge_number_is_a_short_400(base_url):
    """A temperature of 10**400 (valid JSON, no float): a 400 naming the field, its message
    not thousands of digits long."""
    body = f'{{"model": "{MODEL}", "prompt": "hi", "temperature": 1{"0" * 4000}}}'
    r = httpx.post(f"{base_url}/v1/completions", content=body.encode(), timeout=30,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "temperature" and len(error["message"]) < 200, error


def test_a_decode_row_that_cannot_be_written_fails_its_request_alone(engine, monkeypatch):
    """A request whose sampling row raises at a decode step (planted: a top_k that converts
    for the prefill, then raises once its first token is out) fails alone; the one decoding
    beside it goes on."""
    _wait_idle(engine)

    class Armed:  # an integer to numpy until armed
        armed = False

        def __index__(self):
            if Armed.armed:
                raise OverflowError("planted: top_k does not fit")
            return 20

        __int__ = __index__

    monkeypatch.setattr(engine, "check", lambda prompt, params: None)
    _slow_decode(monkeypatch, engine, 0.01)
    outs = {"ok": [], "bad": []}
    done = {k: threading.Event() for k in outs}

    def on(key):
        def callback(out):
            outs[key].append(out)
            Armed.armed |= key == "bad"
            if out.finish_reason:
                done[key].set()
        return callback

    engine.submit([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
                  on("ok"))  # fmt: skip
    engine.submit([5, 6, 8], SamplingParams(max_tokens=30, temperature=1.0, top_k=Armed(),
                                            ignore_eos=True), on("bad"))  # fmt: skip
    assert done["bad"].wait(30) and done["ok"].wait(30)
    bad, ok = outs["bad"][-1], outs["ok"][-1]
    assert bad.finish_reason == "error" and "planted" in bad.error, bad
    assert bad.error_code == "engine_error"
    assert ok.finish_reason == "length" and ok.completion_tokens == 30, ok
    assert engine.error is None


def test_an_unexpected_exception_is_a_500_and_the_connection_stays_open(base_url, monkeypatch):
    """An exception of the server's own (planted: the prompt's encoding raises TypeError) is
    one HTTP 500 in OpenAI's error shape, and the same keep-alive connection serves the next
    request."""
    from jquant.serve import server

    encode = server._encode

    def failing(engine, text):
        if text == "boom":
            raise TypeError("planted tokenizer failure")
        return encode(engine, text)

    monkeypatch.setattr(server, "_encode", failing)
    host, port = base_url.removeprefix("http://").split(":")

    def request(sock, prompt: str) -> tuple[int, dict]:
        body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 2}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection: {data!r}"
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection mid-body"
            rest += chunk
        return int(head.split()[1]), json.loads(rest)

    with socket.create_connection((host, int(port)), timeout=30) as sock:
        status, body = request(sock, "boom")
        assert status == 500 and body["error"]["type"] == "server_error", body
        assert "planted tokenizer failure" in body["error"]["message"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
        status, body = request(sock, "hello")  # the same connection
        assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_recent_decode_steps_are_bounded_without_metrics_scrapes(engine, monkeypatch):
    """The tokens/s window keeps at most RECENT_STEPS decode steps however many run, so memory
    stays flat whether /metrics is scraped or not."""
    _wait_idle(engine)
    steps = 0
    while steps < engine_module.RECENT_STEPS + 100:  # one request at a time: one step a token
        out = engine.generate([5, 6], SamplingParams(max_tokens=250, temperature=0,
                                                     ignore_eos=True))  # fmt: skip
        steps += out.completion_tokens - 1  # the first token comes from the prefill
    assert len(engine._recent) <= engine_module.RECENT_STEPS < steps
    assert engine.metrics()["tokens_per_second"] > 0


# ---- shutdown --------------------------------------------------------------------------


def test_submit_racing_close_is_refused_or_answered(loaded, monkeypatch):
    """A submit that has passed its running check when `close` starts: close waits for it to
    be queued and ends it (before the fix it was queued after close's last look, and waited
    forever). No request reaches the model, so nothing is compiled."""
    engine = Engine(*loaded, max_slots=1, max_context=16, prefill_chunk=16)
    monkeypatch.setattr(engine.runner, "compile", lambda: 0.0)
    engine.start()
    inside, release = threading.Event(), threading.Event()
    ids = engine._ids

    class SlowIds:  # the request id is drawn between the check and the enqueue
        def __next__(self):
            inside.set()
            release.wait(5)
            return next(ids)

    engine._ids = SlowIds()
    outs, raised = [], []

    def submit():
        try:
            engine.submit([5, 6], SamplingParams(max_tokens=4), outs.append)
        except RuntimeError as e:
            raised.append(e)

    submitter = threading.Thread(target=submit)
    submitter.start()
    assert inside.wait(30)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.5)
    release.set()
    submitter.join(30)
    closer.join(30)
    assert not closer.is_alive()
    assert raised or (outs and outs[-1].finish_reason is not None), (outs, raised)
    if outs:
        assert outs[-1].finish_reason == "error" and outs[-1].error_code == "shutdown"


def test_sigterm_ends_queued_streams_at_once_and_running_ones_within_the_grace(loaded,
                                                                              monkeypatch):
    """SIGTERM (uvicorn's handler, `Server.handle_exit`) during 6 streams and a plain request
    on 2 slots: the 4 queued streams get an error event at once and the queued plain request
    a 503, the 2 running streams an error event within the grace period, each stream then
    [DONE]; new connections are refused and the server exits."""
    grace = 2.0
    engine = Engine(*loaded, max_slots=2, max_context=64, prefill_chunk=16)
    server, thread, url = _serve(engine, grace)
    _slow_decode(monkeypatch, engine, 0.1)  # the rest of the context: over 6 s a stream
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
            "stream": True}  # fmt: skip
    ended: dict[int, float] = {}
    lines: dict[int, list[str]] = {}
    opened = threading.Barrier(7)

    def stream(i):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            lines[i] = [next(it)]  # the role chunk: the request is in the engine
            opened.wait(30)
            lines[i] += list(it)
        ended[i] = time.monotonic()

    def plain():
        plain_answer.append(httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                       json={**body, "stream": False}))  # fmt: skip
        ended[6] = time.monotonic()

    plain_answer: list[httpx.Response] = []
    try:
        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(6)]
        for t in threads:
            t.start()
        opened.wait(30)
        threads.append(threading.Thread(target=plain, daemon=True))
        threads[-1].start()
        deadline = time.monotonic() + 30
        # All 7 submitted (a preempted stream can also make the queue 5 deep), 2 decoding.
        while (engine.metrics()["requests_total"] < 7 or engine.metrics()["queue_depth"] < 5
               or len(engine._running) < 2 or any(not r.generated for r in engine._running)):
            assert time.monotonic() < deadline, engine.metrics()
            time.sleep(0.01)
        signalled = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        for t in threads:
            t.join(grace + 10)
        thread.join(10)
        assert not thread.is_alive(), "the server did not exit"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        server.should_exit = True
        engine.close()
    assert ended[6] - signalled < 1.0 and plain_answer[0].status_code == 503
    assert plain_answer[0].json()["error"]["code"] == "engine_unavailable"
    took = sorted(ended[i] - signalled for i in range(6))
    assert len(took) == 6 and max(took[:4]) < 1.0 and max(took) < grace + 1.5, took
    assert min(took[4:]) > grace - 0.5, took  # the running ones ran on through the grace
    messages = []
    for i in range(6):
        events = _events(lines[i])
        assert events[-1] == "data: [DONE]", events[-3:]
        error = events[-2]["error"]
        assert error["code"] == "engine_unavailable", error
        messages.append(error["message"])
    assert sum("is shutting down" in m for m in messages) == 4, messages
    assert sum("shut down before the request finished" in m for m in messages) == 2, messages
