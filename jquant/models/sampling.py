"""The one sampler: next tokens from logits, each row with its own settings and key.

Rule: ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the
temperature, restricted to the ``top_k`` largest (ties with the k-th kept), then to the
smallest set whose probability reaches ``top_p`` (the most likely token always kept), and
one token is drawn with the key ``fold_in(key(seed), counter)``, where ``counter`` is how
many tokens that sequence has sampled before. `jquant.models.generate` and the serving
engine both sample through `sample`, so one seed gives one sequence in either.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Sampling(NamedTuple):
    """Per-row sampling parameters (arrays of shape ``(rows,)``)."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    seed: jax.Array  # uint32
    counter: jax.Array  # int32: how many tokens this row's sequence has sampled so far

    @staticmethod
    def greedy(rows: int) -> Sampling:
        return Sampling(np.zeros(rows, np.float32), np.zeros(rows, np.int32),
                        np.ones(rows, np.float32), np.zeros(rows, np.uint32),
                        np.zeros(rows, np.int32))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One setting for every row of a batch (`jquant.models.generate`'s arguments)."""

    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens; None = all
    top_p: float | None = None  # keep the smallest set with this much probability; None = all

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")

    def rows(self, seeds) -> Sampling:
        """`Sampling` for ``len(seeds)`` rows, row ``r`` drawing with ``seeds[r]``."""
        n = len(seeds)
        full = lambda v, dtype: np.full(n, v, dtype)  # noqa: E731
        top_k = min(self.top_k or 0, np.iinfo(np.int32).max)  # past the vocabulary: all
        return Sampling(full(self.temperature, np.float32), full(top_k, np.int32),
                        full(1.0 if self.top_p is None else self.top_p, np.float32),
                        np.asarray(seeds, np.uint32), full(0, np.int32))  # fmt: skip


def sample(logits: jax.Array, s: Sampling) -> jax.Array:
    """Next token ids ``(rows,)`` int32 from float32 ``logits (rows, V)``, by the rule above.

    >>> logits = jnp.log(jnp.array([[0.1, 0.9], [0.8, 0.2]]))
    >>> sample(logits, Sampling.greedy(2)).tolist()
    [1, 0]
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def stochastic():
        vocab = logits.shape[-1]
        t = jnp.where(s.temperature > 0, s.temperature, 1).astype(jnp.float32)
        scaled = logits.astype(jnp.float32) / t[:, None]
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


#: The most alternatives one position's log-probabilities list (OpenAI's limit); the step
#: program always computes this many, so asking for fewer compiles nothing new.
MAX_TOP_LOGPROBS = 20


class Penalties(NamedTuple):
    """Per-row repetition penalties (OpenAI's ``presence_penalty`` and ``frequency_penalty``,
    vLLM's and Hugging Face's ``repetition_penalty``) and what they act on.

    ``counts (rows, V)`` int32 packs, per vocabulary entry, how many times the row's
    *generated* tokens hold it and whether its prompt does: ``2 * generated + in_prompt``.
    One array, rather than a count and a mask, halves what a step carries: 6.4 MB for 32
    rows of a 50k vocabulary. It is built on the host (where the engine records each
    token anyway) and passed in as data, so penalties compile no program of their own.
    """

    presence: jax.Array  # float32 (rows,); 0 = off
    frequency: jax.Array  # float32 (rows,); 0 = off
    repetition: jax.Array  # float32 (rows,); 1 = off
    counts: jax.Array  # int32 (rows, V): 2 * count in the generated tokens + (in the prompt)

    @staticmethod
    def none(rows: int, vocab: int) -> Penalties:
        return Penalties(np.zeros(rows, np.float32), np.zeros(rows, np.float32),
                         np.ones(rows, np.float32), np.zeros((rows, vocab), np.int32))  # fmt: skip


def penalize(logits: jax.Array, p: Penalties) -> jax.Array:
    """``logits (rows, V)`` float32 with each row's penalties applied; rows without any
    (presence 0, frequency 0, repetition 1) are returned unchanged, bit for bit.

    With ``n`` the token's count among the generated tokens and ``seen`` whether the prompt
    or the generated tokens hold it: first repetition (Hugging Face's rule, over prompt and
    generated tokens) ``l / r if l > 0 else l * r`` where ``seen``, then OpenAI's
    ``l - presence * (n > 0) - frequency * n`` (vLLM applies them in this order).

    >>> p = Penalties(np.zeros(1, np.float32), np.ones(1, np.float32),
    ...               np.full(1, 2.0, np.float32), np.array([[3, 1, 0]], np.int32))
    >>> penalize(jnp.array([[4.0, -1.0, 2.0]]), p).tolist()
    [[1.0, -2.0, 2.0]]
    """
    logits = logits.astype(jnp.float32)
    n = (p.counts >> 1).astype(jnp.float32)
    seen = p.counts > 0
    r = p.repetition[:, None]
    out = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    out = out - p.presence[:, None] * (n > 0).astype(jnp.float32) - p.frequency[:, None] * n
    active = (p.presence != 0) | (p.frequency != 0) | (p.repetition != 1)
    return jnp.where(active[:, None], out, logits)


#: Token ids one word of a token bitmask holds (`allow`).
BITMASK_WORD = 32


def bitmask_words(vocab: int) -> int:
    """Words of one row of a token bitmask over ``vocab`` ids: ``ceil(vocab / 32)``."""
    return -(-vocab // BITMASK_WORD)


def allow_all(rows: int, vocab: int) -> np.ndarray:
    """A token bitmask allowing every id of ``vocab`` in each of ``rows`` rows (`allow`)."""
    return np.full((rows, bitmask_words(vocab)), -1, np.int32)


def allow(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """``logits (rows, V)`` with each token its row's ``bitmask`` forbids set to ``-inf``.

    ``bitmask (rows, ceil(V / 32))`` int32 allows token ``t`` when bit ``t % 32`` (least
    significant first) of word ``t // 32`` is 1: llguidance's layout, which
    ``llguidance.numpy.fill_next_token_bitmask`` writes. A row of all ones (every word -1)
    leaves its logits unchanged, bit for bit.

    >>> allow(jnp.zeros((1, 3)), np.array([[0b101]], np.int32)).tolist()
    [[0.0, -inf, 0.0]]
    """
    shifts = jnp.arange(BITMASK_WORD, dtype=jnp.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1
    keep = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]] != 0
    return jnp.where(keep, logits, -jnp.inf)


def top_logprobs(logits: jax.Array, tokens: jax.Array, k: int = MAX_TOP_LOGPROBS):
    """The log-probabilities of ``logits (rows, V)`` (``log_softmax``, float32): the chosen
    ``tokens (rows,)``' ``(rows,)`` and the ``k`` largest, ``(ids (rows, k) int32, logprobs
    (rows, k))``, most likely first (``k`` capped at ``V``)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(logp, min(k, logp.shape[-1]))
    return chosen, ids.astype(jnp.int32), values
