"""Calibration text → token windows.

`calibration_tokens` cuts ``samples`` windows of ``seq_len`` tokens from a corpus
(default `python-mix`: prose, code and data from Python's standard library, none of it from
an evaluation text; see `jquant.eval.load_corpus`).
Windows are spread evenly over the text: consecutive and disjoint when the text holds
``samples * seq_len`` tokens, otherwise overlapping. Each window must still bring at
least half a window of tokens no other window has seen (the text must hold
``seq_len + (samples - 1) * seq_len / 2`` tokens); a shorter text is an error rather
than a calibration set of near-copies. When the tokenizer's configuration adds BOS
(``add_bos_token``, as Gemma's does; SmolLM2's does not), every window is BOS followed by
``seq_len - 1`` text tokens (the counts above then apply to ``seq_len - 1``), as in
perplexity and in use.

>>> tok = jquant.models.load("smollm2-135m")[2]  # doctest: +SKIP
>>> calibration_tokens(tok, samples=128, seq_len=512).shape  # doctest: +SKIP
(128, 512)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CORPUS = "python-mix"
DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 512


def windows(ids: Sequence[int], samples: int, seq_len: int, *, source: str = "the text",
            bos_token_id: int | None = None):  # fmt: skip
    """``(samples, seq_len)`` int32 windows spread evenly over ``ids``; with ``bos_token_id``
    each is that BOS and ``seq_len - 1`` ids (spread as windows of ``seq_len - 1``).

    >>> windows(range(8), 2, 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> windows(range(6), 2, 4).tolist()
    [[0, 1, 2, 3], [2, 3, 4, 5]]
    >>> windows(range(6), 2, 4, bos_token_id=99).tolist()
    [[99, 0, 1, 2], [99, 3, 4, 5]]
    """
    if samples < 1 or seq_len < 2:
        raise ValueError(f"need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    ids = np.asarray(ids, np.int32)
    n = len(ids)
    body = seq_len if bos_token_id is None else seq_len - 1  # text tokens per window
    need = body + (samples - 1) * (body // 2)
    if n < need:
        fit = 1 + max(0, (n - body)) // max(1, body // 2) if n >= body else 0
        bos = "" if bos_token_id is None else f" (BOS + {body} of text)"
        raise ValueError(
            f"{source} has {n} tokens: too short for {samples} calibration samples of "
            f"{seq_len} tokens{bos} (windows may overlap by at most half, so it needs {need}); "
            f"use at most {fit} samples, shorter sequences, or a longer text"
        )
    if samples == 1:
        starts = np.zeros(1, np.int64)
    else:
        stride = body if samples * body <= n else (n - body) / (samples - 1)
        starts = np.floor(np.arange(samples) * stride).astype(np.int64)
    out = np.stack([ids[s : s + body] for s in starts])
    if bos_token_id is None:
        return out
    return np.concatenate([np.full((samples, 1), bos_token_id, np.int32), out], axis=1)


def calibration_tokens(
    tokenizer, corpus: str = DEFAULT_CORPUS, *, samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN, text: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Token windows ``(samples, seq_len)`` of a corpus (see the module docstring).

    Args:
      tokenizer: encodes the text (``encode(text, add_special_tokens=False)``) and, as
        perplexity does, starts every window with BOS exactly when its ``add_bos_token``
        says (`jquant.io.leading_bos`), so calibration sees what the model sees in use.
      corpus: a corpus name of `jquant.eval.load_corpus` or a text file path.
      samples: windows to cut.
      seq_len: tokens per window.
      text: the text itself (overrides ``corpus``).
    """
    from jquant.eval import load_corpus
    from jquant.io.tokenizer import leading_bos

    source = "the text" if text is not None else f"corpus {corpus!r}"
    text = load_corpus(corpus) if text is None else text
    ids = tokenizer.encode(text, add_special_tokens=False)
    return windows(ids, samples, seq_len, source=source, bos_token_id=leading_bos(tokenizer))
