"""Calibration text → token windows.

`calibration_tokens` cuts ``samples`` windows of ``seq_len`` tokens from a corpus
(default `pydoc-calib`, the half of Python's documentation that evaluation never sees).
Windows are spread evenly over the text: consecutive and disjoint when the text holds
``samples * seq_len`` tokens, otherwise overlapping. Each window must still bring at
least half a window of tokens no other window has seen (the text must hold
``seq_len + (samples - 1) * seq_len / 2`` tokens); a shorter text is an error rather
than a calibration set of near-copies.

>>> tok = jquant.models.load("smollm2-135m")[2]  # doctest: +SKIP
>>> calibration_tokens(tok, samples=128, seq_len=512).shape  # doctest: +SKIP
(128, 512)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CORPUS = "pydoc-calib"
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def windows(ids: Sequence[int], samples: int, seq_len: int, *, source: str = "the text"):
    """``(samples, seq_len)`` int32 windows spread evenly over ``ids``.

    >>> windows(range(8), 2, 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> windows(range(6), 2, 4).tolist()
    [[0, 1, 2, 3], [2, 3, 4, 5]]
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    ids = np.asarray(ids, np.int32)
    n = len(ids)
    need = seq_len + (samples - 1) * (seq_len // 2)
    if n < need:
        fit = 1 + max(0, (n - seq_len)) // max(1, seq_len // 2) if n >= seq_len else 0
        raise ValueError(
            f"{source} has {n} tokens: too short for {samples} calibration samples of "
            f"{seq_len} tokens (windows may overlap by at most half, so it needs {need}); "
            f"use at most {fit} samples, shorter sequences, or a longer text"
        )
    if samples == 1:
        starts = np.zeros(1, np.int64)
    else:
        stride = seq_len if samples * seq_len <= n else (n - seq_len) / (samples - 1)
        starts = np.floor(np.arange(samples) * stride).astype(np.int64)
    return np.stack([ids[s : s + seq_len] for s in starts])


def calibration_tokens(
    tokenizer, corpus: str = DEFAULT_CORPUS, *, samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN, text: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Token windows ``(samples, seq_len)`` of a corpus (see the module docstring).

    Args:
      tokenizer: encodes the text (``encode(text, add_special_tokens=False)``), as
        perplexity does.
      corpus: a corpus name of `jquant.eval.load_corpus` or a text file path.
      samples: windows to cut.
      seq_len: tokens per window.
      text: the text itself (overrides ``corpus``).
    """
    from jquant.eval import load_corpus

    source = "the text" if text is not None else f"corpus {corpus!r}"
    text = load_corpus(corpus) if text is None else text
    ids = tokenizer.encode(text, add_special_tokens=False)
    return windows(ids, samples, seq_len, source=source)
