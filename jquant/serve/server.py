"""An OpenAI-compatible HTTP server over a `jquant.serve.engine.Engine`.

    app = create_app(engine, "smollm2-135m")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events ending in ``data: [DONE]``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health`` and ``GET /metrics`` (Prometheus text, ``jquant_*``).

Bodies follow OpenAI's API. Sampling: ``n`` (up to the engine's slots; choice ``i`` is seeded
``seed + i``), ``max_tokens`` (``max_completion_tokens`` in chat), ``temperature``, ``top_p``,
``stop``, ``seed``, ``presence_penalty``, ``frequency_penalty``, vLLM's extensions ``top_k``,
``ignore_eos`` and ``repetition_penalty``, and log-probabilities (completions' ``logprobs: N``,
chat's ``logprobs``/``top_logprobs``; of the model's logits before penalties and temperature,
in OpenAI's shapes: `_Logprobs`), each within `jquant.serve.limits` (the engine checks the same
limits). Structured output: ``response_format`` (``json_object``, ``json_schema``; on
completions too, as vLLM takes it), by `jquant.serve.grammar`. Every bad request is an HTTP 400
with OpenAI's error body, an unknown model included (OpenAI answers 404 there), a body over
`jquant.serve.protocol.MAX_BODY_BYTES` is a 413; see `jquant.serve.protocol`. An engine with
LoRA adapters (`jquant.serve.adapters`) serves each as the model ``<model>:<adapter>``, listed
by ``/v1/models`` (with ``parent``: the base's id); an unknown adapter is an unknown model.
A request that fails inside the engine is an HTTP 500 (streamed: an ``error`` event, then
``[DONE]``); the engine serves the others on. A streaming client that disconnects has its
engine requests cancelled, so their slots free at once.

Under load and at shutdown every request is answered, never left waiting: beyond the engine's
``max_slots + max_queue`` requests the server answers HTTP 429 with ``Retry-After``; a request
past the engine's ``request_timeout`` ends with HTTP 504 (streamed: an ``error`` event); one the
engine's `~jquant.serve.engine.Engine.shutdown` ends is an HTTP 503 (streamed: an ``error``
event). `Server` (uvicorn's, as ``jquant serve`` runs it) starts that shutdown on SIGTERM.
An exception of the server's own is an HTTP 500 in OpenAI's shape, the connection kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jquant.serve import limits, protocol
from jquant.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

_log = logging.getLogger(__name__)

#: Seconds between checks that a non-streaming client is still connected.
_DISCONNECT_POLL_S = 0.5
#: What a 429 tells the client to wait before trying again (seconds).
RETRY_AFTER_S = 1
#: HTTP status of a request the engine ended with an error, by `Output.error_code`.
_ERROR_STATUS = {"timeout": (504, "request_timeout"), "shutdown": (503, "engine_unavailable")}

#: Help text of the engine's metrics; any other numeric key is exported too.
_METRIC_HELP = {
    "active_slots": "Requests being decoded.",
    "queue_depth": "Requests waiting for a slot.",
    "kv_cache_used_tokens": "Tokens held in the KV cache.",
    "kv_cache_capacity_tokens": "Tokens the KV cache can hold.",
    "kv_cache_pages_total": "Pages of the KV cache.",
    "kv_cache_pages_used": "Pages some request holds.",
    "kv_cache_pages_cached": "Pages kept findable by their prompt prefix.",
    "prefix_cache_hit_tokens": "Prompt tokens found in the prefix cache.",
    "prefix_cache_queried_tokens": "Prompt tokens looked up in the prefix cache.",
    "preemptions_total": "Requests that gave their pages back and recomputed.",
    "generated_tokens_total": "Completion tokens generated.",
    "prompt_tokens_total": "Prompt tokens prefilled.",
    "requests_total": "Requests submitted to the engine.",
    "timed_out_requests_total": "Requests ended by the request timeout.",
    "tokens_per_second": "Recent decode throughput (tokens/s).",
    "spec_decode_drafts_total": "Speculative decoding: rows of verify steps that had drafts.",
    "spec_decode_draft_tokens_total": "Speculative decoding: draft tokens proposed.",
    "spec_decode_accepted_tokens_total": "Speculative decoding: draft tokens accepted.",
    "spec_decode_acceptance_rate": "Speculative decoding: accepted / proposed draft tokens.",
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
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

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

    ids = [model_name, *(f"{model_name}:{a}" for a in engine.adapter_names)]

    def card(model_id: str) -> dict:
        out = {"id": model_id, "object": "model", "created": created, "owned_by": "jquant",
               "max_model_len": engine.max_context}  # fmt: skip
        if model_id != model_name:
            out["parent"] = model_name
        return out

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(i) for i in ids]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in ids:
            raise APIError(f"The model '{model_id}' does not exist", param="model",
                           code="model_not_found", status=404)  # fmt: skip
        return card(model_id)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    @_guarded
    async def completions(request: Request):
        r = await _parse(request, CompletionRequest)
        adapter = _adapter_of(r, model_name, ids)
        items = protocol.prompts(r.prompt)
        encoded = await asyncio.to_thread(
            lambda: [_encode(engine, p) if isinstance(p, str) else list(p) for p in items]
        )
        max_tokens = 16 if r.max_tokens is None else r.max_tokens
        grammar = await asyncio.to_thread(_grammar, engine, r.response_format)
        return await _respond(engine, request, r, encoded, max_tokens, adapter, chat=False,
                              grammar=grammar)  # fmt: skip

    @app.post("/v1/chat/completions")
    @_guarded
    async def chat_completions(request: Request):
        r = await _parse(request, ChatCompletionRequest)
        adapter = _adapter_of(r, model_name, ids)
        conversation = protocol.messages(r.messages)
        prompt = await asyncio.to_thread(_chat_prompt, engine, conversation)
        max_tokens = r.max_tokens if r.max_completion_tokens is None else r.max_completion_tokens
        grammar = await asyncio.to_thread(_grammar, engine, r.response_format)
        return await _respond(engine, request, r, [prompt], max_tokens, adapter, chat=True,
                              grammar=grammar)  # fmt: skip

    return app


def _guarded(endpoint):
    """``endpoint``, its unexpected exceptions answered as an HTTP 500 in OpenAI's shape. An
    exception reaching Starlette would be re-raised to uvicorn, which closes the connection
    (a keep-alive client sees it reset)."""

    @functools.wraps(endpoint)
    async def guarded(request: Request):
        try:
            return await endpoint(request)
        except APIError:
            raise
        except Exception as e:
            _log.exception("jquant serve: %s %s failed", request.method, request.url.path)
            raise APIError(f"The server failed on this request: {type(e).__name__}: {e}",
                           status=500, type="server_error", code="internal_error") from None
    return guarded


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


def _adapter_of(r, model_name: str, ids: list[str]) -> str | None:
    """The LoRA adapter a request's ``model`` names (``<model>:<adapter>``), None for the
    base; HTTP 400 ``model_not_found`` for a model or adapter not served."""
    if r.model not in ids:
        served = ", ".join(f"'{i}'" for i in ids)
        raise APIError(f"The model '{r.model}' does not exist or you do not have access to it. "
                       f"This server serves {served}.", param="model",
                       code="model_not_found")  # fmt: skip
    return None if r.model == model_name else r.model[len(model_name) + 1 :]


def _encode(engine, text: str) -> list[int]:
    """A raw-text prompt: BOS exactly when the tokenizer's ``add_bos_token`` says."""
    from jquant.io.tokenizer import encode_prompt

    return encode_prompt(engine.tokenizer, text)


async def _parse(request: Request, cls):
    """The validated request body (parsed in a worker thread: a body of up to
    `protocol.MAX_BODY_BYTES` takes a while to parse and check, and the loop serves streams)."""
    return await asyncio.to_thread(protocol.parse_body, await _read_body(request), cls)


async def _read_body(request: Request) -> bytes:
    """The request body; HTTP 413 past `protocol.MAX_BODY_BYTES` (read no further)."""
    limit = protocol.MAX_BODY_BYTES
    too_large = APIError(f"The request body is larger than this server accepts ({limit} "
                         "bytes).", code="request_too_large", status=413)  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _chat_prompt(engine, conversation: list[dict]) -> list[int]:
    from jquant.io.tokenizer import NoChatTemplateError, chat_prompt

    try:
        return chat_prompt(engine.tokenizer, conversation)
    except NoChatTemplateError:
        raise APIError("This model has no chat template; use /v1/completions.",
                       param="messages", code="no_chat_template") from None  # fmt: skip
    except ValueError as e:
        raise APIError(f"Invalid 'messages': {e}", param="messages",
                       code="invalid_value") from None  # fmt: skip


def _grammar(engine, response_format) -> str | None:
    """The grammar of ``response_format`` (None: free text), its matcher built once here, off
    the event loop (the first builds llguidance's tokenizer); HTTP 400 naming what is wrong."""
    from jquant.serve.grammar import response_format_grammar

    try:
        grammar = response_format_grammar(response_format)
        if grammar is not None:
            engine.grammars.matcher(grammar)
    except limits.LimitError as e:
        raise protocol.limit_error(e, {"grammar": "response_format"}) from None
    except ImportError as e:
        raise APIError(f"'response_format' is not supported by this server: {e}",
                       param="response_format", code="unsupported_parameter") from None
    return grammar


def _sampling(engine, r, prompts: list[list[int]], max_tokens: int | None, chat: bool,
              grammar: str | None = None):  # fmt: skip
    """One `SamplingParams` per choice, ``len(prompts) * n`` of them, prompt-major, each
    checked against `jquant.serve.limits` as the engine will check it."""
    from jquant.serve.engine import SamplingParams

    max_name = "max_completion_tokens" if chat and r.max_completion_tokens is not None else (
        "max_tokens")
    where = "messages" if chat else "prompt"
    try:
        n = limits.check_int("n", 1 if r.n is None else r.n, 1, engine.max_slots,
                             " (the server's slots)")  # fmt: skip
        if len(prompts) * n > engine.capacity:  # it could never be queued whole
            raise limits.LimitError(
                "n" if n > 1 else "prompt", f"Invalid '{'n' if n > 1 else 'prompt'}': "
                f"{len(prompts)} prompts x n={n} = {len(prompts) * n} completions; this server "
                f"takes at most {engine.capacity} per request (its {engine.max_slots} slots and "
                f"a queue of {engine.max_queue}).", code="too_many_completions")  # fmt: skip
        seed = None if r.seed is None else limits.check_int(
            "seed", r.seed, limits.REQUEST_SEED_MIN, limits.REQUEST_SEED_MAX)  # fmt: skip
        if chat:
            logprobs = (r.top_logprobs or 0) if r.logprobs else None
        else:
            logprobs = r.logprobs
        base = SamplingParams(
            temperature=1.0 if r.temperature is None else r.temperature,
            top_p=1.0 if r.top_p is None else r.top_p, top_k=r.top_k or 0,
            stop=protocol.stop_strings(r.stop), ignore_eos=bool(r.ignore_eos),
            presence_penalty=r.presence_penalty or 0.0,
            frequency_penalty=r.frequency_penalty or 0.0,
            repetition_penalty=1.0 if r.repetition_penalty is None else r.repetition_penalty,
            logprobs=logprobs, grammar=grammar,
        )  # fmt: skip
        out = []
        for ids in prompts:
            # Without max_tokens, the rest of the context (a prompt that fills it is refused).
            tokens = max_tokens if max_tokens is not None else max(engine.max_context - len(ids), 1)
            params = dataclasses.replace(base, max_tokens=tokens)
            limits.check_request(ids, params, vocab_size=engine.vocab_size,
                                 max_context=engine.max_context)  # fmt: skip
            if params.top_p == 0.0:  # the limit of nucleus sampling: the most likely token
                params = dataclasses.replace(params, temperature=0.0, top_p=1.0)
            for _ in range(n):
                out.append(dataclasses.replace(
                    params, seed=None if seed is None else (seed + len(out)) % limits.SEED_MODULUS
                ))  # fmt: skip
    except limits.LimitError as e:
        rename = {"prompt": where, "max_tokens": max_name}
        if chat:
            rename["logprobs"] = "top_logprobs"
        raise protocol.limit_error(e, rename) from None
    return n, out


class _Run:
    """The engine requests behind one HTTP request (queued all or none); their events arrive
    on one queue."""

    def __init__(self, engine, requests: list, adapter: str | None = None):
        from jquant.serve.engine import QueueFull

        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.finished = [False] * len(requests)
        try:
            self.ids = engine.submit_many([
                (prompt, params, functools.partial(self._on_output, i))
                for i, (prompt, params) in enumerate(requests)
            ], adapter=adapter)  # fmt: skip
        except limits.LimitError as e:  # checked before (`_sampling`): not expected here
            raise protocol.limit_error(e) from None
        except QueueFull as e:
            raise APIError(f"{str(e)[0].upper()}{str(e)[1:]}.", status=429,
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None  # fmt: skip
        except RuntimeError as e:  # the engine is not running
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


async def _respond(engine, request: Request, r, prompts, max_tokens, adapter, *, chat: bool,
                   grammar: str | None = None):  # fmt: skip
    """Submits the choices of a validated request (with LoRA ``adapter``, None for none) and
    answers it, streamed or whole."""
    n, params = _sampling(engine, r, prompts, max_tokens, chat, grammar)
    requests = [(prompts[k // n], p) for k, p in enumerate(params)]
    prompt_tokens = sum(len(ids) for ids in prompts)
    include_usage = bool(r.stream_options and r.stream_options.include_usage)
    run = _Run(engine, requests, adapter)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": r.model}  # fmt: skip
    if r.stream:
        logprobs = None
        if params[0].logprobs is not None:
            logprobs = [_Logprobs(engine.tokenizer, chat) for _ in requests]
        stream = _stream(run, head, len(requests), prompt_tokens, include_usage, chat, logprobs)
        return _EngineStream(stream, run, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})  # fmt: skip
    texts, reasons, tokens = [""] * len(requests), [None] * len(requests), [0] * len(requests)
    want = params[0].logprobs is not None
    logprobs = [_Logprobs(engine.tokenizer, chat) for _ in requests] if want else None
    try:
        while not run.done:
            try:
                i, out = await asyncio.wait_for(run.next(), _DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            if out.error is not None:
                raise _engine_error(out)
            texts[i] += out.text
            tokens[i] = out.completion_tokens
            if logprobs is not None:
                logprobs[i].add(out)
            reasons[i] = out.finish_reason
    finally:
        run.cancel()
    lp = [None] * len(requests) if logprobs is None else [x.body() for x in logprobs]
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
         "logprobs": lp[i], "finish_reason": reason} if chat else
        {"index": i, "text": text, "logprobs": lp[i], "finish_reason": reason}
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]  # fmt: skip
    return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, sum(tokens)),
                         "system_fingerprint": None})  # fmt: skip


def _engine_error(out) -> APIError:
    """The error of a request the engine ended with one: HTTP 500 if it failed there, 504
    past the request timeout, 503 at shutdown."""
    status, code = _ERROR_STATUS.get(out.error_code, (500, "engine_error"))
    what = "failed while generating" if status == 500 else "could not finish"
    return APIError(f"The server {what} this request: {out.error}", status=status,
                    type="server_error", code=code)  # fmt: skip


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


class _Logprobs:
    """One choice's log-probabilities in OpenAI's shape, gathered from the engine's events.

    Each token's text is ``tokenizer.decode([id])`` (a token that is part of a UTF-8
    character decodes to U+FFFD), and ``bytes`` its UTF-8 encoding. The completions API's
    ``text_offset`` is where each token's text starts in the completion: the sum of the
    lengths of the texts before it; its ``top_logprobs`` are dicts keyed by text, so of two
    alternatives with one text only the more likely is listed. Every generated token is
    listed, those of a stop string included, the stop token not."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.offset = 0
        self.tokens, self.token_logprobs, self.top, self.offsets, self.content = [], [], [], [], []

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def add(self, out) -> dict | None:
        """Records ``out``'s tokens; returns their part alone (a stream chunk's
        ``logprobs``), None if it has none."""
        if not out.token_ids:
            return None
        start = len(self.content) if self.chat else len(self.tokens)
        for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
            text = self._text(token)
            if self.chat:
                entry = self._entry(text, logprob)
                entry["top_logprobs"] = [self._entry(self._text(t), v) for t, v in top]
                self.content.append(entry)
            else:
                self.tokens.append(text)
                self.token_logprobs.append(logprob)
                alternatives: dict[str, float] = {}
                for t, v in top:  # two ids of one text: the more likely one's
                    alternatives.setdefault(self._text(t), v)
                self.top.append(alternatives)
                self.offsets.append(self.offset)
                self.offset += len(text)
        return self.body(start)

    @staticmethod
    def _entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def body(self, start: int = 0) -> dict:
        """The ``logprobs`` of a choice, from token ``start`` on."""
        if self.chat:
            return {"content": self.content[start:], "refusal": None}
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}  # fmt: skip


async def _stream(run: _Run, head: dict, k: int, prompt_tokens: int, include_usage: bool,
                  chat: bool, logprobs: list[_Logprobs] | None = None):  # fmt: skip
    """Server-sent events of OpenAI's chunk format, then ``data: [DONE]``; with
    ``logprobs``, each chunk carries those of the tokens it brings."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
            "system_fingerprint": None}  # fmt: skip

    def event(choices: list, **extra) -> str:
        body = {**head, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def choice(i: int, piece: str | None, reason: str | None, lp: dict | None = None) -> dict:
        if not chat:
            return {"index": i, "text": piece or "", "logprobs": lp, "finish_reason": reason}
        delta = {} if piece is None else {"content": piece}
        return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}

    tokens = [0] * k
    try:
        if chat:
            for i in range(k):
                role = {"index": i, "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None, "finish_reason": None}  # fmt: skip
                yield event([role])
        while not run.done:
            i, out = await run.next()
            if out.error is not None:  # the other choices are cancelled below
                yield f"data: {json.dumps(_engine_error(out).body(), ensure_ascii=False)}\n\n"
                break
            tokens[i] = out.completion_tokens
            lp = None if logprobs is None else logprobs[i].add(out)
            if (out.text or lp is not None) and (chat or out.finish_reason is None):
                yield event([choice(i, out.text, None, lp)])
            if out.finish_reason is not None:
                yield event([choice(i, None if chat else out.text, out.finish_reason)])
        else:
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


class Server(uvicorn.Server):
    """uvicorn's server, whose SIGTERM or SIGINT also starts the engine's shutdown
    (`jquant.serve.engine.Engine.shutdown` with ``shutdown_grace``): requests waiting for a
    slot are answered with an error at once, running ones finish or end with an error within
    ``shutdown_grace`` seconds, and the server exits once their responses are sent (uvicorn
    stops taking connections meanwhile). A client that does not read its stream is cut off
    ``shutdown_grace + 5`` seconds after the signal (uvicorn's ``timeout_graceful_shutdown``,
    unless the config sets one).

    >>> Server(uvicorn.Config(create_app(engine, "m")), engine, 5.0).run()  # doctest: +SKIP
    """

    def __init__(self, config: uvicorn.Config, engine, shutdown_grace: float):
        if config.timeout_graceful_shutdown is None:
            config.timeout_graceful_shutdown = shutdown_grace + 5
        super().__init__(config)
        self.engine, self.shutdown_grace = engine, shutdown_grace

    def handle_exit(self, sig, frame) -> None:
        # A signal handler may run while this thread holds the engine's lock (in `submit`):
        # the shutdown, which takes it, runs in a thread of its own.
        threading.Thread(target=self.engine.shutdown, args=(self.shutdown_grace,),
                         name="jquant-shutdown", daemon=True).start()  # fmt: skip
        super().handle_exit(sig, frame)
