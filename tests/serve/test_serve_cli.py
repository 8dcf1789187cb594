"""`jquant serve` as users run it: a real process, the official `openai` client, and
`jquant generate` as the reference; and the engine's memory over 500 requests."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc

import openai
import pytest

from jquant.cli import main

PROMPT = "Explain what a Python decorator is."
RAW = "The three primary colors are"


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "jquant.cli", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    line = proc.stdout.readline()  # printed once the engine is compiled and the port bound
    match = re.search(r"at (http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"jquant serve did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(1)


def _generate(capsys, *args) -> dict:
    assert main(["generate", "smollm2-135m", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_openai_client_against_jquant_serve_equals_jquant_generate(capsys):
    proc, url = _start(["smollm2-135m", "--max-slots", "2", "--max-context", "256",
                        "--prefill-chunk", "32"])
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]

        want = _generate(capsys, "--prompt", PROMPT, "--max-new-tokens", "32")
        chat = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}],
            max_tokens=32, temperature=0)  # fmt: skip
        assert chat.choices[0].message.content == want["text"]
        assert chat.usage.completion_tokens == len(want["tokens"])

        stream = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": PROMPT}],
            max_tokens=32, temperature=0, stream=True)  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want["text"]

        raw = _generate(capsys, "--prompt", RAW, "--raw", "--max-new-tokens", "16")
        done = client.completions.create(model="smollm2-135m", prompt=RAW, max_tokens=16,
                                         temperature=0)  # fmt: skip
        assert done.choices[0].text == raw["text"]
        pieces = client.completions.create(model="smollm2-135m", prompt=RAW, max_tokens=16,
                                           temperature=0, stream=True)  # fmt: skip
        assert "".join(p.choices[0].text for p in pieces) == raw["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_memory_does_not_grow_over_500_sequential_requests(tiny_model):
    """Python heap of the engine + server after 100 requests, then after 500 more: a request
    that left anything behind (its prompt alone is ~7 kB) would add megabytes."""
    import socket

    import uvicorn

    from jquant import models
    from jquant.serve.engine import Engine
    from jquant.serve.server import create_app

    model, params, tokenizer = models.load(tiny_model)
    engine = Engine(model, params, tokenizer, max_slots=2, max_context=256, prefill_chunk=64)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1",
                           api_key="x", max_retries=0, timeout=60)  # fmt: skip
    prompt = "hello world " * 30  # 180 tokens of the byte-level tiny tokenizer

    def run(n):
        for i in range(n):
            stream = i % 2 == 1
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3,
                                          temperature=0, stream=stream)  # fmt: skip
            list(r) if stream else r  # noqa: B018

    try:
        run(50)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        run(500)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        assert grown < 1_000_000, f"the heap grew by {grown} bytes over 500 requests"
        m = engine.metrics()
        assert m["active_slots"] == 0 and m["requests_total"] == 550
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.close()
