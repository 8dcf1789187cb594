"""Incremental detokenization: a stream's new text at constant work per token.

Decoding the whole generated sequence again at every token costs O(n) per token, O(n²) per
request. `IncrementalText` decodes only a short window instead: the tokens since the last
emitted text plus a few before them, as context for decoders whose output depends on the
previous token (a SentencePiece word boundary, a byte-level character split across tokens).
The new text is the window's decoding past the decoding of its context part; it is held back
while it ends in U+FFFD (a UTF-8 character still incomplete), and emitted once complete.

This is the scheme of vLLM's ``detokenize_incrementally``. The text it builds equals
``tokenizer.decode(ids)`` wherever decoding is a concatenation of per-token pieces that
depends on at most the previous few tokens, as for byte-level BPE and SentencePiece
decoders (tested against both, multi-byte characters included). One exception: a
byte-fallback decoder (SentencePiece's ``<0xNN>`` tokens) replaces a run of byte tokens that
is not valid UTF-8 as a whole, and a run longer than the window can come out with other
replacement characters than a whole decode gives.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["IncrementalText"]

#: Tokens before the pending ones that a window decodes as context.
CONTEXT = 4


class IncrementalText:
    """The text of a growing token sequence.

    Args:
      tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
      skip_special_tokens: passed to ``decode``.

    >>> class Chars:
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> t = IncrementalText(Chars())
    >>> [t.push(i) for i in (104, 105)], t.text
    (['h', 'i'], 'hi')
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # the window's context starts here
        self._read = 0  # tokens up to here are in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token: int) -> str:
        """Appends ``token``; returns the text that became complete (possibly empty)."""
        self.ids.append(int(token))
        return self._advance(final=False)

    def extend(self, tokens: Iterable[int]) -> str:
        """`push` for several tokens; returns their complete text."""
        return "".join(self.push(t) for t in tokens)

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes as U+FFFD), for the end
        of a stream."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        window = self.ids[self._prefix:]
        known = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(window)
        if len(full) <= len(known) or (full.endswith("\ufffd") and not final):
            return ""
        if not full.startswith(known):  # a decoder that rewrote the context: resync
            new = self._decode(self.ids)[len(self.text):]
        else:
            new = full[len(known):]
        self._read = len(self.ids)
        self._prefix = max(self._read - CONTEXT, 0)
        self.text += new
        return new
