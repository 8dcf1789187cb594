"""The serving engine's compiled programs over a paged KV cache: prefill, decode, score.

A `Runner` holds a model's parameters as the core forward reads them (`jquant.models.core`:
the decoder layers stacked and run by one ``lax.scan`` where their trees match, so the
programs compile in about the time of one layer; unrolled where a mixed-precision recipe
makes them differ) and a paged cache: a `PagedCache` (`jquant.models.cache`) of
``num_pages`` pages of ``page_size`` positions. Every program is the core forward over a
`PagedView` of it: row ``r`` of a step is a sequence whose positions live in the pages its
block table lists (`jquant.serve.pages` decides which), so what serving computes is what
`generate` and evaluation compute.

Shapes are fixed buckets, all compiled by `Runner.compile`:

- decode: ``(R, 1)`` tokens for ``R`` in power-of-two row buckets up to ``rows``, reading
  block tables of ``P`` pages for ``P`` in a few width buckets (the key length is
  ``P * page_size``);
- prefill: ``(R, C)`` tokens, ``R`` up to ``prefill_rows`` prompts at once, ``C`` from a
  few chunk buckets up to ``prefill_chunk``, over the full table width;
- verify (speculative decoding, with ``draft_tokens = K > 0``): ``(R, 1 + K)`` tokens in the
  decode step's row and width buckets, sampled after every column
  (`jquant.serve.speculative`).

With LoRA adapters (`jquant.serve.adapters`), each program also takes every row's adapter
slot, so rows of different adapters, and of none, run in the same step.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant._attention_path import attention_path
from jquant._expert_parallel import EP_AXIS, ExpertParallel, expert_parallel
from jquant.models import core
from jquant.models import sampling as _sampling
from jquant.models.cache import KVFormat, PagedCache, PagedView, init_paged_cache, kv_format
from jquant.models.config import LlamaConfig
from jquant.models.sampling import Penalties, Sampling, penalize, sample, top_logprobs
from jquant.serve.adapters import AdapterSet, bind_rows

__all__ = ["PagedCache", "Penalties", "Runner", "Sampled", "Sampling", "cache_perplexity"]


class Sampled(NamedTuple):
    """What one step sampled, per row: the token, and the log-probabilities of the model's
    own distribution (``log_softmax`` of its logits, before penalties, temperature, top-k
    and top-p, as vLLM returns them by default): the token's, and the
    `~jquant.models.sampling.MAX_TOP_LOGPROBS` most likely ids with theirs."""

    tokens: np.ndarray  # (n,) int32
    logprob: np.ndarray  # (n,) float32
    top_ids: np.ndarray  # (n, k) int32, most likely first
    top_logprobs: np.ndarray  # (n, k) float32


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the programs specialise on (hashable)."""

    model: core.Static
    fmt: KVFormat
    cache_sharding: Any = None  # the cache's placement under tensor parallelism, kept per step
    attention: str = "auto"  # the attention path (`jquant.ops.set_attention_path`)
    experts: Any = None  # the `ExpertParallel` plan of a mesh with an "ep" axis, else None


def _hidden(st: _Static, w, cache: PagedCache, tokens, tables, starts):
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    view = PagedView(cache, tables, positions, fmt=st.fmt, attention=st.attention)
    with expert_parallel(st.experts):
        x, view = core.hidden(st.model, w, tokens, view)
    return x, view.cache


def _placed(st: _Static, cache: PagedCache) -> PagedCache:
    if st.cache_sharding is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, st.cache_sharding)


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("cache",))
def _step(st, w, cache, tokens, tables, starts, last, sampling, penalties, bitmask,
          adapters=None):
    """Runs ``tokens (R, S)`` of the sequences with block tables ``tables (R, P)`` from
    positions ``starts``; samples one token per row from the logits at column ``last[r]``,
    penalized by ``penalties``, among the tokens ``bitmask (R, ceil(V / 32))`` allows
    (`jquant.models.sampling.allow`). Returns ``((tokens (R,), logprob (R,), top ids (R, k),
    top logprobs (R, k)), cache)``, the log-probabilities of the unpenalized, unmasked
    logits. With LoRA adapters, ``adapters (R,)`` are the rows' slots."""
    if adapters is not None:
        w = bind_rows(w, adapters)
    x, cache = _hidden(st, w, cache, tokens, tables, starts)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    logits = core.logits(st.model, w, x)[:, 0]
    out = sample(_sampling.allow(penalize(logits, penalties), bitmask), sampling)
    return (out, *top_logprobs(logits, out)), _placed(st, cache)


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("cache",))
def _window_nll(st, w, cache, tokens, tables):
    """Summed next-token NLL of each row of ``tokens (R, S)`` run through the cache (one
    prefill per row, pages ``tables[r]``, from position 0). Returns ``((R,) float32,
    cache)``."""
    r, s = tokens.shape
    x, cache = _hidden(st, w, cache, tokens, tables, jnp.zeros(r, jnp.int32))
    logits = core.logits(st.model, w, x)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked, axis=-1), _placed(st, cache)


# ---- speculative decoding: the verify program ---------------------------------------------


def _per_column(p: Penalties, tokens) -> Penalties:
    """``p`` for every column of ``tokens (R, S)``, flattened to ``R * S`` rows: column ``j``
    counts ``tokens[:, 1 : j + 1]`` (the drafts before it) as generated."""
    r, s = tokens.shape
    drafts = jax.nn.one_hot(tokens[:, 1:], p.counts.shape[-1], dtype=jnp.int32)
    before = jnp.cumsum(drafts, axis=1)
    counts = p.counts[:, None, :] + 2 * jnp.pad(before, ((0, 0), (1, 0), (0, 0)))
    rep = lambda x: jnp.repeat(x, s)  # noqa: E731
    return Penalties(rep(p.presence), rep(p.frequency), rep(p.repetition),
                     counts.reshape(r * s, -1))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("cache",))
def _verify(st, w, cache, tokens, tables, starts, sampling, penalties, adapters=None):
    """Runs ``tokens (R, S)`` (each row's last accepted token, then ``S - 1`` drafts) from
    positions ``starts`` and samples after every column as `_step` samples after its one:
    column ``j`` with counter ``sampling.counter + j`` and the penalties counting the drafts
    before it. Returns ``((tokens (R, S), logprob (R, S), top ids (R, S, k), top logprobs
    (R, S, k)), cache)``. With LoRA adapters, ``adapters (R,)`` are the rows' slots."""
    if adapters is not None:
        w = bind_rows(w, adapters)
    r, s = tokens.shape
    x, cache = _hidden(st, w, cache, tokens, tables, starts)
    logits = core.logits(st.model, w, x).astype(jnp.float32).reshape(r * s, -1)
    active = (penalties.presence != 0) | (penalties.frequency != 0) | (penalties.repetition != 1)
    scores = jax.lax.cond(jnp.any(active),
                          lambda: penalize(logits, _per_column(penalties, tokens)),
                          lambda: logits)  # fmt: skip
    cols = jnp.arange(s, dtype=jnp.int32)
    rows = Sampling(*(jnp.repeat(x, s) for x in sampling[:4]),
                    (sampling.counter[:, None] + cols[None, :]).reshape(-1))  # fmt: skip
    out = sample(scores, rows)
    result = (out, *top_logprobs(logits, out))
    return tuple(x.reshape(r, s, *x.shape[1:]) for x in result), _placed(st, cache)


def _buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """``smallest * 2**i`` below ``largest``, then ``largest``."""
    out, n = [], smallest
    while n < largest:
        out.append(n)
        n *= 2
    return (*out, largest)


class Runner:
    """A model's serving programs over a paged cache.

    Args:
      model: a `jquant.models.Llama` (its structure and dtype; parameters come from
        ``params``).
      params: its parameter State, float or quantized (QArrays).
      rows: sequences decoded in one step.
      max_len: positions one sequence may reach (prompt + completion of one request).
      page_size: positions per page.
      num_pages: pages in the cache (default: ``rows`` whole contexts, ``rows *
        ceil(max_len / page_size)``).
      prefill_chunk: the longest prefill chunk of one row; shorter chunks use power-of-two
        buckets from 16.
      prefill_rows: prompts prefilled in one step.
      kv_cache: the cache format (a name in `jquant.models.cache.KV_CACHE_FORMATS`; None: the
        compute dtype).
      shard: optional ``(params, cache) -> (params, cache)`` placing both on devices
        (tensor parallelism); the programs then run sharded (GSPMD), attention in XLA,
        and MoE experts expert parallel where the placement's mesh has an "ep" axis
        (`jquant._expert_parallel`).
      adapters: an `AdapterSet` of LoRA adapters a step's rows may each use (None: none).
      draft_tokens: drafts a verify step checks per row (speculative decoding); 0: no
        verify programs.

    Attention takes the path `jquant.ops.attention_path()` names when the Runner is made
    (``"kernel"``: `jquant.kernels.paged_attention`, reading the pages in place).
    """

    def __init__(self, model, params, *, rows: int, max_len: int, page_size: int = 16,
                 num_pages: int | None = None, prefill_chunk: int = 128,
                 prefill_rows: int = 4, kv_cache=None, shard=None,
                 adapters: AdapterSet | None = None, draft_tokens: int = 0):  # fmt: skip
        config: LlamaConfig = model.config
        if draft_tokens < 0:
            raise ValueError(f"Runner: draft_tokens={draft_tokens} must be >= 0")
        self.draft_tokens = draft_tokens
        if min(rows, page_size, prefill_chunk, prefill_rows) < 1 or max_len < 2:
            raise ValueError(
                f"Runner: rows={rows}, page_size={page_size}, prefill_chunk={prefill_chunk} "
                f"and prefill_rows={prefill_rows} must be >= 1, max_len={max_len} >= 2"
            )
        self.config, self.dtype = config, model.dtype
        self.rows, self.max_len, self.page_size = rows, max_len, page_size
        self.table_width = -(-max_len // page_size)
        self.num_pages = rows * self.table_width if num_pages is None else num_pages
        if self.num_pages < 1:
            raise ValueError(f"Runner: num_pages={self.num_pages} must be >= 1")
        self.fmt = kv_format(kv_cache)
        self.params = core.weights(params, config.num_layers)
        cache = init_paged_cache(config, self.num_pages, page_size, self.fmt, model.dtype)
        cache_sharding, attention, experts = None, attention_path(), None
        if shard is not None:
            if attention == "kernel":
                raise ValueError("Runner: the paged-attention kernel does not run on a "
                                 "sharded cache; use set_attention_path('auto') with shard")
            attention = "xla"
            self.params, cache = shard(self.params, cache)
            cache_sharding = jax.tree.map(lambda x: x.sharding, cache)
            mesh = getattr(cache.k.sharding, "mesh", None)
            if mesh is not None and EP_AXIS in mesh.shape:
                experts = ExpertParallel(mesh)
        self.adapters = adapters
        if adapters is not None:
            self.params = adapters.attach(self.params)
        self.cache = cache
        self._static = _Static(core.Static.of(model), self.fmt, cache_sharding, attention,
                               experts)  # fmt: skip
        self.prefill_buckets = _buckets(min(16, prefill_chunk), min(prefill_chunk, max_len))
        self.prefill_row_buckets = _buckets(1, min(prefill_rows, rows))
        self.width_buckets = _buckets(min(-(-128 // page_size), self.table_width),
                                      self.table_width)  # fmt: skip
        self.row_buckets = _buckets(1, rows)
        self._compiled: dict = {}
        self._verifiers: dict = {}  # (rows, width) -> the compiled verify program
        self._zeros: dict = {}
        self.compile_seconds = 0.0

    @property
    def programs(self) -> list[tuple[int, int, int]]:
        """The compiled programs: ``(rows, tokens per row, table width)`` each (prefill and
        decode, then verify)."""
        return list(self._compiled) + [(r, 1 + self.draft_tokens, w) for r, w in self._verifiers]

    @property
    def stacked(self) -> bool:
        """Whether the layers run as one scan (False: unrolled, mixed structures)."""
        return core.is_stacked(self.params["layers"])

    @property
    def weight_bytes(self) -> int:
        return core.weight_bytes(self.params)

    @property
    def capacity_tokens(self) -> int:
        """Positions the cache holds, over every page."""
        return self.num_pages * self.page_size

    def per_device_bytes(self) -> dict:
        """Bytes of parameters and cache each device holds (`jquant.sharding`'s count)."""
        from jquant.sharding import per_device_bytes

        return per_device_bytes((self.params, self.cache))

    def bytes_per_token(self) -> int:
        """KV-cache bytes one position of one sequence takes (all layers, K and V, scales)."""
        c = self.config
        return self.fmt.bytes_per_token(c.num_kv_heads, c.head_dim, c.num_layers, self.dtype)

    # ---- compilation -----------------------------------------------------------------

    def _program(self, rows: int, length: int, width: int):
        key = (rows, length, width)
        if key not in self._compiled:
            start = time.perf_counter()
            z = np.zeros(rows, np.int32)
            args = (np.zeros((rows, length), np.int32), np.zeros((rows, width), np.int32),
                    z, z, Sampling.greedy(rows), self._no_penalties(rows),
                    self._allow_all(rows), self._slots(None, rows))  # fmt: skip
            lowered = _step.lower(self._static, self.params, self.cache, *args)
            self._compiled[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def _verifier(self, rows: int, width: int):
        key = (rows, width)
        if key not in self._verifiers:
            start = time.perf_counter()
            z = np.zeros(rows, np.int32)
            args = (np.zeros((rows, 1 + self.draft_tokens), np.int32),
                    np.zeros((rows, width), np.int32), z, Sampling.greedy(rows),
                    self._no_penalties(rows), self._slots(None, rows))  # fmt: skip
            lowered = _verify.lower(self._static, self.params, self.cache, *args)
            self._verifiers[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - start
        return self._verifiers[key]

    def compile(self) -> float:
        """Compiles every decode, prefill and verify program now; returns the seconds it
        took."""
        before = self.compile_seconds
        for width in self.width_buckets:
            for rows in self.row_buckets:
                self._program(rows, 1, width)
        for rows in self.prefill_row_buckets:
            for chunk in self.prefill_buckets:
                self._program(rows, chunk, self.table_width)
        if self.draft_tokens:
            for width in self.width_buckets:
                for rows in self.row_buckets:
                    self._verifier(rows, width)
        return self.compile_seconds - before

    # ---- running ---------------------------------------------------------------------

    def prefill_bucket(self, n: int) -> int:
        """The chunk length ``n`` prompt tokens run as (the largest bucket caps a chunk)."""
        return next((b for b in self.prefill_buckets if b >= n), self.prefill_buckets[-1])

    def _tables(self, tables, rows: int, width: int) -> np.ndarray:
        """Block tables (lists of pages, None for a released one) as int32 ``(rows,
        width)``: each padded with `num_pages` (no page: writes dropped, reads masked), rows
        past ``len(tables)`` copies of the first."""
        out = np.full((rows, width), self.num_pages, np.int32)
        for i, t in enumerate(tables):
            t = [self.num_pages if p is None else p for p in t[:width]]
            out[i, : len(t)] = t
        out[len(tables):] = out[0]
        return out

    def _no_penalties(self, rows: int) -> Penalties:
        """No penalty for ``rows`` rows, its count array made once and kept on the device."""
        key = ("no_penalties", rows)
        if key not in self._zeros:
            self._zeros[key] = Penalties(*map(jnp.asarray, Penalties.none(
                rows, self.config.vocab_size)))  # fmt: skip
        return self._zeros[key]

    def _penalties(self, penalties: Penalties | None, rows: int) -> Penalties:
        if penalties is None:
            return self._no_penalties(rows)
        return Penalties(*(_pad(x, rows) for x in penalties))

    def _allow_all(self, rows: int) -> jax.Array:
        """A bitmask allowing every token in ``rows`` rows, made once and kept on the
        device: a step without a constrained row passes this."""
        key = ("allow_all", rows)
        if key not in self._zeros:
            self._zeros[key] = jnp.asarray(_sampling.allow_all(rows, self.config.vocab_size))
        return self._zeros[key]

    def _bitmask(self, bitmask, rows: int) -> jax.Array | np.ndarray:
        return self._allow_all(rows) if bitmask is None else _pad(bitmask, rows)

    def _slots(self, adapters, rows: int) -> np.ndarray | None:
        """The rows' adapter slots (None: all 0, the base) padded like the rows, or None
        when the runner has no adapters."""
        if self.adapters is None:
            if adapters is not None and any(adapters):
                raise ValueError("this runner has no LoRA adapters; every row's slot is 0")
            return None
        slots = np.asarray([0] if adapters is None else adapters, np.int32)
        if slots.min() < 0 or slots.max() > len(self.adapters.names):
            raise ValueError(f"adapter slots {slots.tolist()} must be in [0, "
                             f"{len(self.adapters.names)}]")  # fmt: skip
        return _pad(slots, rows)

    def _result(self, out, n: int, logprobs: bool):
        if not logprobs:
            return np.asarray(out[0])[:n]
        return Sampled(*(np.asarray(x)[:n] for x in out))

    def prefill(self, tables, chunks, starts, sampling: Sampling,
                penalties: Penalties | None = None, *, logprobs: bool = False,
                bitmask=None, adapters=None):  # fmt: skip
        """Runs prompt chunks, ``chunks[i]`` (at most ``prefill_buckets[-1]`` tokens) of the
        sequence with block table ``tables[i]`` from position ``starts[i]``, at most
        ``prefill_row_buckets[-1]`` of them; returns the token sampled after each chunk's
        last (``sampling``, ``penalties`` and the token ``bitmask`` (int32 ``(n, ceil(V /
        32))``), None for none: one row per chunk); with ``logprobs``, a `Sampled` of them
        and their log-probabilities. ``adapters``: each chunk's adapter slot (None: the base
        for all)."""
        n = len(chunks)
        if not 1 <= n <= self.prefill_row_buckets[-1]:
            raise ValueError(f"prefill of {n} chunks; 1 to {self.prefill_row_buckets[-1]} "
                             "fit one step")  # fmt: skip
        longest = max(len(c) for c in chunks)
        chunk = self.prefill_bucket(longest)
        for c, s in zip(chunks, starts):
            if not c or len(c) > chunk or s + len(c) > self.max_len:
                raise ValueError(f"prefill of {len(c)} tokens at {s} does not fit (chunk "
                                 f"{chunk}, max_len {self.max_len})")  # fmt: skip
        rows = next(b for b in self.prefill_row_buckets if b >= n)
        tokens = np.zeros((rows, chunk), np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = c
        # Padding rows repeat row 0 with its tokens, so they write what row 0 writes.
        tokens[n:] = tokens[0]
        pad = lambda x: np.concatenate([x, np.repeat(x[:1], rows - n)])  # noqa: E731
        last = pad(np.array([len(c) - 1 for c in chunks], np.int32))
        program = self._program(rows, chunk, self.table_width)
        out, self.cache = program(self.params, self.cache, tokens,
                                  self._tables(tables, rows, self.table_width),
                                  pad(np.asarray(starts, np.int32)), last,
                                  _pad_sampling(sampling, rows),
                                  self._penalties(penalties, rows),
                                  self._bitmask(bitmask, rows),
                                  self._slots(adapters, rows))  # fmt: skip
        return self._result(out, n, logprobs)

    def decode(self, tables, tokens, positions, sampling: Sampling,
               penalties: Penalties | None = None, *, logprobs: bool = False,
               bitmask=None, adapters=None):  # fmt: skip
        """One token for each sequence: ``tokens[i]`` at ``positions[i]`` of the sequence
        with block table ``tables[i]``, sampled by row ``i`` of ``sampling``, of
        ``penalties`` and of the token ``bitmask`` (None: none), with adapter slot
        ``adapters[i]`` (None: the base for all); with ``logprobs``, a `Sampled`.

        Runs the smallest compiled batch that holds them (rows padded with copies of the
        first, which write the same key and value again) over the narrowest table width
        that holds the furthest position. Returns the sampled ids, one per sequence."""
        n = len(tokens)
        rows = next(b for b in self.row_buckets if b >= n)
        pad = lambda x: np.concatenate([x, np.repeat(x[:1], rows - n, axis=0)])  # noqa: E731
        positions = pad(np.asarray(positions, np.int32))
        need = int(positions.max()) // self.page_size + 1
        width = next(b for b in self.width_buckets if b >= need)
        program = self._program(rows, 1, width)
        tokens = pad(np.asarray(tokens, np.int32))[:, None]
        out, self.cache = program(self.params, self.cache, tokens,
                                  self._tables(tables, rows, width), positions,
                                  np.zeros(rows, np.int32),
                                  _pad_sampling(sampling, rows),
                                  self._penalties(penalties, rows),
                                  self._bitmask(bitmask, rows),
                                  self._slots(adapters, rows))  # fmt: skip
        return self._result(out, n, logprobs)

    def verify(self, tables, tokens, positions, sampling: Sampling,
               penalties: Penalties | None = None, *, logprobs: bool = False,
               adapters=None):  # fmt: skip
        """A speculative step: ``tokens[i]`` (the last accepted token, then at most
        ``draft_tokens`` drafts) from ``positions[i]`` of the sequence with block table
        ``tables[i]``, sampled after every column by row ``i`` of ``sampling`` (counter ``+
        j`` at column ``j``) and of ``penalties`` (None: none), each column counting the
        drafts before it as generated, with adapter slot ``adapters[i]`` (None: the base for
        all). Returns ``(n, 1 + draft_tokens)`` ids; with
        ``logprobs``, a `Sampled` of such arrays. Columns past a row's drafts are padding
        (their samples mean nothing); their writes land past its drafts' positions, in its
        own pages or nowhere, so the table must hold the drafts' positions only.

        Runs like `decode`: the smallest row bucket, the narrowest width bucket that holds
        the furthest draft."""
        if not self.draft_tokens:
            raise ValueError("verify: this Runner was built with draft_tokens=0")
        n, s = len(tokens), 1 + self.draft_tokens
        if any(not 1 <= len(t) <= s for t in tokens):
            raise ValueError(f"verify: each row takes 1 to {s} tokens, got "
                             f"{[len(t) for t in tokens]}")  # fmt: skip
        rows = next(b for b in self.row_buckets if b >= n)
        grid = np.zeros((rows, s), np.int32)
        for i, t in enumerate(tokens):
            grid[i, : len(t)], grid[i, len(t) :] = t, t[-1]
        grid[n:] = grid[0]
        furthest = max(p + len(t) - 1 for p, t in zip(positions, tokens))
        if furthest >= self.max_len:
            raise ValueError(f"verify: a row reaches position {furthest}; max_len is "
                             f"{self.max_len}")  # fmt: skip
        width = next(b for b in self.width_buckets if b > furthest // self.page_size)
        positions = _pad(np.asarray(positions, np.int32), rows)
        program = self._verifier(rows, width)
        out, self.cache = program(self.params, self.cache, grid,
                                  self._tables(tables, rows, width), positions,
                                  _pad_sampling(sampling, rows),
                                  self._penalties(penalties, rows),
                                  self._slots(adapters, rows))  # fmt: skip
        return self._result(out, n, logprobs)

    def window_nll(self, windows) -> np.ndarray:
        """Summed next-token NLL of each row of ``windows (R, S)``, ``S <= max_len`` and
        ``R * ceil(S / page_size) <= num_pages``, each run as one prefill through the cache
        (the serving path) in pages of its own, by the base model (no adapter)."""
        windows = jnp.asarray(windows, jnp.int32)
        r, s = windows.shape
        width = -(-s // self.page_size)
        if s > self.max_len or r * width > self.num_pages:
            raise ValueError(f"window_nll: {r} windows of {s} tokens need {r * width} pages "
                             f"of {self.page_size}; the cache has {self.num_pages}")  # fmt: skip
        tables = np.arange(r * width, dtype=np.int32).reshape(r, width)
        params = self.params
        if self.adapters is not None:  # the base model's NLL
            params = bind_rows(params, jnp.zeros(r, jnp.int32))
        nll, self.cache = _window_nll(self._static, params, self.cache, windows, tables)
        return np.asarray(nll)


def _pad(x, rows: int) -> np.ndarray:
    """``x`` with rows past its own repeating its first, up to ``rows``."""
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


def _pad_sampling(sampling: Sampling, rows: int) -> Sampling:
    """``sampling`` with rows past its own repeating its first, up to ``rows``."""
    return Sampling(*(_pad(x, rows) for x in sampling))


def cache_perplexity(model, params, text, *, tokenizer=None, kv_cache=None,
                     seq_len: int = 512, max_tokens: int | None = None,
                     batch_size: int = 4, progress: bool = False,
                     bos_token_id: int | None = None):  # fmt: skip
    """`jquant.eval.perplexity` through the serving KV cache: each window is prefilled into a
    `PagedCache` of format ``kv_cache`` and every query attends to the cache's (quantized)
    keys and values, as in serving. The same windows (a leading BOS exactly when the
    tokenizer's ``add_bos_token`` says, or ``bos_token_id`` asks). Returns a
    `jquant.eval.PerplexityResult`."""
    from jquant.eval.perplexity import score_windows

    def make_step(rows: int):
        runner = Runner(model, params, rows=rows, max_len=seq_len, kv_cache=kv_cache)
        return runner.window_nll

    return score_windows(make_step, text, tokenizer=tokenizer, seq_len=seq_len,
                         max_tokens=max_tokens, batch_size=batch_size, progress=progress,
                         bos_token_id=bos_token_id)  # fmt: skip
