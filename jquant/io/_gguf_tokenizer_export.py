"""A jquant `Tokenizer` as GGUF ``tokenizer.*`` metadata: what llama.cpp tokenizes with and
`jquant.io._gguf_tokenizer.tokenizer_from_gguf_fields` reads back into the same encoder.

Two kinds are written (`gguf_tokenizer_fields`):

- byte-level BPE (``tokenizer.ggml.model = "gpt2"``: SmolLM2, Llama 3, Qwen2): the byte-level
  spelled vocabulary, its merges and a pre-tokenizer llama.cpp has a name for;
- SentencePiece BPE (``"llama"``: Llama 2, Mistral, Gemma), a `Tokenizer` read from such a
  GGUF or from a ``tokenizer.json`` of that kind: a BPE model with byte fallback (``<0x..>``
  pieces), spaces spelled ``▁`` by the normalizer (``Prepend("▁")`` + ``Replace(" ", "▁")``:
  a prefix space, Llama 2's; ``Replace`` alone or ``Metaspace(prepend_scheme="never")``:
  none, Gemma's). Written as tokens, scores and token types, as llama.cpp's converter writes
  ``tokenizer.model`` (`_set_vocab_sentencepiece`).

SentencePiece scores. A `Tokenizer` holds merges, not SentencePiece's scores, so the scores
are derived from the merges: the piece the merge of rank ``r`` (its first one) builds scores
``−1 − r``, every other piece lower than all of them (``−1 − len(merges)``); control, unknown
and byte pieces 0, user-defined ones −1000, padding −1000 (SentencePiece's and the converter's
values). SentencePiece BPE (and llama.cpp's ``llm_tokenizer_spm``) merges the adjacent pair
whose concatenation is the piece of highest score, so these scores merge in the merges' order;
this is how transformers (``generate_merges``) makes such merges from scores in the first place.
llama.cpp's own converter for a ``tokenizer.json`` without ``tokenizer.model``
(``_set_vocab_llama_hf``, ``gguf.LlamaHfVocab.get_token_score``) writes −1000 for every piece,
a placeholder under which llama.cpp merges leftmost first instead of in the BPE's order; that is
not done here. A tokenizer whose merges are not those a scored vocabulary implies (every split
of a normal piece into two normal pieces, what `_spm_merges` rebuilds from the scores; a
piece's merges are taken at the rank of its first, and merges into or out of added tokens,
which never apply, are left out) is refused, as is anything else either reader would encode
differently (a ``Metaspace`` that adds the prefix space only where the text does not start
with one, special tokens matched after normalization, no byte fallback). The BOS convention
written is the `Tokenizer`'s ``add_bos_token``; an EOS the tokenizer's post-processor appends
is written as ``add_eos_token``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, NamedTuple

from ._gguf_tokenizer import (
    _BYTE,
    _CONTROL,
    _LLAMA3_SPLIT,
    _NORMAL,
    _QWEN2_SPLIT,
    _SPM_SPACE,
    _UNKNOWN,
    _USER_DEFINED,
    _spm_merges,
)

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer

__all__ = ["GGUFTokenizer", "gguf_tokenizer_fields"]

_UNUSED = 5
# llama.cpp's `tokenizer.ggml.pre` for the byte-level pre-tokenizers jquant builds and reads
# (see `_PRE_TOKENIZER_SPLITS`): the split regex (None: GPT-2's built-in one) -> name.
_PRE_NAMES = {None: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# The SentencePiece normalizers (tokenizer.json's) written, with whether they add a prefix ▁.
_TO_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": _SPM_SPACE}
_PREFIX = {"type": "Prepend", "prepend": _SPM_SPACE}


class GGUFTokenizer(NamedTuple):
    """The ``tokenizer.*`` metadata of a tokenizer, as llama.cpp reads it."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]  # one per id; [PAD{i}] fills up to the model's vocab (gpt2: byte-level
    #   spelled; llama: as SentencePiece spells them, user-defined ones with spaces)
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]  # "a b", in priority order (gpt2 only)
    scores: list[float] | None  # llama only: SentencePiece scores (the module docstring)
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None  # llama only
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None  # llama only: a ▁ before the text
    chat_template: str | None

    def write(self, w) -> None:
        """Add these fields to a `gguf.GGUFWriter`."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.token_types)
        if self.model == "gpt2":
            w.add_token_merges(self.merges)
        for value, add in ((self.bos, w.add_bos_token_id), (self.eos, w.add_eos_token_id),
                           (self.unk, w.add_unk_token_id),
                           (self.pad, w.add_pad_token_id)):  # fmt: skip
            if value is not None:
                add(value)
        w.add_add_bos_token(self.add_bos)
        if self.model == "llama":
            w.add_add_eos_token(self.add_eos)
            w.add_add_space_prefix(bool(self.add_space_prefix))
        if self.chat_template is not None:
            w.add_chat_template(self.chat_template)


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name of a byte-level pre-tokenizer (tokenizer.json's ``pre_tokenizer``)."""
    if pre is None:
        return None
    if pre["type"] == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else None
    steps = pre.get("pretokenizers", []) if pre["type"] == "Sequence" else []
    kinds = [s["type"] for s in steps]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        return _PRE_NAMES.get(regex) if regex is not None else None
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):  # fmt: skip
        return "smollm"  # SmolLM's tokenizer.json; llama.cpp splits digits one by one too
    return None


def _is_sentencepiece(spec: dict) -> bool:
    """A BPE whose decoder turns ``▁`` back into spaces (tokenizer.json's SentencePiece kind)."""
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    return spec["model"]["type"] == "BPE" and any(
        s.get("type") == "Replace" and s.get("content") == " "
        and s.get("pattern") == {"String": _SPM_SPACE} for s in steps)  # fmt: skip


def gguf_tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> GGUFTokenizer:
    """The GGUF metadata of a byte-level BPE or SentencePiece BPE `Tokenizer` for a model of
    ``vocab_size`` embedding rows: what `tokenizer_from_gguf_fields` reads back into the same
    encoder, and llama.cpp tokenizes with (see the module docstring).

    Raises:
      ValueError: a tokenizer of another kind (WordPiece, Unigram, ...), one llama.cpp would
        encode differently (the module docstring), or more tokens than ``vocab_size``.
    """
    spec = json.loads(tokenizer.backend.to_str())
    n = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"tokenizer: {n} tokens, more than the model's {vocab_size} "
                         "embedding rows")  # fmt: skip
    if _is_sentencepiece(spec):
        return _sentencepiece_fields(tokenizer, spec, vocab_size)
    model, pre = spec["model"], _pre_name(spec.get("pre_tokenizer"))
    decoder = (spec.get("decoder") or {}).get("type")
    if model["type"] != "BPE" or decoder != "ByteLevel":
        raise ValueError(f"tokenizer: a {model['type']} model with a {decoder} decoder; GGUF "
                         "export writes byte-level BPE and SentencePiece BPE tokenizers only "
                         "(pass tokenizer=None to write the weights alone)")  # fmt: skip
    if pre is None:
        raise ValueError(f"tokenizer: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} has "
                         "no llama.cpp name (byte-level GPT-2, Llama 3 and Qwen2 splits, "
                         "SmolLM's digits)")  # fmt: skip
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = tokenizer.backend.id_to_token(i) if i < n else None
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(tok)
            types.append(_NORMAL if i not in added else
                         _CONTROL if added[i]["special"] else _USER_DEFINED)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFTokenizer(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges,
                         scores=None, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                         pad=tokenizer.pad_token_id, unk=None, add_bos=tokenizer.add_bos_token,
                         add_eos=False, add_space_prefix=None,
                         chat_template=tokenizer.chat_template)  # fmt: skip


def _space_prefix(spec: dict) -> bool:
    """Whether a SentencePiece tokenizer.json adds a prefix ▁ (the forms written), else
    ValueError."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if pre is None and norm == {"type": "Sequence", "normalizers": [_PREFIX, _TO_SPACE]}:
        return True
    if pre is None and norm == _TO_SPACE:
        return False
    if (norm is None and pre is not None and pre.get("type") == "Metaspace"
            and pre.get("replacement") == _SPM_SPACE and not pre.get("split", True)):  # fmt: skip
        if pre.get("prepend_scheme") == "never":
            return False
        raise ValueError(f"tokenizer: Metaspace(prepend_scheme={pre.get('prepend_scheme')!r}) "
                         "adds no ▁ before a text that starts with a space (or after a special "
                         "token), where SentencePiece and llama.cpp add one; GGUF cannot hold "
                         "that difference")  # fmt: skip
    raise ValueError(f"tokenizer: SentencePiece normalizer {json.dumps(norm)} with pre-tokenizer "
                     f"{json.dumps(pre)}; GGUF export writes Prepend('▁') + Replace(' ', '▁'), "
                     "Replace alone or Metaspace(prepend_scheme='never')")  # fmt: skip


def _sentencepiece_fields(tokenizer: Tokenizer, spec: dict, vocab_size: int) -> GGUFTokenizer:
    """`GGUFTokenizer` of a SentencePiece BPE tokenizer (``tokenizer.ggml.model = "llama"``)."""
    model = spec["model"]
    prefix = _space_prefix(spec)
    odd = {k: model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                      "ignore_merges") if model.get(k)}  # fmt: skip
    if odd:
        raise ValueError(f"tokenizer: a SentencePiece BPE with {odd}; SentencePiece has none")
    vocab: dict[str, int] = model["vocab"]
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if not model.get("byte_fallback") or missing:
        raise ValueError("tokenizer: a SentencePiece BPE without byte fallback (or without the "
                         f"byte pieces {missing[:3]}); llama.cpp spells a character outside the "
                         "vocabulary as its <0x..> byte pieces")  # fmt: skip
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    # A merge into or out of an added token never applies: those are matched before the BPE.
    whole = {t["content"] for t in added.values()}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = [m for m in merges if not whole & {m[0], m[1], m[0] + m[1]}]
    first: dict[str, int] = {}  # piece -> rank of the first merge that builds it
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    unk = vocab.get(model.get("unk_token")) if model.get("unk_token") is not None else None
    n = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        tok = tokenizer.backend.id_to_token(i) if i < n else None
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            scores.append(-1000.0)
            continue
        if i in added:
            a = added[i]
            if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
                raise ValueError(f"tokenizer: added token {tok!r} strips spaces or matches whole "
                                 "words; llama.cpp matches the text as it is")  # fmt: skip
            want = False if a["special"] else not prefix
            if bool(a.get("normalized")) != want:
                raise ValueError(f"tokenizer: added token {tok!r} has normalized="
                                 f"{a.get('normalized')}; GGUF's SentencePiece reader matches "
                                 f"{'special' if a['special'] else 'user-defined'} tokens with "
                                 f"normalized={want}")  # fmt: skip
        if i == unk:
            kind, score = _UNKNOWN, 0.0
        elif i in added and added[i]["special"]:
            kind, score = _CONTROL, 0.0
        elif i in added:
            if prefix and _SPM_SPACE in tok:
                raise ValueError(f"tokenizer: user-defined token {tok!r} is spelled with ▁, "
                                 "which llama.cpp would match as written, not as a space")
            kind, score, tok = _USER_DEFINED, -1000.0, tok.replace(_SPM_SPACE, " ")
        elif _BYTE_PIECE.fullmatch(tok):
            kind, score = _BYTE, 0.0
        elif tok in first:
            kind, score = _NORMAL, -1.0 - first[tok]
        else:  # a character, or a piece no merge builds (`_check_merges`: nor do the scores)
            kind, score = _NORMAL, -1.0 - len(merges)
        tokens.append(tok)
        types.append(kind)
        scores.append(score)
    _check_merges(merges, first, tokens, scores, types)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bool(tokenizer.add_bos_token) and bos is not None
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    lead = int(bos is not None and full[:1] == [bos] and plain[:1] != [bos])
    if full[lead:len(full) - add_eos] != plain:
        raise ValueError(f"tokenizer: encode('a') adds special tokens {full} around {plain}; GGUF "
                         "holds a leading BOS and a trailing EOS")  # fmt: skip
    return GGUFTokenizer(model="llama", pre="default", tokens=tokens, token_types=types, merges=[],
                         scores=scores, bos=bos, eos=eos, pad=tokenizer.pad_token_id, unk=unk,
                         add_bos=add_bos, add_eos=add_eos, add_space_prefix=prefix,
                         chat_template=tokenizer.chat_template)  # fmt: skip


def _check_merges(merges, first, tokens, scores, types) -> None:
    """ValueError unless the scores rebuild the merges (`_spm_merges`), each piece's merges
    taken at the rank of its first: the merges of a scored vocabulary. (transformers' own
    ``generate_merges`` interleaves the merges of pieces of equal score, by split length; for
    such pieces SentencePiece has no order, and they are written in that of their first.)"""
    canonical = sorted(merges, key=lambda m: (first[m[0] + m[1]], len(m[0])))
    rebuilt = _spm_merges(tokens, scores, types)
    if rebuilt != canonical:
        pad = [None] * max(len(rebuilt), len(canonical))
        diff = next((a, b) for a, b in zip(rebuilt + pad, canonical + pad) if a != b)
        raise ValueError(f"tokenizer: its merges are not those of a SentencePiece vocabulary: "
                         f"the scores rebuild {diff[0]} where it has {diff[1]} (every split of a "
                         "piece into two normal pieces is a merge); llama.cpp would split "
                         "differently")  # fmt: skip
