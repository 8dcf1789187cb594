"""A continuous-batching inference engine over a `Runner`'s paged KV cache.

One background thread runs the loop; every iteration it

1. admits waiting requests (first come, first served) while a row is free and the cache has
   the pages of the prompt: pages come from a `jquant.serve.pages.PagePool`, so the cache
   holds what requests use rather than a whole context per row, and the leading full pages
   of a prompt that an earlier request already computed (a shared system prompt) are
   reused, not prefilled again;
2. runs one prefill step: the next chunk (at most ``prefill_chunk`` tokens) of up to
   ``prefill_rows`` prompts at once, oldest first, within ``prefill_chunk`` tokens in all
   after the first, so a long prompt is spread over several iterations and never stalls the
   streams already decoding;
3. runs one decode step for every decoding request at once (the smallest compiled batch
   that holds them), and hands each request its token. A request whose next position needs a
   page when none is left is preempted: the newest running request gives its pages back and
   waits again, and later recomputes its prompt and what it had generated. With
   ``speculative`` (`jquant.serve.speculative`), a request whose context repeats its own tail
   gets n-gram drafts, and the step verifies them: it yields one to ``k + 1`` tokens per
   request, each handed over as if decoded alone (stops, ``max_tokens``, penalties and
   log-probabilities as without speculation, the tokens past an end dropped).

Each request samples with its own settings (`SamplingParams`), repetition penalties and
log-probabilities included: penalties are data of the step program (per-row scalars and a
``(rows, V)`` count array, `jquant.models.sampling.Penalties`), and every step returns the
chosen tokens' log-probabilities and the 20 most likely, so neither compiles a program of its
own. A request with a grammar (``SamplingParams.grammar``: structured output) samples among
the tokens its llguidance matcher allows, a bitmask every step takes (`jquant.serve.grammar`).
So is each request's LoRA adapter, if the engine serves any (``adapters``, a request's
``adapter``: `jquant.serve.adapters`): rows of different adapters and of none share a step.
Requests join and leave between decode steps. A request ends at a stop token (the model's
EOS unless ``ignore_eos``, plus its ``stop_token_ids``), at a stop string (the text is cut
before it), when its grammar is complete, after ``max_tokens``, when it is cancelled, or
after the engine's ``request_timeout``; its pages are free for the next iteration. Text is decoded
incrementally (`jquant.serve.detok`: constant work per token) and streamed as it becomes
final: a trailing incomplete UTF-8 character, or a tail that could still grow into a stop
string (searched across token boundaries), is held back until it cannot. A request whose
step raises in the loop ends alone, with finish_reason ``"error"`` and the exception in
`Output.error`; the loop serves the others on.

Admission is bounded: at most ``max_slots + max_queue`` requests are in the engine at once
(running or waiting); `submit_many` queues one HTTP request's choices all or none, and raises
`QueueFull` beyond the bound. `shutdown` ends the waiting requests at once and the running
ones after a grace period, each with an error, so no caller waits forever.

>>> engine = Engine(model, params, tokenizer, max_slots=8)  # doctest: +SKIP
>>> engine.start()  # doctest: +SKIP
>>> engine.generate(tokenizer.encode("Hi"), SamplingParams(max_tokens=8)).text  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from jquant.serve import limits
from jquant.serve.adapters import AdapterSet
from jquant.serve.detok import IncrementalText
from jquant.serve.grammar import Grammars, advance
from jquant.serve.pages import PagedSeq, PagePool
from jquant.serve.runner import Penalties, Runner, Sampled, Sampling
from jquant.serve.speculative import Ngram, accepted, propose

_log = logging.getLogger(__name__)

#: Decode steps remembered for the tokens/s metric (the last 10 s of them, at most this many).
RECENT_STEPS = 1024


Callback = Callable[["Output"], None]


class QueueFull(RuntimeError):
    """The engine holds ``max_slots + max_queue`` requests already: try again later."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request is continued (OpenAI's names and defaults; the limits of every field
    are `jquant.serve.limits`')."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 0 = only the most likely token
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None  # None: a fresh seed per request
    stop: tuple[str, ...] = ()  # stop strings; the output is cut before the first one
    stop_token_ids: tuple[int, ...] = ()  # stop tokens besides the model's EOS
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI's: -presence where the output holds the token
    frequency_penalty: float = 0.0  # OpenAI's: -frequency * its count in the output
    repetition_penalty: float = 1.0  # vLLM's: over prompt and output (1 = off)
    #: None: no log-probabilities; k in 0..20: each token's, and the k most likely with theirs
    logprobs: int | None = None
    #: an llguidance grammar the output follows (`jquant.serve.grammar`); None: free text
    grammar: str | None = None

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)  # fmt: skip

    def check(self, vocab_size: int | None = None) -> None:
        """Raises `jquant.serve.limits.LimitError` (a ValueError) naming the first bad field;
        with ``vocab_size``, ``top_k`` and ``stop_token_ids`` are checked against it too."""
        limits.check_sampling(self, vocab_size)


@dataclasses.dataclass
class Output:
    """One event of a request's stream (or, from `Engine.generate`, the whole result)."""

    request_id: int
    text: str  # new text since the previous event
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    prompt_tokens: int
    completion_tokens: int  # total so far
    error: str | None = None  # the request failed in the engine (finish_reason "error")
    #: with ``error``, why: "engine_error" (its step raised), "timeout" (the engine's
    #: ``request_timeout`` passed) or "shutdown" (the engine stopped first)
    error_code: str | None = None
    #: with `SamplingParams.logprobs`: one per id of ``token_ids``, the log-probability
    #: (``log_softmax`` of the model's logits, before penalties and temperature) of that token
    logprobs: list[float] | None = None
    #: and the ``SamplingParams.logprobs`` most likely ``(id, logprob)``, most likely first
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    callback: Callable[[Output], None]
    seed: int
    arrived: float
    stops: frozenset[int]
    deadline: float | None  # perf_counter time past which it ends with a timeout
    seq: PagedSeq | None = None  # its pages while it runs
    digests: list[bytes] | None = None  # its context's page digests (`PagePool`)
    filled: int = 0  # tokens of `context()` in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    text: IncrementalText | None = None  # the generated tokens' text, decoded as they come
    sent_text: int = 0  # characters of the decoded text already streamed
    sent_tokens: int = 0
    cancelled: bool = False
    #: with penalties: `Penalties.counts`' row (2 * generated count + in the prompt)
    counts: np.ndarray | None = None
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    matcher: object | None = None  # with `SamplingParams.grammar`: its llguidance matcher
    adapter: int = 0  # its LoRA adapter's slot (0: the base)
    salt: bytes = b""  # where its prefix-cache digests start (`PagePool.prompt_digests`)

    def context(self) -> list[int]:
        """What the cache must hold before the next decode step: the prompt, and after a
        preemption what had been generated but the last token (the next step's input)."""
        return self.prompt + self.generated[:-1] if self.generated else self.prompt

    @property
    def decoding(self) -> bool:
        return self.seq is not None and self.filled == len(self.prompt) + max(
            len(self.generated) - 1, 0)


class Engine:
    """Serves many requests at once on one model (see the module docstring).

    Args:
      model: a `jquant.models.Llama` (structure and compute dtype).
      params: its parameters, float or quantized.
      tokenizer: a `jquant.io.Tokenizer` (or any object with ``decode(ids,
        skip_special_tokens=True)``).
      max_slots: sequences decoded at once (rows of a decode step).
      max_context: longest prompt + completion of one request (default: the model's
        context, at most 2048).
      prefill_chunk: the most prompt tokens of one request run per iteration, and the
        budget of every prompt's tokens after the first in one prefill step.
      prefill_rows: prompts prefilled in one step.
      page_size: positions per page of the KV cache.
      kv_cache_tokens: positions the KV cache holds in all (rounded up to whole pages; at
        least ``max_context``); default ``max_slots * max_context``, a whole context per row.
      prefix_caching: reuse the cached pages of a prompt's leading full pages.
      kv_cache: KV cache format: None (the compute dtype), "int8" or "fp8".
      mesh: tensor parallelism: an int ``tp`` (devices) or a ``jax.sharding.Mesh`` with a
        ``"tp"`` axis; with an ``"ep"`` axis too (or ``{"tp": N, "ep": M}``), MoE experts
        are split over ep (`jquant.serve.tp`); None runs on one device.
      max_queue: requests that may wait for a slot beyond the ``max_slots`` running (default
        ``8 * max_slots``); `submit` raises `QueueFull` past it.
      request_timeout: seconds after which a request still waiting or running ends with an
        error (``error_code`` "timeout"); None: no limit.
      adapters: LoRA adapters a request may name, ``{name: jquant.qat.lora.LoRA}``
        (`jquant.serve.adapters`); None: the base model only.
      speculative: speculative decoding by n-gram prompt lookup (`jquant.serve.speculative`);
        None: off. The outputs are those of plain decoding (the same tokens for a seed, up
        to float rounding).
    """

    def __init__(self, model, params, tokenizer, *, max_slots: int = 8,
                 max_context: int | None = None, prefill_chunk: int = 128,
                 prefill_rows: int = 4, page_size: int = 16,
                 kv_cache_tokens: int | None = None, prefix_caching: bool = True,
                 kv_cache=None, mesh=None, max_queue: int | None = None,
                 request_timeout: float | None = None, adapters=None,
                 speculative: Ngram | None = None):  # fmt: skip
        config = model.config
        limit = config.max_position_embeddings
        max_context = min(limit, 2048) if max_context is None else max_context
        if not 2 <= max_context <= limit:
            raise ValueError(
                f"max_context={max_context} must be in [2, {limit}] "
                f"(the model's max_position_embeddings)"
            )
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1")
        if page_size < 1:
            raise ValueError(f"page_size={page_size} must be >= 1")
        if kv_cache_tokens is None:
            kv_cache_tokens = max_slots * max_context
        if kv_cache_tokens < max_context:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens} must be >= max_context="
                             f"{max_context}: one request of the longest context must fit")
        max_queue = 8 * max_slots if max_queue is None else max_queue
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        if request_timeout is not None and not request_timeout > 0:
            raise ValueError(f"request_timeout={request_timeout} must be > 0 seconds or None")
        if speculative is not None and not isinstance(speculative, Ngram):
            raise ValueError(f"speculative={speculative!r} must be a "
                             "jquant.serve.speculative.Ngram or None")  # fmt: skip
        self.speculative = speculative
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.tokenizer = tokenizer
        self.max_slots, self.max_context = max_slots, max_context
        self.eos_ids = frozenset(config.eos_token_ids)
        self.vocab_size = config.vocab_size  # prompt ids, top_k: `jquant.serve.limits`
        self.grammars = Grammars(tokenizer, config.vocab_size, config.eos_token_ids)
        self.tp_notes: list[str] = []
        shard = None
        if mesh is not None:
            from jquant.serve.tp import runner_sharder

            shard, self.mesh, self.tp_notes = runner_sharder(mesh, config)
        else:
            self.mesh = None
        self.adapters = AdapterSet(params, adapters, dtype=model.dtype) if adapters else None
        self.runner = Runner(model, params, rows=max_slots, max_len=max_context,
                             page_size=page_size, num_pages=-(-kv_cache_tokens // page_size),
                             prefill_chunk=prefill_chunk, prefill_rows=prefill_rows,
                             kv_cache=kv_cache, shard=shard, adapters=self.adapters,
                             draft_tokens=speculative.num_tokens if speculative else 0)  # fmt: skip
        self.pool = PagePool(self.runner.num_pages, page_size, prefix_caching=prefix_caching)
        # Pages behind every layer's window can be given back (a model of sliding layers
        # only); a model with any full-attention layer keeps them all.
        sliding = [config.is_sliding(i) for i in range(config.num_layers)]
        self._window = config.sliding_window if all(sliding) else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._by_id: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_at: float | None = None  # set by `shutdown`: when the running requests end
        self.error: BaseException | None = None
        self._stats = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=RECENT_STEPS)  # fmt: skip
        self.compile_seconds = 0.0

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Compiles every program and starts the loop (idempotent)."""
        if self._thread is not None:
            return
        self.compile_seconds = self.runner.compile()
        self._thread = threading.Thread(target=self._loop, name="jquant-engine", daemon=True)
        self._thread.start()

    def shutdown(self, grace: float = 0.0) -> None:
        """Starts stopping and returns at once: from now on `submit` raises RuntimeError; the
        requests waiting for a slot end at once, the running ones when they finish or after
        ``grace`` seconds, whichever is first; every one that did not finish ends with
        finish_reason ``"error"`` (``error_code`` "shutdown"). Then the loop stops (`close`
        waits for it). A second call can only bring the end nearer."""
        with self._lock:
            stop_at = time.perf_counter() + max(grace, 0.0)
            if self._stop_at is None or stop_at < self._stop_at:
                self._stop_at = stop_at
        self._wake.set()

    def close(self, grace: float = 0.0) -> None:
        """`shutdown` (with ``grace``), then waits for the loop to stop; every request the
        engine took has ended when it returns."""
        self.shutdown(grace)
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all("shutdown", "the server is shutting down")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ----------------------------------------------------------------------

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raises `jquant.serve.limits.LimitError` (a ValueError) if the request cannot be
        served (what `submit` checks)."""
        limits.check_request(prompt_ids, params, vocab_size=self.vocab_size,
                             max_context=self.max_context)  # fmt: skip

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               callback: Callable[[Output], None], *,
               adapter: str | None = None) -> int:  # fmt: skip
        """Queues a request; ``callback(Output)`` is called from the engine's thread for each
        new piece and exactly once with ``finish_reason`` set. ``adapter``: the name of the
        LoRA adapter it runs with (None: the base model). Returns the request id.

        Raises:
          ValueError: the request cannot be served (see `check`), or names an adapter the
            engine does not serve; nothing was queued.
          QueueFull: ``max_slots + max_queue`` requests are in the engine already.
          RuntimeError: the engine is not running (never started, shut down, or failed).
        """
        return self.submit_many([(prompt_ids, params, callback)], adapter=adapter)[0]

    @property
    def capacity(self) -> int:
        """The most requests the engine holds at once: ``max_slots + max_queue``."""
        return self.max_slots + self.max_queue

    def submit_many(self, requests: Sequence[tuple[Sequence[int], SamplingParams, Callback]],
                    *, adapter: str | None = None) -> list[int]:  # fmt: skip
        """`submit` for several ``(prompt_ids, params, callback)`` at once, all or none (one
        HTTP request's choices), all with ``adapter``. Raises as `submit` does, and
        `limits.LimitError` if there are more than `capacity`."""
        slot = self._adapter_slot(adapter)
        for prompt_ids, params, _ in requests:
            self.check(prompt_ids, params)
        if len(requests) > self.capacity:
            raise limits.LimitError("n", f"Invalid 'n': {len(requests)} completions in one "
                                    f"request; this server takes at most {self.capacity} "
                                    f"(its {self.max_slots} slots and a queue of "
                                    f"{self.max_queue}).")  # fmt: skip
        seeds = [p.seed if p.seed is not None else int(np.random.randint(2**31))
                 for _, p, _ in requests]  # fmt: skip
        matchers = [self.grammars.matcher(p.grammar) if p.grammar is not None else None
                    for _, p, _ in requests]  # fmt: skip
        # Checked and queued under the lock `shutdown` takes: a request is either refused
        # here or queued before the loop's last look at the inbox, never left waiting.
        with self._lock:
            if self._thread is None or self._stop_at is not None or self.error is not None:
                raise RuntimeError(f"the engine is not running{self._failure()}")
            if len(self._by_id) + len(requests) > self.capacity:
                raise QueueFull(f"the server is busy: {len(self._by_id)} requests are running "
                                f"or waiting ({self.max_slots} slots, a queue of "
                                f"{self.max_queue}); try again later")  # fmt: skip
            now = time.perf_counter()
            deadline = None if self.request_timeout is None else now + self.request_timeout
            reqs = []
            for (prompt_ids, params, callback), seed, matcher in zip(requests, seeds, matchers):
                stops = frozenset(params.stop_token_ids) | (
                    frozenset() if params.ignore_eos else self.eos_ids)  # fmt: skip
                req = _Request(next(self._ids), [int(t) for t in prompt_ids], params, callback,
                               seed, now, stops, deadline,
                               text=IncrementalText(self.tokenizer), matcher=matcher,
                               adapter=slot, salt=AdapterSet.salt(adapter))  # fmt: skip
                if params.penalized:
                    req.counts = np.zeros(self.vocab_size, np.int32)
                    req.counts[req.prompt] = 1
                self._by_id[req.id] = req
                self._inbox.put(req)
                reqs.append(req)
            self._stats["requests_total"] += len(reqs)
        self._wake.set()
        return [req.id for req in reqs]

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The LoRA adapters a request may name, in slot order."""
        return () if self.adapters is None else self.adapters.names

    def _adapter_slot(self, adapter: str | None) -> int:
        if adapter is not None and self.adapters is None:
            raise ValueError(f"unknown adapter {adapter!r}; this engine serves none")
        return 0 if adapter is None else self.adapters.slot(adapter)

    def cancel(self, request_id: int) -> None:
        """Ends a request with ``"abort"`` and frees its slot (a no-op once it has ended)."""
        with self._lock:
            req = self._by_id.get(request_id)
        if req is not None:
            req.cancelled = True
            self._wake.set()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 adapter: str | None = None) -> Output:  # fmt: skip
        """Blocking: the whole completion of one request (with LoRA adapter ``adapter``) as
        one `Output`."""
        done = threading.Event()
        parts: list[Output] = []

        def collect(out: Output) -> None:
            parts.append(out)
            if out.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, params, collect, adapter=adapter)
        while not done.wait(0.5):
            if self._thread is None or self.error is not None:
                raise RuntimeError(f"the engine stopped{self._failure()}")
        last = parts[-1]
        if last.error is not None:
            raise RuntimeError(f"request {last.request_id} failed in the engine: {last.error}")
        logprobs = params.logprobs is not None
        return Output(last.request_id, "".join(p.text for p in parts),
                      [t for p in parts for t in p.token_ids], last.finish_reason,
                      last.prompt_tokens, last.completion_tokens,
                      logprobs=[x for p in parts for x in p.logprobs or []] if logprobs else None,
                      top_logprobs=[x for p in parts for x in p.top_logprobs or []]
                      if logprobs else None)  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """A snapshot: slots, queue, KV-cache use, totals and recent decode tokens/s."""
        with self._lock:
            active = list(self._running)
            used = sum(r.filled for r in active)
            now = time.perf_counter()
            while self._recent and now - self._recent[0][0] > 10:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            span = now - self._recent[0][0] if self._recent else 0.0
            drafted = self._stats["spec_decode_draft_tokens_total"]
            accepted = self._stats["spec_decode_accepted_tokens_total"]
            return {
                "active_slots": len(active),
                "queue_depth": len(self._waiting) + self._inbox.qsize(),
                "kv_cache_used_tokens": used,
                "kv_cache_capacity_tokens": self.runner.capacity_tokens,
                "kv_cache_bytes": self.runner.cache.nbytes,
                "kv_cache_pages_total": self.pool.num_pages,
                "kv_cache_pages_used": self.pool.used,
                "kv_cache_pages_cached": self.pool.cached_pages,
                "prefix_cache_hit_tokens": self.pool.hit_tokens,
                "prefix_cache_queried_tokens": self.pool.queried_tokens,
                "generated_tokens_total": self._stats["generated_tokens_total"],
                "prompt_tokens_total": self._stats["prompt_tokens_total"],
                "requests_total": self._stats["requests_total"],
                "failed_requests_total": self._stats["failed_requests_total"],
                "preemptions_total": self._stats["preemptions_total"],
                "timed_out_requests_total": self._stats["timed_out_requests_total"],
                "tokens_per_second": recent / span if span > 0.5 else 0.0,
                "spec_decode_drafts_total": self._stats["spec_decode_drafts_total"],
                "spec_decode_draft_tokens_total": drafted,
                "spec_decode_accepted_tokens_total": accepted,
                "spec_decode_acceptance_rate": accepted / drafted if drafted else 0.0,
            }

    # ---- the loop ----------------------------------------------------------------------

    def _failure(self) -> str:
        return f" (it failed: {self.error!r})" if self.error is not None else ""

    def _loop(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if self._stop_at is not None and self._stopped():
                    return
                self._reap()
                self._admit()
                prefilling = [r for r in self._running if not r.decoding]
                if not self._running:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                if prefilling:
                    self._prefill_step(self._prefill_batch(prefilling))
                decoding = self._make_room([r for r in self._running if r.decoding])
                if decoding:
                    self._isolated(decoding, self._decode, decoding)
        except BaseException as e:  # the loop must not die silently: fail every request
            with self._lock:
                self.error = e
            self._end_all("engine_error", f"the engine failed: {e!r}")
            raise

    def _stopped(self) -> bool:
        """While shutting down: ends the waiting requests, and the running ones once the
        grace period is over; True when none is left running."""
        self._drain_inbox()  # what was queued before `shutdown` took the lock
        self._end(list(self._waiting), "shutdown", "the server is shutting down")
        running = list(self._running)
        if running and time.perf_counter() < self._stop_at:
            return False
        self._end(running, "shutdown", "the server shut down before the request finished")
        return True

    def _end_all(self, code: str, message: str) -> None:
        """Ends every request the engine holds with an error (the loop has stopped)."""
        self._drain_inbox()
        self._end([*self._waiting, *self._running], code, message)

    def _end(self, reqs: list[_Request], code: str, message: str) -> None:
        for req in reqs:
            self._finish(req, "error", error=message, code=code)

    def _isolated(self, reqs: list[_Request], step, *args) -> None:
        """Runs ``step(*args)``; if it raises, only ``reqs`` (the requests it was for) fail,
        with finish_reason ``"error"``, and the loop goes on serving the others."""
        try:
            step(*args)
        except Exception as e:
            _log.exception("engine: requests %s failed", [r.id for r in reqs])
            for req in reqs:
                with self._lock:
                    self._stats["failed_requests_total"] += 1
                self._finish(req, "error", error=f"{type(e).__name__}: {e}", code="engine_error")

    def _drain_inbox(self) -> None:
        # Under the lock, so that `metrics` never sees a request in neither place.
        with self._lock:
            while True:
                try:
                    self._waiting.append(self._inbox.get_nowait())
                except queue.Empty:
                    return

    def _reap(self) -> None:
        """Ends the cancelled requests, and those past their deadline with an error."""
        now = time.perf_counter()
        for req in [*self._waiting, *self._running]:
            if req.cancelled:
                self._finish(req, "abort")
            elif req.deadline is not None and now >= req.deadline:
                with self._lock:
                    self._stats["timed_out_requests_total"] += 1
                self._finish(req, "error", code="timeout",
                             error=f"the request did not finish within the server's request "
                             f"timeout ({self.request_timeout:g} s)")  # fmt: skip

    def _admit(self) -> None:
        """Moves waiting requests to running, oldest first, while a row is free and the pool
        has their pages (the prompt's, and the first decode position's). A request whose
        prompt continues into pages another request is prefilling now waits for them to be
        committed and shares them (requests behind it go ahead meanwhile)."""
        for req in list(self._waiting):
            if len(self._running) >= self.max_slots:
                return
            context = req.context()
            if req.digests is None:
                req.digests = (self.pool.prompt_digests(context, salt=req.salt)
                               if self.pool.prefix_caching else [])  # fmt: skip
            if self.pool.waits_for(req.digests):
                continue
            seq = self.pool.admit(context, reserve=1, digests=req.digests, salt=req.salt)
            if seq is None:
                return  # first come, first served: later requests wait behind it
            with self._lock:  # a request is always waiting or running for `metrics`
                self._waiting.remove(req)
                req.seq, req.filled = seq, seq.cached
                self._running.append(req)

    def _prefill_batch(self, prefilling: list[_Request]) -> list[tuple[_Request, list[int]]]:
        """The chunks of one prefill step: the oldest prompt's next chunk, then the next
        prompts' while the rows and the token budget allow."""
        runner, batch, budget = self.runner, [], self.runner.prefill_buckets[-1]
        for req in sorted(prefilling, key=lambda r: r.arrived):
            if len(batch) == runner.prefill_row_buckets[-1]:
                break
            chunk = req.context()[req.filled : req.filled + runner.prefill_buckets[-1]]
            if batch and len(chunk) > budget:
                continue
            if batch:
                budget -= len(chunk)
            batch.append((req, chunk))
        return batch

    def _make_room(self, decoding: list[_Request]) -> list[_Request]:
        """Grows each decoding request's pages to hold its next position; where the pool
        runs out, preempts the newest running request (possibly the one in need) until it
        fits. Returns the requests still decoding."""
        for req in sorted(decoding, key=lambda r: r.arrived):
            if req.seq is None:
                continue  # preempted below for an older request
            position = len(req.prompt) + len(req.generated) - 1
            while not self.pool.extend(req.seq, position + 1):
                victim = max(self._running, key=lambda r: r.arrived)
                self._preempt(victim)
                if victim is req:
                    break
            if req.seq is not None and self._window is not None:
                self.pool.release_before(req.seq, position - self._window + 1)
        return [r for r in decoding if r.seq is not None]

    def _preempt(self, req: _Request) -> None:
        """Gives back ``req``'s pages; it waits at the front and later recomputes."""
        with self._lock:
            self.pool.release(req.seq)
            req.seq, req.filled, req.digests = None, 0, None
            self._running.remove(req)
            self._waiting.appendleft(req)
            self._stats["preemptions_total"] += 1

    @staticmethod
    def _write_row(s: Sampling, i: int, req: _Request) -> None:
        p = req.params
        s.temperature[i], s.top_k[i], s.top_p[i] = p.temperature, p.top_k, p.top_p
        s.seed[i], s.counter[i] = req.seed, len(req.generated)

    def _penalties(self, reqs: list[_Request]) -> Penalties | None:
        """The penalties of a step's rows; None when no row has any (the runner then passes
        a count array it keeps on the device, and no ``(rows, V)`` array is built here)."""
        if not any(r.counts is not None for r in reqs):
            return None
        p = Penalties.none(len(reqs), self.vocab_size)
        for i, r in enumerate(reqs):
            if r.counts is not None:
                q = r.params
                p.presence[i], p.frequency[i] = q.presence_penalty, q.frequency_penalty
                p.repetition[i], p.counts[i] = q.repetition_penalty, r.counts
        return p

    def _bitmask(self, reqs: list[_Request], used: list[bool] | None = None):
        """The token bitmask of a step's rows (`jquant.serve.grammar`): filled by the
        matchers of the constrained rows whose token is ``used``, None when there is none."""
        rows = [(r.matcher, i) for i, r in enumerate(reqs)
                if r.matcher is not None and (used is None or used[i])]  # fmt: skip
        return self.grammars.bitmask(len(reqs), rows) if rows else None

    def _slots(self, reqs: list[_Request]) -> list[int] | None:
        """The LoRA adapter slots of a step's rows (None when the engine serves none)."""
        return None if self.adapters is None else [r.adapter for r in reqs]

    @staticmethod
    def _sampled(out: Sampled, i: int, req: _Request) -> tuple:
        """Row ``i`` of a step: ``(token, logprob, top (id, logprob) pairs)``, the last two
        None unless ``req`` asks for log-probabilities."""
        k = req.params.logprobs
        if k is None:
            return int(out.tokens[i]), None, None
        top = [(int(t), float(v)) for t, v in zip(out.top_ids[i, :k], out.top_logprobs[i, :k])]
        return int(out.tokens[i]), float(out.logprob[i]), top

    def _prefill_step(self, batch: list[tuple[_Request, list[int]]]) -> None:
        """Prefills ``batch`` in one step; if that raises, each prompt alone, so that only
        the one at fault fails."""
        if len(batch) == 1:
            self._isolated([batch[0][0]], self._prefill, batch)
            return
        try:
            self._prefill(batch)
        except Exception:
            _log.warning("engine: a batched prefill failed; running its prompts one by one")
            for item in batch:
                self._isolated([item[0]], self._prefill, [item])

    def _prefill(self, batch: list[tuple[_Request, list[int]]]) -> None:
        reqs = [r for r, _ in batch]
        sampling = Sampling.greedy(len(reqs))
        for i, req in enumerate(reqs):
            self._write_row(sampling, i, req)
        # Only a prompt's last chunk samples a token that is used: only there a grammar acts.
        last = [r.filled + len(c) == len(r.context()) and not r.generated for r, c in batch]
        out = self.runner.prefill([r.seq.pages for r in reqs], [c for _, c in batch],
                                  [r.filled for r in reqs], sampling, self._penalties(reqs),
                                  logprobs=True, bitmask=self._bitmask(reqs, last),
                                  adapters=self._slots(reqs))  # fmt: skip
        for i, (req, chunk) in enumerate(batch):
            req.filled += len(chunk)
            context = req.context()
            self.pool.commit(req.seq, context[: req.filled])
            with self._lock:
                self._stats["prompt_tokens_total"] += len(chunk)
            if req.filled == len(context) and not req.generated:
                self._isolated([req], self._accept, req, *self._sampled(out, i, req))
            # A preempted request resumes decoding with its own last token instead.

    def _decode(self, reqs: list[_Request]) -> None:
        sampling, rows = Sampling.greedy(len(reqs)), []
        for req in reqs:  # a row that cannot be written fails its request alone
            self._isolated([req], self._write_row, sampling, len(rows), req)
            if req.seq is not None:
                rows.append(req)
        if len(rows) < len(reqs):
            sampling = Sampling(*(x[: len(rows)] for x in sampling))
        if not rows:
            return
        reqs = rows
        positions = [len(r.prompt) + len(r.generated) - 1 for r in reqs]
        # The verify program takes no token bitmask: a step with a constrained row decodes.
        speculate = self.speculative and not any(r.matcher is not None for r in reqs)
        drafts = self._drafts(reqs, positions) if speculate else []
        if any(drafts):
            self._speculate(reqs, positions, drafts, sampling)
            return
        out = self.runner.decode(
            [r.seq.pages for r in reqs], [r.generated[-1] for r in reqs], positions, sampling,
            self._penalties(reqs), logprobs=True, bitmask=self._bitmask(reqs),
            adapters=self._slots(reqs),
        )  # fmt: skip
        size = self.pool.page_size
        for r, p in zip(reqs, positions):
            r.filled = p + 1
            if (p + 1) % size == 0:  # a page just filled: findable by later prompts
                self.pool.commit(r.seq, r.prompt + r.generated)
        now = time.perf_counter()
        with self._lock:
            self._recent.append((now, len(reqs)))
        for i, r in enumerate(reqs):
            self._isolated([r], self._accept, r, *self._sampled(out, i, r))

    # ---- speculative decoding (`jquant.serve.speculative`) -------------------------------

    def _drafts(self, reqs: list[_Request], positions: list[int]) -> list[list[int]]:
        """Each row's n-gram drafts, at most `Ngram.num_tokens`, no more than its request may
        still generate after the step's first token, nor than its pages hold: they grow to
        the drafts' positions while the pool has free pages (speculation never preempts)."""
        spec, size, out = self.speculative, self.pool.page_size, []
        for r, p in zip(reqs, positions):
            k = min(spec.num_tokens, r.params.max_tokens - len(r.generated) - 1)
            d = (propose(r.prompt + r.generated, k=k, min_n=spec.min_n, max_n=spec.max_n)
                 if k > 0 else [])  # fmt: skip
            if d and not self.pool.extend(r.seq, p + 1 + len(d)):
                d = d[: r.seq.capacity * size - p - 1]
            out.append(d)
        return out

    def _speculate(self, reqs: list[_Request], positions: list[int], drafts: list[list[int]],
                   sampling: Sampling) -> None:  # fmt: skip
        """One verify step of every row (a row without drafts decodes its one token in it:
        one forward per iteration), then each row's accepted drafts and the token after them
        through `_accept`, one by one, until its request ends."""
        out = self.runner.verify(
            [r.seq.pages for r in reqs], [[r.generated[-1], *d] for r, d in zip(reqs, drafts)],
            positions, sampling, self._penalties(reqs), logprobs=True,
            adapters=self._slots(reqs),
        )  # fmt: skip
        size, counts = self.pool.page_size, []
        for i, (r, p, d) in enumerate(zip(reqs, positions, drafts)):
            m = accepted(d, out.tokens[i])
            counts.append(m)
            r.filled = p + 1 + m
            if r.filled // size > p // size:  # a page just filled: findable by later prompts
                self.pool.commit(r.seq, (r.prompt + r.generated + d)[: r.filled])
        with self._lock:
            self._stats["spec_decode_drafts_total"] += sum(1 for d in drafts if d)
            self._stats["spec_decode_draft_tokens_total"] += sum(map(len, drafts))
            self._stats["spec_decode_accepted_tokens_total"] += sum(counts)
            self._recent.append((time.perf_counter(), sum(counts) + len(reqs)))
        columns = [Sampled(*(x[:, j] for x in out)) for j in range(out.tokens.shape[1])]
        for i, (r, m) in enumerate(zip(reqs, counts)):
            for col in columns[: m + 1]:
                if r.seq is None:  # ended (a stop, max_tokens or an error): drop the rest
                    break
                self._isolated([r], self._accept, r, *self._sampled(col, i, r))

    # ---- handing tokens over -------------------------------------------------------------

    def _accept(self, req: _Request, token: int, logprob: float | None = None,
                top: list[tuple[int, float]] | None = None) -> None:  # fmt: skip
        """Records a sampled token (and its log-probabilities, if the request asks), streams
        what became final, ends the request if due."""
        with self._lock:
            self._stats["generated_tokens_total"] += 1
        # A token sampled under the grammar's bitmask; refused only if the matcher failed.
        complete = req.matcher is not None and advance(req.matcher, token)
        if token in req.stops:
            self._emit(req, final=True)
            self._finish(req, "stop")
            return
        req.generated.append(token)
        if req.counts is not None:
            req.counts[token] += 2
        if logprob is not None:
            req.logprobs.append(logprob)
            req.top_logprobs.append(top)
        req.text.push(token)  # constant work per token: `jquant.serve.detok`
        at_length = len(req.generated) >= req.params.max_tokens
        if at_length or complete:
            req.text.flush()
        text = req.text.text
        cut = _first_stop(text, req.params.stop, req.sent_text)
        if cut is not None:
            self._emit(req, cut)
            self._finish(req, "stop")
        elif complete:  # the grammar allows nothing more (but EOS)
            self._emit(req, len(text))
            self._finish(req, "stop")
        elif at_length:
            self._emit(req, len(text))
            self._finish(req, "length")
        else:
            self._emit(req, _stable_end(text, req.params.stop))

    def _emit(self, req: _Request, end: int | None = None, *, final: bool = False) -> None:
        """Sends the text past what was sent, up to character ``end`` (``final``: all of
        it), and the new ids."""
        if final:
            req.text.flush()
            end = len(req.text.text)
        text = req.text.text
        delta = text[req.sent_text : end] if end > req.sent_text else ""
        start = req.sent_tokens
        ids = req.generated[start:]
        if not delta and not ids:
            return
        req.sent_text += len(delta)
        req.sent_tokens = len(req.generated)
        out = Output(req.id, delta, ids, None, len(req.prompt), len(req.generated))
        if req.params.logprobs is not None:
            out.logprobs, out.top_logprobs = req.logprobs[start:], req.top_logprobs[start:]
        self._call(req, out)

    def _finish(self, req: _Request, reason: str, error: str | None = None,
                code: str | None = None) -> None:  # fmt: skip
        """Ends a request that is waiting (drained from the inbox) or in a slot."""
        with self._lock:
            if self._by_id.pop(req.id, None) is None:
                return  # already finished
            if req.seq is not None:
                self.pool.release(req.seq)
                req.seq = None
            if req in self._running:
                self._running.remove(req)
            elif req in self._waiting:
                self._waiting.remove(req)
        out = Output(req.id, "", [], reason, len(req.prompt), len(req.generated), error, code)
        if req.params.logprobs is not None:
            out.logprobs, out.top_logprobs = [], []
        self._call(req, out)

    def _call(self, req: _Request, out: Output) -> None:
        """Runs a request's callback; one that raises (its client is gone) cancels it."""
        try:
            req.callback(out)
        except Exception:
            req.cancelled = True


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the earliest stop string starts in ``text`` (searching from just before what was
    already sent), or None."""
    if not stops:
        return None
    begin = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, begin) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stable_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` (complete characters: `IncrementalText` holds back a UTF-8
    sequence still incomplete) can be streamed: not a tail that is the start of a stop
    string."""
    full = end = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, full), 0, -1):
            if text[full - n : full] == s[:n]:
                end = min(end, full - n)
                break
    return end


def engine_report(engine: Engine) -> str:
    """The engine's memory in words (what ``jquant serve`` prints to stderr): slots, KV cache
    and weights in one line; under a mesh, the bytes per device, and one more line per
    tensor that stayed replicated."""
    runner = engine.runner
    line = (f"jquant serve: {engine.max_slots} rows, {engine.max_context} tokens per request, "
            f"KV cache {runner.fmt.name} {runner.num_pages} pages x {runner.page_size} tokens "
            f"{runner.cache.nbytes / 1e6:.1f} MB, weights "
            f"{runner.weight_bytes / 1e6:.1f} MB")  # fmt: skip
    if engine.adapters is not None:
        line += (f" (with {len(engine.adapter_names)} LoRA adapters of rank "
                 f"{engine.adapters.rank}: {', '.join(engine.adapter_names)})")  # fmt: skip
    if engine.speculative is not None:
        spec, m = engine.speculative, engine.metrics()
        line += (f"; speculative n-gram (n {spec.min_n}..{spec.max_n}) up to "
                 f"{spec.num_tokens} tokens: {m['spec_decode_draft_tokens_total']} drafted, "
                 f"{m['spec_decode_accepted_tokens_total']} accepted "
                 f"({100 * m['spec_decode_acceptance_rate']:.1f}%)")  # fmt: skip
    if engine.mesh is not None:
        from jquant.serve.tp import describe

        held = runner.per_device_bytes()  # this process's devices (all of them in one)
        line += (f"; {describe(engine.mesh)}: {max(held.values()) / 1e6:.1f} MB per "
                 f"device ({len(engine.tp_notes)} tensors replicated)")  # fmt: skip
    return "\n".join([line, *(f"  replicated: {note}" for note in engine.tp_notes)])
