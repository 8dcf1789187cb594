"""Text generation: one jitted prefill, then a decode loop that stays on the device.

Both run the core forward (`jquant.models.core`, layers under one scan where their trees
match) over a dense `KVCache`. The decode loop is a `lax.while_loop` inside one compiled
function: no Python dispatch per token, and it exits early once every row has produced a stop
token. Prompts of different lengths are left-padded to one bucketed length (a multiple of
16), so the last column is every row's last prompt token and prompt lengths in the same
bucket share one compilation.

Sampling is `jquant.models.sampling`'s rule; row ``r`` of a batch draws with seed
``seed + r``, so a one-prompt `generate` with seed ``s`` samples what the serving engine
samples for that prompt with seed ``s``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models import core
from jquant.models.cache import init_cache
from jquant.models.llama import graphdef_of
from jquant.models.sampling import Sampler, sample

_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns.

    Attributes:
      tokens: ``(B, max_new_tokens)`` int32 generated ids; after a row's stop token (which
        is included) and after the loop ended early, entries are ``pad_id``.
      lengths: ``(B,)`` generated tokens per row, stop token included.
      prompt_lengths: ``(B,)`` prompt tokens per row (without padding).
      prefill_seconds: prompt processing (and first token), compilation excluded.
      decode_seconds: the decode loop, compilation excluded.
      compile_seconds: time spent compiling (0 when both programs were cached).
      decode_steps: model calls the decode loop made (``max(lengths) - 1``).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    decode_steps: int

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode loop (all rows, after the first) per second."""
        produced = int(np.maximum(self.lengths - 1, 0).sum())
        return produced / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids, up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    def texts(self, tokenizer, *, skip_special_tokens: bool = True) -> list[str]:
        """Each row's generated text."""
        return [tokenizer.decode(s, skip_special_tokens=skip_special_tokens)
                for s in self.sequences()]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("st", "max_len"))
def _prefill(st, w, tokens, mask, sampling, *, max_len):
    cache = init_cache(st.config, tokens.shape[0], max_len, st.dtype)
    x, cache = core.hidden(st, w, tokens, cache, mask=mask)
    return sample(core.logits(st, w, x[:, -1:])[:, -1], sampling), cache


def _is_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> jax.Array:
    hit = jnp.zeros(tokens.shape, jnp.bool_)
    for t in stop_tokens:
        hit = hit | (tokens == t)
    return hit


@functools.partial(jax.jit, static_argnames=("st", "max_new_tokens", "stop_tokens"))
def _decode(st, w, first, cache, sampling, pad_id, *, max_new_tokens, stop_tokens):
    b = first.shape[0]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = _is_stop(first, stop_tokens)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        step, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, out, done, lengths, cache = carry
        prev = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
        x, cache = core.hidden(st, w, prev, cache)
        rows = sampling._replace(counter=jnp.full((b,), step, jnp.int32))
        token = jnp.where(done, pad_id, sample(core.logits(st, w, x)[:, -1], rows))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_stop(token, stop_tokens)
        return step + 1, out, done, lengths, cache

    carry = (jnp.int32(1), out, done, lengths, cache)
    step, out, _, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, step - 1


def _left_pad(prompts: list[list[int]], length: int, pad_id: int):
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        tokens[i, length - len(p) :] = p
        mask[i, length - len(p) :] = True
    return jnp.asarray(tokens), jnp.asarray(mask)


def _as_batch(prompts) -> list[list[int]]:
    prompts = list(prompts)
    if prompts and np.ndim(prompts[0]) == 0:  # a single prompt of ids
        prompts = [prompts]
    batch = [[int(t) for t in p] for p in prompts]
    if not batch or any(len(p) == 0 for p in batch):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    return batch


def _check_context(longest: int, max_new_tokens: int, context: int, max_len: int | None):
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    limits = [(context, "max_position_embeddings")]
    if max_len is not None:
        limits.append((max_len, "the cache length max_len"))
    for limit, what in limits:
        if longest > limit:
            raise ValueError(
                f"the prompt has {longest} tokens, longer than the context: {what} is {limit}"
            )
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"the prompt has {longest} tokens and max_new_tokens={max_new_tokens}: "
                f"{longest + max_new_tokens} > {what} = {limit}; shorten the prompt or ask "
                f"for at most {limit - longest} new tokens"
            )


def _compile(fn, *args, **static):
    """AOT-compiles ``fn`` (cached by JAX across calls) and times it."""
    start = time.perf_counter()
    compiled = fn.lower(*args, **static).compile()
    return compiled, time.perf_counter() - start


def generate(
    model,
    params: nnx.State,
    prompts: Sequence[Sequence[int]] | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
    max_len: int | None = None,
    pad_id: int = 0,
) -> Generation:
    """Generates continuations of a batch of token-id prompts.

    Args:
      model: a `Llama` module or its GraphDef.
      params: its parameter State, float or quantized.
      prompts: a list of prompts (lists of ids; lengths may differ) or one prompt.
      max_new_tokens: most tokens to generate per row (the stop token counts).
      temperature, top_k, top_p: sampling (see the module docstring); temperature 0 = greedy.
      stop_tokens: ids that end a row; default the config's ``eos_token_ids``.
      seed: PRNG seed for sampling (row ``r`` draws with ``seed + r``).
      max_len: KV cache length (slots); default the bucketed prompt length + max_new_tokens.
      pad_id: id written after a row stops (and used as left padding, never attended to).

    Returns:
      A `Generation` with the ids and timings.

    Raises:
      ValueError: a prompt is empty, or prompt + max_new_tokens exceeds the context
        (``max_position_embeddings``) or ``max_len``; the message gives the numbers.

    >>> ids = jquant.io.encode_prompt(tokenizer, "Hi")  # BOS iff add_bos_token  # doctest: +SKIP
    >>> out = generate(model, params, [ids], max_new_tokens=8)  # doctest: +SKIP
    >>> out.texts(tokenizer)  # doctest: +SKIP
    """
    module = model if isinstance(model, nnx.Module) else nnx.merge(graphdef_of(model), params)
    config = module.config
    batch = _as_batch(prompts)
    longest = max(len(p) for p in batch)
    context = config.max_position_embeddings
    _check_context(longest, max_new_tokens, context, max_len)
    room = min(context, max_len or context) - max_new_tokens
    length = max(longest, min(-(-longest // _BUCKET) * _BUCKET, room))
    max_len = max_len or length + max_new_tokens
    tokens, mask = _left_pad(batch, length, pad_id)
    sampling = Sampler(temperature, top_k, top_p).rows(seed + np.arange(len(batch)))
    stops = tuple(config.eos_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))

    st, w = core.Static.of(module), core.weights(params, config.num_layers)
    prefill, compile_s = _compile(_prefill, st, w, tokens, mask, sampling, max_len=max_len)
    start = time.perf_counter()
    first, cache = jax.block_until_ready(prefill(w, tokens, mask, sampling))
    prefill_s = time.perf_counter() - start

    pad = jnp.int32(pad_id)
    decode, seconds = _compile(_decode, st, w, first, cache, sampling, pad,
                               max_new_tokens=max_new_tokens, stop_tokens=stops)  # fmt: skip
    start = time.perf_counter()
    out, lengths, steps = jax.block_until_ready(decode(w, first, cache, sampling, pad))
    decode_s = time.perf_counter() - start
    return Generation(
        tokens=np.asarray(out),
        lengths=np.asarray(lengths),
        prompt_lengths=np.array([len(p) for p in batch]),
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        compile_seconds=compile_s + seconds,
        decode_steps=int(steps),
    )


def chat_prompt(tokenizer, message: str, *, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat (an optional ``system`` message, then the user's
    ``message``), rendered by the tokenizer's own chat template: `jquant.io.tokenizer.chat_prompt`
    (the template writes BOS; nothing is added when encoding).

    Raises:
      ValueError: the tokenizer has no chat template, or the template failed.
    """
    from jquant.io.tokenizer import chat_prompt as render

    system_turn = [{"role": "system", "content": system}] if system else []
    return render(tokenizer, [*system_turn, {"role": "user", "content": message}])


def prompt_ids(tokenizer, prompt: str, *, raw: bool = False) -> list[int]:
    """The ids of ``prompt`` as ``jquant generate`` sends it: the chat template's rendering
    (which writes its own BOS) when the tokenizer has one and ``raw`` is false, else the raw
    text with BOS exactly when the tokenizer's ``add_bos_token`` says."""
    from jquant.io.tokenizer import encode_prompt

    if not raw and getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, prompt)
    return encode_prompt(tokenizer, prompt)
