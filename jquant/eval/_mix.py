"""`python-mix`: the default calibration text, a mix of prose, code and data.

Built only from files of the Python installation's standard library
(``sysconfig.get_paths()["stdlib"]``, site-packages never), read without importing anything,
the same byte for byte for a given Python version (jquant's numbers come from Python 3.11.7).
It holds nothing of the evaluation texts: neither `pydoc-eval` (the second half of the
topics) nor the modules of `python-code` (`PYTHON_CODE_MODULES`, their docstrings included),
nor any `SPAN` characters in a row of either.

Parts and their shares of the characters (`PARTS`):

* prose, 58%: `pydoc-calib` (16%); the module, class and function docstrings of the
  top-level standard-library modules (23%, read with `ast`; not those of `python-code`, of
  the code part or of pydoc); IDLE's notes (``idlelib/*.txt``), its help page without the
  HTML tags, the license and ``email/architecture.rst`` (14%); the e-mail messages of
  ``test/test_email/data`` (5%);
* code, 30%: the source of `MIX_CODE_MODULES` (parsing, networking, data formats, text,
  numbers, dates);
* data, 12%: multilingual text (``test/cjkencodings/*-utf8.txt``), XML, TOML with its JSON,
  decimal and math test cases, INI files, ``mime.types``, the exception hierarchy.

Each part is its documents (files, modules) cut into pieces of about `PIECE` characters at
line breaks, taken one piece of each document in turn; the parts are then interleaved piece
by piece, always continuing the part furthest behind its share, so that every stretch of the
text (every calibration window cut from it) holds the parts in about their shares. Pieces
are joined by blank lines; the text is about `TOTAL` characters (94,000 SmolLM2 tokens:
128 disjoint windows of 512 and some to spare).

The evaluation texts share some lines with the standard library (`pydoc-calib` repeats
grammar rules and examples that `pydoc-eval` has too; code shares idioms), so every line
that overlaps a `SPAN`-character substring of `pydoc-eval` or `python-code` is left out.
"""

from __future__ import annotations

import ast
import bisect
import functools
import html.parser
import itertools
import sysconfig
import tokenize
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from jquant.eval.corpus import PYTHON_CODE_MODULES, _pydoc_text

#: Characters of the mix (the parts' pieces stop at their share of it).
TOTAL = 300_000
#: Characters of a piece: parts change at least this often.
PIECE = 2_500
#: No substring this long of an evaluation text is in the mix.
SPAN = 64

#: The modules of the mix's code part, sorted: pure Python, none in `PYTHON_CODE_MODULES`.
MIX_CODE_MODULES = (
    "argparse", "calendar", "configparser", "csv", "dataclasses", "datetime", "difflib",
    "email.feedparser", "ftplib", "gettext", "html.parser", "http.cookies", "imaplib",
    "ipaddress", "json.decoder", "json.encoder", "optparse", "pprint", "smtplib",
    "statistics", "tokenize", "urllib.parse", "uuid", "wave",
)  # fmt: skip

_NOTES = (
    "LICENSE.txt", "email/architecture.rst", "idlelib/CREDITS.txt", "idlelib/HISTORY.txt",
    "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/README.txt", "idlelib/TODO.txt",
    "idlelib/extend.txt", "idlelib/help.html",
)  # fmt: skip
_DATA = (
    "test/cjkencodings/*-utf8.txt", "test/xmltestdata/*.xml", "test/xmltestdata/c14n-20/*.xml",
    "test/test_tomllib/data/valid/**/*.toml", "test/test_tomllib/data/valid/**/*.json",
    "test/decimaltestdata/*.decTest", "test/math_testcases.txt", "test/cmath_testcases.txt",
    "test/configdata/cfgparser.*", "test/mime.types", "test/exception_hierarchy.txt",
)  # fmt: skip


class Part(NamedTuple):
    name: str
    kind: str  # "prose", "code" or "data"
    share: float  # of the mix's characters
    documents: Callable[[Path], list[str]]  # the stdlib directory -> its texts, in order


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, pattern: str) -> list[Path]:
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if not found:
        raise ValueError(
            f"corpus 'python-mix' needs {root / pattern} from Python's standard library, and "
            "this Python has none (installed without its tests?); use a full install"
        )
    return found


def _read(path: Path) -> str:
    # Universal newlines: a CRLF checkout reads the same as an LF one.
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _source(root: Path, module: str) -> str:
    (path,) = _files(root, module.replace(".", "/") + ".py")
    with tokenize.open(path) as f:  # the coding cookie, as Python reads it
        return f.read()


class _HTMLText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _html_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = (line.strip() for line in "".join(parser.parts).splitlines())
    return "\n".join(k for k, _ in itertools.groupby(lines))  # runs of blank lines -> one


def _docstrings(source: str) -> str:
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(n) for n in ast.walk(ast.parse(source)) if isinstance(n, nodes))
    return "\n\n".join(dict.fromkeys(d for d in docs if d))  # each once, in order


def _pydoc_calib(root: Path) -> list[str]:
    text = _pydoc_text()
    return [text[: len(text) // 2]]


def _module_docstrings(root: Path) -> list[str]:
    excluded = {m.split(".")[0] for m in PYTHON_CODE_MODULES + MIX_CODE_MODULES}
    excluded |= {"pydoc", "this", "antigravity"}  # pydoc's topics; ROT13; a joke
    paths = [p for p in _files(root, "*.py") if p.stem not in excluded]
    docs = []
    for path in paths:
        with tokenize.open(path) as f:
            docs.append(_docstrings(f.read()))
    return [d for d in docs if d]


def _notes(root: Path) -> list[str]:
    texts = [_read(_files(root, name)[0]) for name in _NOTES]
    return [_html_text(t) if n.endswith(".html") else t for n, t in zip(_NOTES, texts)]


def _email(root: Path) -> list[str]:
    return [_read(p) for p in _files(root, "test/test_email/data/msg_*.txt")]


def _code(root: Path) -> list[str]:
    return [_source(root, m) for m in MIX_CODE_MODULES]


def _data(root: Path) -> list[str]:
    return [_read(p) for pattern in _DATA for p in _files(root, pattern)]


PARTS = (
    Part("pydoc-calib", "prose", 0.16, _pydoc_calib),
    Part("docstrings", "prose", 0.23, _module_docstrings),
    Part("notes", "prose", 0.14, _notes),
    Part("email", "prose", 0.05, _email),
    Part("code", "code", 0.30, _code),
    Part("data", "data", 0.12, _data),
)


def _pieces(text: str) -> list[str]:
    """``text`` cut at line breaks into pieces of about `PIECE` characters (a longer line
    is cut inside), preferring a blank line once a piece holds half of that."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        while len(line) > PIECE:
            pieces.append(line[:PIECE])
            line = line[PIECE:]
        if current and (size + len(line) > PIECE or (size >= PIECE // 2 and not line.strip())):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p.strip("\n") for p in pieces if p.strip()]


def _part_pieces(documents: list[str], budget: int, scrub: Callable[[str], str]) -> list[str]:
    """One piece of each document in turn, scrubbed, until ``budget`` characters."""
    rounds = itertools.zip_longest(*(_pieces(d) for d in documents))
    out, size = [], 0
    for piece in itertools.chain.from_iterable(rounds):
        if size >= budget:
            break
        piece = scrub(piece).strip("\n") if piece is not None else ""
        if piece.strip():
            out.append(piece)
            size += len(piece)
    return out


def _eval_windows() -> tuple[set[int], tuple[str, ...]]:
    """The hashes of every `SPAN`-character substring of the evaluation texts, and the texts."""
    from jquant.eval.corpus import load_corpus

    texts = tuple(load_corpus(name) for name in ("pydoc-eval", "python-code"))
    return {hash(t[i : i + SPAN]) for t in texts for i in range(len(t) - SPAN + 1)}, texts


def _scrub(piece: str, hashes: set[int], texts: tuple[str, ...]) -> str:
    """``piece`` without the lines that share a `SPAN`-character substring with ``texts``."""
    while True:
        lines = piece.split("\n")
        starts = list(itertools.accumulate((len(line) + 1 for line in lines), initial=0))
        hit = [
            i for i in range(len(piece) - SPAN + 1)
            if hash(window := piece[i : i + SPAN]) in hashes and any(window in t for t in texts)
        ]  # fmt: skip
        if not hit:
            return piece
        dropped = set()
        for i in hit:  # the lines under piece[i : i + SPAN]
            first = bisect.bisect_right(starts, i) - 1
            last = bisect.bisect_right(starts, i + SPAN - 1) - 1
            dropped.update(range(first, last + 1))
        piece = "\n".join(line for k, line in enumerate(lines) if k not in dropped)


def mix_parts(root: Path | None = None) -> list[tuple[str, str]]:
    """``(part name, piece)`` in the order of the mix (see the module docstring).

    Args:
      root: the standard library's directory (default: this Python's).

    Raises:
      ValueError: a file the mix needs is not in the standard library at ``root``.
    """
    return _mix_parts(_stdlib() if root is None else root, *_eval_windows())


def _mix_parts(root: Path, hashes: set[int], texts: tuple[str, ...]) -> list[tuple[str, str]]:
    scrub = functools.partial(_scrub, hashes=hashes, texts=texts)
    queues = [_part_pieces(p.documents(root), int(p.share * TOTAL), scrub) for p in PARTS]
    taken = [0] * len(PARTS)  # characters of each part so far
    index = [0] * len(PARTS)
    out = []
    while True:
        left = [i for i, q in enumerate(queues) if index[i] < len(q)]
        if not left:
            return out
        i = min(left, key=lambda i: (taken[i] / PARTS[i].share, i))
        piece = queues[i][index[i]]
        out.append((PARTS[i].name, piece))
        taken[i] += len(piece)
        index[i] += 1


@functools.cache
def mix_text() -> str:
    """The `python-mix` corpus."""
    hashes, texts = _eval_windows()
    text = "\n\n".join(piece for _, piece in _mix_parts(_stdlib(), hashes, texts))
    return _scrub(text, hashes, texts)  # across the joins too
