"""Structured output: a request's tokens constrained to a grammar, with llguidance.

Words used here: a *grammar* is llguidance's grammar text, what ``llguidance.LLMatcher``
compiles (`response_format_grammar` makes one from OpenAI's ``response_format``); a
*matcher* follows one request's tokens through its grammar; a *bitmask* says which token ids
each row of a step may sample next, in the layout `jquant.models.sampling.allow` applies
(int32 ``(rows, ceil(V / 32))``, token ``t`` at bit ``t % 32`` of word ``t // 32``).

Each step, the engine fills the bitmask rows of its constrained requests (`Grammars.bitmask`;
the other rows allow everything) and the step program masks the logits before sampling; each
sampled token is then consumed by the request's matcher (`advance`), which ends the request
once its grammar is complete. The bitmask is one more input of every compiled step, rather
than a second set of programs for steps with a constrained row: nothing more compiles (twice
the programs would double start-up), constrained and free requests share steps, and a step
without any passes an all-ones bitmask kept on the device; unpacking it costs about 0.1% of a
SmolLM2 decode step on CPU (docs/serving.md). llguidance is an optional dependency (``pip install
'jquant[structured]'``), imported only when a request asks for a grammar.

JSON is written with one space after ``:`` and ``,`` and no other whitespace (`JSON_FORMAT`,
``json.dumps``' default), so a model cannot spend its tokens on whitespace.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from jquant.models.sampling import allow_all
from jquant.serve.limits import LimitError

__all__ = ["GrammarError", "Grammars", "advance", "response_format_grammar"]

INSTALL = "pip install 'jquant[structured]'"
#: llguidance's JSON options for every schema (a schema's own "x-guidance" cannot change them).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The ``response_format.type`` values accepted.
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_JSON_SCHEMA_KEYS = ("name", "description", "schema", "strict")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class GrammarError(RuntimeError):
    """A request's matcher refused a token or failed (the request ends with this error)."""


def _llg():
    """The ``llguidance`` module; ImportError naming the extra to install if it is missing."""
    try:
        import llguidance as llg
        import llguidance.numpy  # noqa: F401  (the bitmask functions)
    except ImportError as e:
        raise ImportError(f"structured output (response_format) needs llguidance: {INSTALL}"
                          ) from e  # fmt: skip
    return llg


def _bad(param: str, message: str, code: str = "invalid_value") -> LimitError:
    return LimitError(param, message, code=code)


def response_format_grammar(response_format) -> str | None:
    """The grammar of OpenAI's ``response_format``: None for ``{"type": "text"}`` (or None),
    any JSON object for ``{"type": "json_object"}``, the schema's JSON for ``{"type":
    "json_schema", "json_schema": {"name", "schema", "description"?, "strict"?}}`` (the
    schema is enforced whatever ``strict`` says).

    Raises:
      LimitError: (a ValueError) naming the part of ``response_format`` at fault: its shape,
        or a schema llguidance refuses (invalid, or using a keyword it does not implement).
      ImportError: llguidance is not installed.
    """
    if response_format is None:
        return None
    where = "response_format"
    if not isinstance(response_format, dict):
        raise _bad(where, f"Invalid type for '{where}': expected an object.", "invalid_type")
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise _bad(f"{where}.type", f"Invalid value for '{where}.type': expected one of "
                   f"{', '.join(map(repr, RESPONSE_FORMATS))}, got {kind!r}.")  # fmt: skip
    allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    _no_other_keys(response_format, allowed, where)
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile({"type": "object"}, where)
    where = f"{where}.json_schema"
    spec = response_format.get("json_schema")
    if spec is None:
        raise _bad(where, f"Missing required parameter: '{where}'.",
                   "missing_required_parameter")  # fmt: skip
    if not isinstance(spec, dict):
        raise _bad(where, f"Invalid type for '{where}': expected an object.", "invalid_type")
    _no_other_keys(spec, set(_JSON_SCHEMA_KEYS), where)
    name = spec.get("name")
    if not isinstance(name, str):
        raise _bad(f"{where}.name", f"Missing required parameter: '{where}.name' (a string)."
                   if name is None else f"Invalid type for '{where}.name': expected a string.",
                   "missing_required_parameter" if name is None else "invalid_type")  # fmt: skip
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise _bad(f"{where}.name", f"Invalid '{where}.name': expected 1 to 64 characters of "
                   f"a-z, A-Z, 0-9, '_' and '-', got {name!r:.80}.")  # fmt: skip
    for key, types, what in (("description", str, "a string"), ("strict", bool, "a boolean")):
        if spec.get(key) is not None and not isinstance(spec[key], types):
            raise _bad(f"{where}.{key}", f"Invalid type for '{where}.{key}': expected {what}.",
                       "invalid_type")  # fmt: skip
    schema = spec.get("schema")
    if schema is None:
        raise _bad(f"{where}.schema", f"Missing required parameter: '{where}.schema' (the "
                   "JSON schema to follow).", "missing_required_parameter")  # fmt: skip
    if not isinstance(schema, dict):
        raise _bad(f"{where}.schema", f"Invalid type for '{where}.schema': expected a JSON "
                   "schema object.", "invalid_type")  # fmt: skip
    return _compile(schema, f"{where}.schema", name)


def _no_other_keys(value: dict, allowed: set, where: str) -> None:
    for key in value:
        if key not in allowed:
            raise _bad(f"{where}.{key}", f"Unrecognized argument supplied: '{where}.{key}'",
                       "unknown_parameter")  # fmt: skip


def _compile(schema: dict, where: str, name: str | None = None) -> str:
    """The grammar of a JSON schema, checked by llguidance."""
    llg = _llg()
    grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_FORMAT)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        of = f" '{name}'" if name else ""
        raise _bad(where, f"Invalid schema for response_format{of}: {error}")
    return grammar


class Grammars:
    """llguidance over one model's vocabulary: matchers for requests, bitmasks for steps.

    Args:
      tokenizer: a `jquant.io.Tokenizer` (or a transformers fast tokenizer): its
        `tokenizers` JSON is what llguidance reads the bytes of every token from.
      vocab_size: the model's vocabulary (logits per row; ids past the tokenizer's are
        never allowed).
      eos_ids: the model's end-of-sequence ids, allowed where the grammar is complete.

    llguidance's tokenizer is built on first use (about 0.5 s for a 49k vocabulary), once.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        self._source, self.vocab_size = tokenizer, vocab_size
        self.eos_ids = sorted(eos_ids)
        self._lock = threading.Lock()
        self._tokenizer = None
        self._executor = None

    @property
    def tokenizer(self):
        """The ``llguidance.LLTokenizer`` of the model's vocabulary."""
        return self._built()[0]

    def _built(self):
        """``(llguidance.LLTokenizer, llguidance.LLExecutor)``, built on first use."""
        with self._lock:
            if self._tokenizer is None:
                llg = _llg()
                backend = getattr(self._source, "backend", None) or getattr(
                    self._source, "backend_tokenizer", None)  # fmt: skip
                if backend is None or not hasattr(backend, "to_str"):
                    raise ValueError(f"structured output needs a tokenizer backed by "
                                     f"`tokenizers` (a jquant.io.Tokenizer), got "
                                     f"{type(self._source).__name__}")  # fmt: skip
                self._tokenizer = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_ids)  # fmt: skip
                self._executor = llg.LLExecutor()
            return self._tokenizer, self._executor

    def matcher(self, grammar: str):
        """A fresh ``llguidance.LLMatcher`` of ``grammar``; `LimitError` (param ``grammar``)
        if llguidance refuses it."""
        llg = _llg()
        # Errors come back by `get_error`, without llguidance's dump of the parser's state.
        m = llg.LLMatcher(self.tokenizer, grammar, log_level=0,
                          limits=llg.LLParserLimits(verbose_errors=False))  # fmt: skip
        if m.is_error():
            raise LimitError("grammar", f"Invalid 'grammar': {m.get_error()}")
        return m

    def bitmask(self, rows: int, matchers: Sequence[tuple[object, int]]) -> np.ndarray:
        """The bitmask of a step of ``rows`` rows: row ``i`` of each ``(matcher, i)`` the
        tokens its matcher allows next, every other row all of them."""
        out = allow_all(rows, self.vocab_size)
        _llg().numpy.fill_next_token_bitmask_par(self._built()[1], list(matchers), out)
        return out


def advance(matcher, token: int) -> bool:
    """Feeds a sampled ``token`` to a request's ``matcher``; returns whether its grammar is
    complete (nothing but EOS may follow). Raises `GrammarError` if the matcher refuses it
    or has failed."""
    if not matcher.consume_token(int(token)):
        raise GrammarError(f"the grammar refused token {int(token)}: "
                           f"{matcher.get_error() or 'not allowed here'}")  # fmt: skip
    return matcher.is_stopped()
