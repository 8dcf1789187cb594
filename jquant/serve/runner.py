"""The serving engine's compiled programs: prefill a chunk, decode every slot, score windows.

A `Runner` holds a model's parameters as the core forward reads them (`jquant.models.core`:
the decoder layers stacked and run by one ``lax.scan`` where their trees match, so the
programs compile in about the time of one layer; unrolled where a mixed-precision recipe
makes them differ) and a `SlotCache` (`jquant.models.cache`): one row per slot, each row its
own sequence at its own length. Every program is the core forward over a `SlotView` of the
cache, so what serving computes is what `generate` and evaluation compute.

Shapes are fixed: the decode step runs ``R`` slots (``(R, 1)`` tokens) for ``R`` in
power-of-two row buckets up to the number of slots, and attends to the first ``key_len``
positions for ``key_len`` in a few key-length buckets; a prefill chunk is one slot's next
``C`` prompt tokens, ``C`` from a few buckets. All of them are compiled by `Runner.compile`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.models import core
from jquant.models.cache import KVFormat, SlotCache, SlotView, init_slot_cache, kv_format
from jquant.models.config import LlamaConfig
from jquant.models.sampling import Sampling, sample

__all__ = ["Runner", "Sampling", "SlotCache", "cache_perplexity"]


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the programs specialise on (hashable)."""

    model: core.Static
    fmt: KVFormat
    cache_sharding: Any = None  # the cache's placement under tensor parallelism, kept per step


def _hidden(st: _Static, w, cache: SlotCache, tokens, rows, starts, key_len: int):
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    view = SlotView(cache, rows, positions, key_len=key_len, fmt=st.fmt)
    x, view = core.hidden(st.model, w, tokens, view)
    return x, view.cache


def _placed(st: _Static, cache: SlotCache) -> SlotCache:
    if st.cache_sharding is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, st.cache_sharding)


@functools.partial(jax.jit, static_argnames=("st", "key_len"),
                   donate_argnames=("cache",))  # fmt: skip
def _step(st, w, cache, tokens, rows, starts, last, sampling, *, key_len):
    """Runs ``tokens (R, S)`` of slots ``rows`` from positions ``starts``; samples one token
    per row from the logits at column ``last[r]``. Returns ``(tokens (R,), cache)``."""
    x, cache = _hidden(st, w, cache, tokens, rows, starts, key_len)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    logits = core.logits(st.model, w, x)[:, 0]
    return sample(logits, sampling), _placed(st, cache)


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("cache",))
def _window_nll(st, w, cache, tokens):
    """Summed next-token NLL of each row of ``tokens (R, S)`` run through the cache (one
    prefill per row, slot ``r``, from position 0). Returns ``((R,) float32, cache)``."""
    r, s = tokens.shape
    rows = jnp.arange(r, dtype=jnp.int32)
    x, cache = _hidden(st, w, cache, tokens, rows, jnp.zeros(r, jnp.int32), s)
    logits = core.logits(st.model, w, x)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked, axis=-1), _placed(st, cache)


def _buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """``smallest * 2**i`` below ``largest``, then ``largest``."""
    out, n = [], smallest
    while n < largest:
        out.append(n)
        n *= 2
    return (*out, largest)


class Runner:
    """A model's serving programs over a `SlotCache` of ``slots`` rows of ``max_len``.

    Args:
      model: a `jquant.models.Llama` (its structure and dtype; parameters come from
        ``params``).
      params: its parameter State, float or quantized (QArrays).
      slots: rows of the cache (sequences served at once).
      max_len: positions per row (prompt + completion of one request).
      prefill_chunk: the longest prefill chunk; shorter chunks use power-of-two buckets
        from 16.
      kv_cache: the cache format (a name in `jquant.models.cache.KV_CACHE_FORMATS`; None: the
        compute dtype).
      shard: optional ``(params, cache) -> (params, cache)`` placing both on devices
        (tensor parallelism); the programs then run sharded (GSPMD).
    """

    def __init__(self, model, params, *, slots: int, max_len: int,
                 prefill_chunk: int = 128, kv_cache=None, shard=None):  # fmt: skip
        config: LlamaConfig = model.config
        if slots < 1 or max_len < 2 or prefill_chunk < 1:
            raise ValueError(
                f"Runner: slots={slots}, max_len={max_len}, prefill_chunk={prefill_chunk} "
                "must be >= 1, >= 2 and >= 1"
            )
        self.config, self.dtype = config, model.dtype
        self.slots, self.max_len = slots, max_len
        self.fmt = kv_format(kv_cache)
        self.params = core.weights(params, config.num_layers)
        cache = init_slot_cache(config, slots, max_len, self.fmt, model.dtype)
        cache_sharding = None
        if shard is not None:
            self.params, cache = shard(self.params, cache)
            cache_sharding = jax.tree.map(lambda x: x.sharding, cache)
        self.cache = cache
        self._static = _Static(core.Static.of(model), self.fmt, cache_sharding)
        self.prefill_buckets = _buckets(min(16, prefill_chunk), min(prefill_chunk, max_len))
        self.key_buckets = _buckets(min(128, max_len), max_len)
        self.row_buckets = _buckets(1, slots)
        self._compiled: dict = {}
        self.compile_seconds = 0.0

    @property
    def programs(self) -> list[tuple[int, int, int, bool]]:
        """The compiled programs: ``(rows, tokens per row, key_len)`` each."""
        return list(self._compiled)

    @property
    def stacked(self) -> bool:
        """Whether the layers run as one scan (False: unrolled, mixed structures)."""
        return core.is_stacked(self.params["layers"])

    @property
    def weight_bytes(self) -> int:
        return core.weight_bytes(self.params)

    def per_device_bytes(self) -> dict:
        """Bytes of parameters and cache each device holds (`jquant.sharding`'s count)."""
        from jquant.sharding import per_device_bytes

        return per_device_bytes((self.params, self.cache))

    def bytes_per_token(self) -> int:
        """KV-cache bytes one token of one slot takes (all layers, K and V, scales)."""
        c = self.config
        return self.fmt.bytes_per_token(c.num_kv_heads, c.head_dim, c.num_layers, self.dtype)

    # ---- compilation -----------------------------------------------------------------

    def _args(self, rows: int, length: int):
        z = np.zeros(rows, np.int32)
        return (np.zeros((rows, length), np.int32), z, z, z, Sampling.greedy(rows))

    def _program(self, rows: int, length: int, key_len: int):
        key = (rows, length, key_len)
        if key not in self._compiled:
            start = time.perf_counter()
            lowered = _step.lower(self._static, self.params, self.cache,
                                  *self._args(rows, length), key_len=key_len)  # fmt: skip
            self._compiled[key] = lowered.compile()
            self.compile_seconds += time.perf_counter() - start
        return self._compiled[key]

    def compile(self) -> float:
        """Compiles every decode and prefill program now; returns the seconds it took."""
        before = self.compile_seconds
        for key_len in self.key_buckets:
            for rows in self.row_buckets:
                self._program(rows, 1, key_len)
        for chunk in self.prefill_buckets:
            self._program(1, chunk, self.max_len)
        return self.compile_seconds - before

    # ---- running ---------------------------------------------------------------------

    def prefill_bucket(self, n: int) -> int:
        """The chunk length ``n`` prompt tokens run as (the largest bucket caps a chunk)."""
        return next((b for b in self.prefill_buckets if b >= n), self.prefill_buckets[-1])

    def prefill(self, slot: int, tokens, start: int, sampling: Sampling) -> int:
        """Runs prompt ``tokens`` (at most the largest bucket) of ``slot`` from position
        ``start``; returns the token sampled after the last of them."""
        n = len(tokens)
        chunk = self.prefill_bucket(n)
        if n > chunk or start + n > self.max_len:
            raise ValueError(f"prefill of {n} tokens at {start} does not fit (chunk {chunk}, "
                             f"max_len {self.max_len})")  # fmt: skip
        padded = np.zeros((1, chunk), np.int32)
        padded[0, :n] = tokens
        program = self._program(1, chunk, self.max_len)
        out, self.cache = program(self.params, self.cache, padded,
                                  np.array([slot], np.int32), np.array([start], np.int32),
                                  np.array([n - 1], np.int32), sampling)  # fmt: skip
        return int(np.asarray(out)[0])

    def decode(self, slots, tokens, positions, sampling: Sampling) -> np.ndarray:
        """One token for each of ``slots`` (distinct slot indices): ``tokens`` at
        ``positions`` (all of that length), sampled by the rows of ``sampling``.

        Runs the smallest compiled batch that holds them (rows padded with copies of the
        first, which write the same key and value again) attending to the smallest key
        bucket that holds the longest. Returns the sampled ids, one per slot."""
        n = len(slots)
        rows = next(b for b in self.row_buckets if b >= n)
        pad = lambda x, dtype: np.concatenate(  # noqa: E731
            [np.asarray(x, dtype), np.repeat(np.asarray(x, dtype)[:1], rows - n, axis=0)])
        positions = pad(positions, np.int32)
        key_len = next(b for b in self.key_buckets if b > int(positions.max()))
        program = self._program(rows, 1, key_len)
        sampling = Sampling(*(pad(x, np.asarray(x).dtype) for x in sampling))
        out, self.cache = program(self.params, self.cache, pad(tokens, np.int32)[:, None],
                                  pad(slots, np.int32), positions, np.zeros(rows, np.int32),
                                  sampling)  # fmt: skip
        return np.asarray(out)[:n]

    def window_nll(self, windows) -> np.ndarray:
        """Summed next-token NLL of each row of ``windows (R, S)``, ``R <= slots`` and
        ``S <= max_len``, each run as one prefill through the cache (the serving path)."""
        windows = jnp.asarray(windows, jnp.int32)
        nll, self.cache = _window_nll(self._static, self.params, self.cache, windows)
        return np.asarray(nll)


def cache_perplexity(model, params, text, *, tokenizer=None, kv_cache=None,
                     seq_len: int = 512, max_tokens: int | None = None,
                     batch_size: int = 4, progress: bool = False,
                     bos_token_id: int | None = None):  # fmt: skip
    """`jquant.eval.perplexity` through the serving KV cache: each window is prefilled into a
    `SlotCache` of format ``kv_cache`` and every query attends to the cache's (quantized)
    keys and values, as in serving. The same windows (a leading BOS exactly when the
    tokenizer's ``add_bos_token`` says, or ``bos_token_id`` asks). Returns a
    `jquant.eval.PerplexityResult`."""
    from jquant.eval.perplexity import score_windows

    def make_step(rows: int):
        runner = Runner(model, params, slots=rows, max_len=seq_len, kv_cache=kv_cache)
        return runner.window_nll

    return score_windows(make_step, text, tokenizer=tokenizer, seq_len=seq_len,
                         max_tokens=max_tokens, batch_size=batch_size, progress=progress,
                         bos_token_id=bos_token_id)  # fmt: skip
