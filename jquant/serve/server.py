"""An OpenAI-compatible HTTP server over a `jquant.serve.engine.Engine`.

    app = create_app(engine, "smollm2-135m")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` and ``GET /metrics`` (Prometheus text, ``jquant_*``).

Bodies follow OpenAI's API. Sampling: ``n`` (up to the engine's slots; choice ``i`` is
seeded ``seed + i``), ``max_tokens`` (``max_completion_tokens`` in chat), ``temperature``,
``top_p``, ``stop``, ``seed``, and vLLM's extensions ``top_k`` and ``ignore_eos``. Every bad
request is an HTTP 400 with OpenAI's error body, an unknown model included (OpenAI answers 404
there); see `jquant.serve.protocol`. A streaming client that disconnects has its engine
requests cancelled, so their slots free at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jquant.serve import protocol
from jquant.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

#: Seconds between checks that a non-streaming client is still connected.
_DISCONNECT_POLL_S = 0.5

#: Help text of the engine's metrics; any other numeric key is exported too.
_METRIC_HELP = {
    "active_slots": "Requests being decoded.",
    "queue_depth": "Requests waiting for a slot.",
    "kv_cache_used_tokens": "Tokens held in the KV cache.",
    "kv_cache_capacity_tokens": "Tokens the KV cache can hold.",
    "generated_tokens_total": "Completion tokens generated.",
    "prompt_tokens_total": "Prompt tokens prefilled.",
    "requests_total": "Requests submitted to the engine.",
    "tokens_per_second": "Recent decode throughput (tokens/s).",
}


def create_app(engine, model_name: str) -> FastAPI:
    """A FastAPI app serving ``engine`` under the model id ``model_name``.

    The app starts the engine (in a worker thread) when it starts; it does not close it.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await asyncio.to_thread(engine.start)
        yield

    app = FastAPI(title="jquant", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())
    registry, rejected = _registry(engine)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        rejected.labels(code=e.code or str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404
                   else str(e.detail))  # fmt: skip
        return JSONResponse(APIError(message, status=e.status_code).body(), e.status_code,
                            headers=getattr(e, "headers", None))  # fmt: skip

    @app.get("/health")
    async def health():
        error = getattr(engine, "error", None)
        if error is not None:
            return JSONResponse({"status": "error", "error": repr(error)}, status_code=503)
        return {"status": "ok"}

    def card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "jquant",
                "max_model_len": engine.max_context}  # fmt: skip

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id != model_name:
            raise APIError(f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found", status=404)  # fmt: skip
        return card()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        r = protocol.parse_body(await request.body(), CompletionRequest)
        _check_model(r, model_name)
        items = protocol.prompts(r.prompt, engine.tokenizer.vocab_size)
        encoded = await asyncio.to_thread(
            lambda: [_encode(engine, p) if isinstance(p, str) else list(p) for p in items]
        )
        max_tokens = 16 if r.max_tokens is None else r.max_tokens
        return await _respond(engine, request, r, encoded, max_tokens, model_name, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        r = protocol.parse_body(await request.body(), ChatCompletionRequest)
        _check_model(r, model_name)
        conversation = protocol.messages(r.messages)
        ids = await asyncio.to_thread(_chat_prompt, engine, conversation)
        max_tokens = r.max_tokens if r.max_completion_tokens is None else r.max_completion_tokens
        return await _respond(engine, request, r, [ids], max_tokens, model_name, chat=True)

    return app


def _registry(engine):
    """A per-app Prometheus registry exporting ``engine.metrics()``, and a counter of the
    requests refused (by error code)."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class EngineCollector:
        def collect(self):
            for key, value in engine.metrics().items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                doc = _METRIC_HELP.get(key, key.replace("_", " ") + ".")
                if key.endswith("_total"):
                    yield CounterMetricFamily(f"jquant_{key[: -len('_total')]}", doc, value=value)
                else:
                    yield GaugeMetricFamily(f"jquant_{key}", doc, value=value)

    registry = CollectorRegistry()
    registry.register(EngineCollector())
    rejected = Counter("jquant_rejected_requests", "HTTP requests refused, by error code.",
                       ["code"], registry=registry)  # fmt: skip
    return registry, rejected


def _check_model(r, model_name: str) -> None:
    if r.model != model_name:
        raise APIError(f"The model '{r.model}' does not exist or you do not have access to it. "
                       f"This server serves '{model_name}'.", param="model",
                       code="model_not_found")  # fmt: skip


def _encode(engine, text: str) -> list[int]:
    """A raw-text prompt: BOS exactly when the tokenizer's ``add_bos_token`` says."""
    from jquant.io.tokenizer import encode_prompt

    return encode_prompt(engine.tokenizer, text)


def _chat_prompt(engine, conversation: list[dict]) -> list[int]:
    import jinja2

    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError("This model has no chat template; use /v1/completions.",
                       param="messages", code="no_chat_template")  # fmt: skip
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    except (ValueError, jinja2.TemplateError) as e:
        raise APIError(f"Invalid 'messages': the chat template failed: {e}", param="messages",
                       code="invalid_value") from None  # fmt: skip
    # The template writes its own BOS ({{ bos_token }}): nothing is added.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _sampling(engine, r, prompts: list[list[int]], max_tokens: int | None, chat: bool):
    """One `SamplingParams` per choice, ``len(prompts) * n`` of them, prompt-major."""
    from jquant.serve.engine import SamplingParams

    n = 1 if r.n is None else r.n
    if not 1 <= n <= engine.max_slots:
        raise APIError(f"Invalid 'n': expected a value between 1 and {engine.max_slots} (the "
                       f"server's slots), got {n}.", param="n", code="invalid_value")  # fmt: skip
    protocol.check_number("temperature", r.temperature, 0.0, 2.0)
    protocol.check_number("top_p", r.top_p, 0.0, 1.0)
    if r.top_k is not None and r.top_k < -1:
        raise APIError(f"Invalid 'top_k': expected -1, 0 (off) or a positive count, got "
                       f"{r.top_k}.", param="top_k", code="invalid_value")  # fmt: skip
    max_name = "max_completion_tokens" if chat and r.max_completion_tokens is not None else (
        "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(f"Invalid '{max_name}': expected a value >= 1, got {max_tokens}.",
                       param=max_name, code="invalid_value")  # fmt: skip
    limit = engine.max_context
    where = "messages" if chat else "prompt"
    temperature = 1.0 if r.temperature is None else r.temperature
    top_p = 1.0 if r.top_p is None else r.top_p
    if top_p == 0.0:  # the limit of nucleus sampling: the most likely token
        temperature, top_p = 0.0, 1.0
    stop = protocol.stop_strings(r.stop)
    out = []
    for ids in prompts:
        if not ids:
            raise APIError(f"Invalid '{where}': the prompt is empty (0 tokens).", param=where,
                           code="invalid_value")  # fmt: skip
        tokens = max_tokens if max_tokens is not None else limit - len(ids)
        if len(ids) >= limit or len(ids) + tokens > limit:
            if max_tokens is None:
                asked, fix = f"{len(ids)} tokens in the {where}, leaving none to generate", ""
            else:
                asked = (f"{len(ids) + tokens} tokens ({len(ids)} in the {where}, {tokens} for "
                         "the completion)")  # fmt: skip
                fix = " or the completion"
            raise APIError(f"This model's maximum context length is {limit} tokens. However, "
                           f"you requested {asked}. Please reduce the length of the {where}"
                           f"{fix}.", param=where if len(ids) >= limit else max_name,
                           code="context_length_exceeded")  # fmt: skip
        for _ in range(n):
            out.append(SamplingParams(
                max_tokens=tokens, temperature=temperature, top_p=top_p, top_k=max(r.top_k or 0, 0),
                seed=None if r.seed is None else (r.seed + len(out)) % 2**32, stop=stop,
                ignore_eos=bool(r.ignore_eos),
            ))  # fmt: skip
    return n, out


class _Run:
    """The engine requests behind one HTTP request; their events arrive on one queue."""

    def __init__(self, engine, requests: list):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.finished = [False] * len(requests)
        try:
            for i, (prompt, params) in enumerate(requests):
                callback = functools.partial(self._on_output, i)
                self.ids.append(engine.submit(prompt, params, callback))
        except ValueError as e:
            self.cancel()
            raise APIError(str(e), code="invalid_value") from None
        except RuntimeError as e:  # the engine is not running
            self.cancel()
            raise APIError(str(e), status=503, type="server_error",
                           code="engine_unavailable") from None  # fmt: skip

    def _on_output(self, i: int, out) -> None:  # the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))

    @property
    def done(self) -> bool:
        return all(self.finished)

    async def next(self):
        """``(choice index, Output)`` of the next event."""
        i, out = await self.queue.get()
        if out.finish_reason is not None:
            self.finished[i] = True
        return i, out

    def cancel(self) -> None:
        """Cancels the requests not finished yet (idempotent)."""
        for i, request_id in enumerate(self.ids):
            if not self.finished[i]:
                self.finished[i] = True
                with contextlib.suppress(KeyError, ValueError):
                    self.engine.cancel(request_id)


async def _respond(engine, request: Request, r, prompts, max_tokens, model_name, *, chat: bool):
    """Submits the choices of a validated request and answers it, streamed or whole."""
    n, params = _sampling(engine, r, prompts, max_tokens, chat)
    requests = [(prompts[k // n], p) for k, p in enumerate(params)]
    prompt_tokens = sum(len(ids) for ids in prompts)
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    run = _Run(engine, requests)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_name}  # fmt: skip
    if r.stream:
        stream = _stream(run, head, len(requests), prompt_tokens, include_usage, chat)
        return _EngineStream(stream, run, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})  # fmt: skip
    texts, reasons, tokens = [""] * len(requests), [None] * len(requests), [0] * len(requests)
    try:
        while not run.done:
            try:
                i, out = await asyncio.wait_for(run.next(), _DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            texts[i] += out.text
            tokens[i] = out.completion_tokens
            reasons[i] = out.finish_reason
    finally:
        run.cancel()
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
         "logprobs": None, "finish_reason": reason} if chat else
        {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]  # fmt: skip
    return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, sum(tokens)),
                         "system_fingerprint": None})  # fmt: skip


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


async def _stream(run: _Run, head: dict, k: int, prompt_tokens: int, include_usage: bool,
                  chat: bool):  # fmt: skip
    """Server-sent events of OpenAI's chunk format, then ``data: [DONE]``."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
            "system_fingerprint": None}  # fmt: skip

    def event(choices: list, **extra) -> str:
        body = {**head, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(i: int, piece: str | None, reason: str | None) -> dict:
        if not chat:
            return {"index": i, "text": piece or "", "logprobs": None, "finish_reason": reason}
        delta = {} if piece is None else {"content": piece}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}

    tokens = [0] * k
    try:
        if chat:
            for i in range(k):
                role = {"index": i, "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                yield event([role])
        while not run.done:
            i, out = await run.next()
            tokens[i] = out.completion_tokens
            if out.text and (chat or out.finish_reason is None):
                yield event([choice(i, out.text, None)])
            if out.finish_reason is not None:
                yield event([choice(i, None if chat else out.text, out.finish_reason)])
        if include_usage:
            yield event([], usage=_usage(prompt_tokens, sum(tokens)))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()  # a client gone mid-stream: free the slots now


class _EngineStream(StreamingResponse):
    """A streaming response that cancels its engine requests however it ends, even when the
    client disconnects before the first event."""

    def __init__(self, content, run: _Run, **kwargs):
        super().__init__(content, **kwargs)
        self.run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()
