"""The serving engine's compiled programs: prefill a chunk, decode every slot, score windows.

A `Runner` holds a Llama-family model's parameters in the layout serving wants — the decoder
layers stacked along a leading axis, so the programs run them with one ``lax.scan`` and
compile in about the time of one layer — and a `SlotCache`: one row per slot, each row its
own sequence at its own length (unlike `jquant.models.KVCache`, whose rows share one write
index). Every program writes a token's key and value at ``(slot, position)`` and lets a query
at position ``p`` attend to its slot's keys at positions ``<= p``; stale keys of an earlier
request beyond ``p`` are never read, so a freed slot needs no clearing.

Shapes are fixed: the decode step runs ``R`` slots (``(R, 1)`` tokens) for ``R`` in
power-of-two row buckets up to the number of slots, and attends to the first ``key_len``
positions for ``key_len`` in a few key-length buckets; a prefill chunk is one slot's next
``C`` prompt tokens, ``C`` from a few buckets. All of them are compiled by `Runner.compile`.

Layers whose parameters differ in structure (a mixed-precision recipe) cannot be stacked;
they run unrolled, which is exact but compiles longer.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models import blocks
from jquant.models.config import LlamaConfig
from jquant.models.llama import rope_tables
from jquant.qarray import QArray
from jquant.serve.kv import SCALE_DTYPE, KVFormat, kv_format


class SlotCache(NamedTuple):
    """Keys and values of every layer for ``slots`` independent sequences.

    Attributes:
      k, v: ``(layers, slots, kv_heads, max_len, head_dim)``: values in the compute dtype,
        or codes (int8 / fp8) of a quantized format. Heads before positions: each (slot,
        head) is one contiguous ``(positions, head_dim)`` matrix, the layout attention's
        batched matmuls take without a transpose.
      k_scale, v_scale: ``(layers, slots, kv_heads, max_len)`` bfloat16 per-token, per-head
        scales of a quantized format; None otherwise.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in self if x is not None)


def init_slot_cache(config: LlamaConfig, slots: int, max_len: int, fmt: KVFormat,
                    dtype) -> SlotCache:  # fmt: skip
    """An all-zero `SlotCache`."""
    shape = (config.num_layers, slots, config.num_kv_heads, max_len, config.head_dim)
    if not fmt.quantized:
        return SlotCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), None, None)
    codes, scales = (lambda: jnp.zeros(shape, fmt.storage)), (
        lambda: jnp.zeros(shape[:-1], SCALE_DTYPE))
    return SlotCache(codes(), codes(), scales(), scales())


class Sampling(NamedTuple):
    """Per-row sampling parameters (arrays of shape ``(rows,)``)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    seed: jax.Array  # uint32
    counter: jax.Array  # int32: how many tokens this request has sampled so far

    @staticmethod
    def greedy(rows: int) -> Sampling:
        return Sampling(np.zeros(rows, np.float32), np.zeros(rows, np.int32),
                        np.ones(rows, np.float32), np.zeros(rows, np.uint32),
                        np.zeros(rows, np.int32))  # fmt: skip


def sample_rows(logits: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids ``(rows,)`` from float32 ``logits (rows, V)``, each row with its own
    temperature, top-k, top-p and key (``fold_in(key(seed), counter)``).

    The same rule as `jquant.models.generate.sample`: logits / temperature, keep the top_k
    largest, then the smallest set whose probability reaches top_p; temperature 0 is argmax.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic():
        vocab = logits.shape[-1]
        t = jnp.where(s.temperature > 0, s.temperature, 1).astype(jnp.float32)
        scaled = logits / t[:, None]
        ordered = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
        in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
        probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = in_top_k & (before < s.top_p[:, None])
        count = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(ordered, count - 1, axis=-1)
        masked = jnp.where(scaled < threshold, -jnp.inf, scaled)
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(
            s.seed, s.counter
        )
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked)
        return jnp.where(s.temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(s.temperature > 0), stochastic, lambda: greedy)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the programs specialise on (hashable)."""

    config: LlamaConfig
    embed: nnx.GraphDef
    layer: nnx.GraphDef
    norm: nnx.GraphDef
    tied: bool
    stacked: bool
    fmt: KVFormat
    dtype: Any
    cache_sharding: Any = None  # the cache's placement under tensor parallelism, kept per step


def stack_layers(params: nnx.State, num_layers: int):
    """``(layers, stacked)``: the decoder layers' States stacked along a new leading axis
    (QArrays included) when every layer has the same structure, else the list of States."""
    states = [blocks.layer_params(params, i) for i in range(num_layers)]
    structures = {jax.tree.structure(s) for s in states}
    shapes = {tuple(x.shape for x in jax.tree.leaves(s)) for s in states}
    if len(structures) != 1 or len(shapes) != 1:
        return states, False
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states), True


def _write(cache: SlotCache, layer, rows, positions, k, v, fmt: KVFormat) -> SlotCache:
    """Stores ``k``/``v (R, S, KV, Dh)`` at ``(layer, rows[r], :, positions[r, s])``;
    positions past the cache are dropped (the padding of a last prefill chunk)."""
    at = (layer, rows[:, None], slice(None), positions)
    if not fmt.quantized:
        return cache._replace(k=cache.k.at[at].set(k.astype(cache.k.dtype), mode="drop"),
                              v=cache.v.at[at].set(v.astype(cache.v.dtype), mode="drop"))
    (kc, ks), (vc, vs) = fmt.quantize(k), fmt.quantize(v)
    return SlotCache(
        cache.k.at[at].set(kc, mode="drop"), cache.v.at[at].set(vc, mode="drop"),
        cache.k_scale.at[at].set(ks, mode="drop"), cache.v_scale.at[at].set(vs, mode="drop"),
    )  # fmt: skip


def _read(cache: SlotCache, layer, rows, key_len: int):
    """The first ``key_len`` positions of ``rows``' keys, values ``(R, T, KV, Dh)`` and
    scales ``(R, T, KV)`` at ``layer``, as `attend` takes them (the transposes fold into its
    matmuls: the cache's own layout is what they read)."""

    def take(x):
        if x is None:
            return None
        return jnp.swapaxes(x[layer, rows, :, :key_len], 1, 2)

    return tuple(take(x) for x in cache)


def _layer_inputs(config: LlamaConfig, positions, key_len: int):
    """``(full, local)`` ``(cos, sin, allowed)`` of full-attention and sliding-window layers
    (``local`` None without sliding layers): a query at position ``p`` sees its slot's keys
    at positions ``<= p``, and in a sliding layer only those ``> p - window``."""
    key_pos = jnp.arange(key_len, dtype=jnp.int32)[None, None, :]
    causal = key_pos <= positions[:, :, None]
    full = (*rope_tables(config, positions), causal)
    if not config.has_sliding:
        return full, None
    window = causal & (key_pos > positions[:, :, None] - config.sliding_window)
    return full, (*rope_tables(config, positions, local=True), window)


def _run_layers(st: _Static, layers, x, cache, rows, positions, key_len):
    config = st.config
    full, local = _layer_inputs(config, positions, key_len)

    def layer_fn(x, cache, state, i, inputs):
        cos, sin, allowed = inputs
        layer = nnx.merge(st.layer, state)
        attn = layer.self_attn
        q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
        cache = _write(cache, i, rows, positions, k, v, st.fmt)
        kr, vr, ks, vs = _read(cache, i, rows, key_len)
        h = attn.o_proj(attn.attend(q, kr, vr, allowed, k_scale=ks, v_scale=vs))
        return layer.mlp_residual(layer.attn_residual(x, h)), cache

    if not st.stacked:
        for i, state in enumerate(layers):
            inputs = local if config.is_sliding(i) else full
            x, cache = layer_fn(x, cache, state, jnp.int32(i), inputs)
        return x, cache

    def body(carry, xs):
        state, i, sliding = xs
        inputs = full
        if local is not None:  # this layer's RoPE tables and mask
            inputs = tuple(jnp.where(sliding, a, b) for a, b in zip(local, full))
        return layer_fn(*carry, state, i, inputs), None

    index = jnp.arange(config.num_layers, dtype=jnp.int32)
    sliding = jnp.asarray([config.is_sliding(i) for i in range(config.num_layers)])
    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, index, sliding))
    return x, cache


def _hidden(st: _Static, params, cache, tokens, rows, starts, key_len):
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    x = nnx.merge(st.embed, params["embed"])(tokens, st.dtype)
    return _run_layers(st, params["layers"], x, cache, rows, positions, key_len)


def _head(st: _Static, params, x):
    table = params["embed"] if st.tied else params["head"]
    return blocks.apply_head(st.norm, params["norm"], table, x, tied=st.tied,
                             softcap=st.config.final_logit_softcap)  # fmt: skip


def _placed(st: _Static, cache: SlotCache) -> SlotCache:
    if st.cache_sharding is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, st.cache_sharding)


@functools.partial(jax.jit, static_argnames=("st", "key_len"),
                   donate_argnames=("cache",))  # fmt: skip
def _step(st, params, cache, tokens, rows, starts, last, sampling, *, key_len):
    """Runs ``tokens (R, S)`` of slots ``rows`` from positions ``starts``; samples one token
    per row from the logits at column ``last[r]``. Returns ``(tokens (R,), cache)``."""
    x, cache = _hidden(st, params, cache, tokens, rows, starts, key_len)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)
    logits = _head(st, params, x)[:, 0]
    return sample_rows(logits, sampling), _placed(st, cache)


@functools.partial(jax.jit, static_argnames=("st",), donate_argnames=("cache",))
def _window_nll(st, params, cache, tokens):
    """Summed next-token NLL of each row of ``tokens (R, S)`` run through the cache (one
    prefill per row, slot ``r``, from position 0). Returns ``((R,) float32, cache)``."""
    r, s = tokens.shape
    rows = jnp.arange(r, dtype=jnp.int32)
    x, cache = _hidden(st, params, cache, tokens, rows, jnp.zeros(r, jnp.int32), s)
    logits = _head(st, params, x)[:, :-1]
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
      kv_cache: the cache format (`jquant.serve.kv.kv_format` names: None, "int8", "fp8").
      shard: optional ``(params, cache) -> (params, cache)`` placing both on devices
        (tensor parallelism); the programs then run sharded (GSPMD).
    """

    def __init__(self, model, params: nnx.State, *, slots: int, max_len: int,
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
        layers, stacked = stack_layers(params, config.num_layers)
        tied = config.tie_word_embeddings
        # A tied head reads the embedding table (kept once, not passed twice).
        self.params = {"embed": params["embed_tokens"], "layers": layers, "norm": params["norm"]}
        if not tied:
            self.params["head"] = params["lm_head"]
        cache = init_slot_cache(config, slots, max_len, self.fmt, model.dtype)
        cache_sharding = None
        if shard is not None:
            self.params, cache = shard(self.params, cache)
            cache_sharding = jax.tree.map(lambda x: x.sharding, cache)
        self.cache = cache
        self._static = _Static(
            config=config,
            embed=nnx.graphdef(model.embed_tokens),
            layer=blocks.layer_graphdef(model),
            norm=nnx.graphdef(model.norm),
            tied=tied,
            stacked=stacked,
            fmt=self.fmt,
            dtype=model.dtype,
            cache_sharding=cache_sharding,
        )
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
        return self._static.stacked

    @property
    def weight_bytes(self) -> int:
        leaves = jax.tree.leaves(self.params, is_leaf=lambda x: isinstance(x, QArray))
        return int(sum(x.nbytes for x in leaves))

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
    import math

    from tqdm import tqdm

    from jquant.eval.perplexity import PerplexityResult, cut_windows
    from jquant.io.tokenizer import leading_bos

    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("perplexity of a str needs a tokenizer (or pass token ids)")
        if bos_token_id is None:
            bos_token_id = leading_bos(tokenizer)
        text = tokenizer.encode(text, add_special_tokens=False)
    windows = cut_windows(text, seq_len, max_tokens, bos_token_id=bos_token_id)
    n = len(windows)
    batch_size = max(1, min(batch_size, n))
    padded = np.zeros((-(-n // batch_size) * batch_size, seq_len), np.int32)
    padded[:n] = windows
    runner = Runner(model, params, slots=batch_size, max_len=seq_len, kv_cache=kv_cache)
    total = 0.0
    for start in tqdm(range(0, n, batch_size), desc="perplexity", unit="batch",
                      disable=not progress):  # fmt: skip
        nll = runner.window_nll(padded[start : start + batch_size])
        total += float(np.asarray(nll, np.float64)[: n - start].sum())
    mean = total / (n * (seq_len - 1))
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=n * (seq_len - 1),
                            windows=n, seq_len=seq_len, bos_token_id=bos_token_id)  # fmt: skip
