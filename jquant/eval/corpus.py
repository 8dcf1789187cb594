"""Named text corpora for calibration and evaluation.

Every named corpus ships with the Python standard library, so it is available offline,
everywhere, byte for byte the same for a given Python version (jquant's numbers come from
Python 3.11.7; another version gives other text and other numbers).

The first text is Python's own documentation (`pydoc_data.topics`)::

    text = "\\n\\n".join(topics[k] for k in sorted(topics))

`pydoc-calib` is its first half by characters (calibration, training); `pydoc-eval` the
second half (perplexity). The halves do not overlap, though the documentation repeats itself
(some grammar rules and examples of one half recur in the other).

`python-code` is a second evaluation text of another kind: source code, not prose. It is
the source files of the standard-library modules in `PYTHON_CODE_MODULES`, in that
(sorted) order, joined by blank lines (read as Python reads them, newlines as ``\\n``,
without importing the modules).

`python-mix`, the default calibration text (`jquant.calib.data.DEFAULT_CORPUS`), mixes
prose (`pydoc-calib`, docstrings, notes, e-mail), code and data from the standard library's
files, and holds nothing of `pydoc-eval` or `python-code` (`jquant.eval._mix`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

#: Names `load_corpus` accepts besides a path to a text file.
CORPORA = ("python-mix", "pydoc-calib", "pydoc-eval", "python-code")

#: The modules of `python-code`, sorted: pure Python, in the standard library of every
#: supported Python (none is deprecated for removal), none patched by Linux distributions,
#: and of many kinds (parsing, numbers, data structures, text, scheduling).
PYTHON_CODE_MODULES = (
    "base64", "bisect", "colorsys", "copy", "fnmatch", "fractions", "graphlib", "heapq",
    "netrc", "numbers", "queue", "reprlib", "sched", "shlex", "string", "textwrap",
)  # fmt: skip


@functools.cache
def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    # get_source decodes as Python does (coding cookie, universal newlines): a CRLF checkout
    # reads the same as an LF one.
    source = spec.loader.get_source(name) if spec is not None and spec.loader else None
    if source is None:
        raise ValueError(
            f"corpus 'python-code' needs the source of the standard-library module {name!r}, "
            "and this Python ships it without source (bytecode only); use a full install"
        )
    return source


@functools.cache
def _python_code_text() -> str:
    return "\n\n".join(_module_source(m) for m in PYTHON_CODE_MODULES)


def load_corpus(name: str | os.PathLike) -> str:
    """The text of a named corpus, or of a UTF-8 text file.

    Args:
      name: one of `CORPORA` (``"python-mix"``, ``"pydoc-calib"``, ``"pydoc-eval"``,
        ``"python-code"``; see the module docstring), or a path to a text file.

    Raises:
      ValueError: neither a known name nor an existing file; or a file of the standard
        library that the corpus needs is missing.

    >>> "def " in load_corpus("python-code")
    True
    """
    if name in ("pydoc-calib", "pydoc-eval"):
        text = _pydoc_text()
        half = len(text) // 2
        return text[:half] if name == "pydoc-calib" else text[half:]
    if name == "python-code":
        return _python_code_text()
    if name == "python-mix":
        from jquant.eval._mix import mix_text

        return mix_text()
    path = Path(name).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(
        f"unknown corpus {os.fspath(name)!r}: not one of {', '.join(CORPORA)} "
        "and not an existing text file"
    )
