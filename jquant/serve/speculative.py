"""Speculative decoding by n-gram prompt lookup: drafts from the sequence itself, checked by
the target model in one step.

Terminology. A **draft** is a token guessed for a position before the model computes it:
here the ``k`` tokens that followed the most recent earlier occurrence of the sequence's last
``n`` tokens (its prompt and what it has generated), ``n`` from `Ngram.max_n` down to
`Ngram.min_n` (vLLM's ``ngram`` method, "prompt lookup decoding"). A **verify** step
(`jquant.serve.runner.Runner.verify`) runs the last accepted token and the drafts at their
positions in one forward and samples after every column, each column from the distribution
the target would sample from had the drafts before it been accepted. Draft ``j`` is
**accepted** while every draft before it was and the token sampled after column ``j - 1``
equals it; the step yields the accepted drafts and then the token sampled after the last of
them (`accepted`), so between 1 and ``k + 1`` tokens per step.

Why the output is plain sampling's. Column ``j`` draws ``x ~ p`` with the key plain decoding
would use for that position (`jquant.models.sampling`: ``fold_in(key(seed), counter)``),
``p`` after temperature, top-k, top-p and penalties. Accepting the draft ``d`` iff ``x == d``
accepts it with probability ``p(d)``, and on a rejection yields ``x``, distributed as ``p``
with ``d`` removed and renormalized: the standard speculative-sampling rule for a draft that
puts all its mass on ``d`` (``min(1, p(d) / q(d))`` with ``q = δ_d``, residual
``max(0, p - q)``). So the output is distributed as without speculation, and with the same
seed it is the same tokens (greedy: the argmax), up to the float rounding of a wider step.

>>> propose([5, 6, 7, 8, 5, 6], k=3, min_n=1, max_n=3)
[7, 8, 5]
>>> accepted([7, 8, 5], [7, 8, 9, 4])
2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["Ngram", "accepted", "propose"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ngram:
    """N-gram prompt lookup (vLLM's ``prompt_lookup_min`` / ``prompt_lookup_max``)."""

    num_tokens: int  # drafts proposed per step at most (k)
    min_n: int = 2  # shortest suffix looked up; a shorter match proposes nothing
    max_n: int = 4  # longest suffix looked up (tried first)

    def __post_init__(self):
        if self.num_tokens < 1:
            raise ValueError(f"Ngram: num_tokens={self.num_tokens} must be >= 1")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"Ngram: min_n={self.min_n} and max_n={self.max_n} must satisfy "
                             "1 <= min_n <= max_n")  # fmt: skip


def propose(tokens: Sequence[int] | np.ndarray, *, k: int, min_n: int, max_n: int) -> list[int]:
    """Drafts for the token after ``tokens``: for the longest ``n`` in ``max_n .. min_n``
    whose last ``n`` tokens occur earlier in ``tokens`` (overlapping the suffix allowed), the
    at most ``k`` tokens that followed the latest such occurrence; ``[]`` when none occurs or
    ``k <= 0``."""
    s = np.asarray(tokens)
    length = len(s)
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length - 1 - n: every n-gram before the suffix itself.
        hits = np.flatnonzero((sliding_window_view(s[:-1], n) == s[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return s[start : start + k].tolist()
    return []


def accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """How many of ``drafts`` the target accepted, given ``sampled[j]``, the token it sampled
    after column ``j`` of the verify step (the last accepted token, then the drafts): the
    length of the longest run of ``drafts`` from the start equal to ``sampled``. The step
    yields ``sampled[: accepted + 1]``."""
    m = 0
    while m < len(drafts) and int(sampled[m]) == int(drafts[m]):
        m += 1
    return m
