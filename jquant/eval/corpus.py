"""Named text corpora for calibration and evaluation.

The default text is Python's own documentation, shipped with the standard library
(`pydoc_data.topics`), so it is available offline, everywhere, byte for byte the same
for a given Python version::

    text = "\\n\\n".join(topics[k] for k in sorted(topics))

`pydoc-calib` is its first half by characters (calibration, training); `pydoc-eval` the
second half (perplexity). Halves never overlap, so calibration never sees evaluation text.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: Names `load_corpus` accepts besides a path to a text file.
CORPORA = ("pydoc-calib", "pydoc-eval")


@functools.cache
def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_corpus(name: str | os.PathLike) -> str:
    """The text of a named corpus, or of a UTF-8 text file.

    Args:
      name: ``"pydoc-calib"``, ``"pydoc-eval"``, or a path to a text file.

    Raises:
      ValueError: neither a known name nor an existing file.

    >>> load_corpus("pydoc-eval")[:0]
    ''
    """
    text = _pydoc_text()
    half = len(text) // 2
    if name == "pydoc-calib":
        return text[:half]
    if name == "pydoc-eval":
        return text[half:]
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"unknown corpus {os.fspath(name)!r}: not one of {', '.join(CORPORA)} "
        "and not an existing text file"
    )
