"""GGUF tokenizers: the `tokenizers.Tokenizer` a GGUF file's `tokenizer.*` metadata describes.

A GGUF file has no `tokenizer.json`: it stores the vocabulary, merges and special ids as
metadata. `tokenizer_from_gguf_fields` rebuilds from them the same `tokenizers.Tokenizer` that
transformers' GGUF converter builds (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`),
which transformers 5 can only reach through torch: byte-level BPE (``"gpt2"``) and
SentencePiece (``"llama"``), with llama.cpp's defaults where the file is silent
(`_gguf_add_bos`). `jquant.io.tokenizer` re-exports it beside the `Tokenizer` it returns.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any, NamedTuple

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer

# llama.cpp token types (gguf.TokenType).
_NORMAL = 1
_UNKNOWN = 2
_CONTROL = 3
_USER_DEFINED = 4
_BYTE = 6


# SentencePiece's visible space: "a b" is spelled "▁a▁b" in its vocabulary.
_SPM_SPACE = "\u2581"


# Split regexes transformers applies per `tokenizer.ggml.pre`; any other value (e.g. SmolLM2's
# "smollm") keeps GPT-2's built-in byte-level regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


# Pre-tokenizers whose words found whole in the vocabulary skip the merges (llama.cpp's
# `ignore_merges`, Llama 3's tokenizer.json `"ignore_merges": true`): "▁Việt" is one token
# even where no merge path builds it.
_IGNORE_MERGES_PRE = frozenset(("llama3", "llama-v3", "llama-bpe", "falcon3"))


# Byte-level BPE pre-tokenizers for which llama.cpp adds BOS when a GGUF file does not say
# (src/llama-vocab.cpp: the LLAMA3 group, tekken, chameleon).
_GGUF_BOS_PRE = frozenset(
    ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
     "jina-v5-nano", "tekken", "chameleon")
)  # fmt: skip


def _gguf_add_bos(fields: dict[str, Any]) -> bool:
    """``tokenizer.ggml.add_bos_token``, or llama.cpp's default when the file omits it: True
    for SentencePiece (``"llama"``) and WordPiece (``"bert"``) vocabularies and for the BPE
    pre-tokenizers of `_GGUF_BOS_PRE` (Llama 3's), False for other ``"gpt2"`` ones."""
    value = fields.get("tokenizer.ggml.add_bos_token")
    if value is not None:
        return bool(value)
    kind = fields.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return fields.get("tokenizer.ggml.pre") in _GGUF_BOS_PRE
    return kind in ("llama", "bert")


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, codes)))


def tokenizer_from_gguf_fields(fields: dict[str, Any], source: str = "<gguf>") -> Tokenizer:
    """Build the tokenizer a GGUF file describes from its `tokenizer.*` metadata.

    Args:
      fields: GGUF metadata as plain Python values (`"tokenizer.ggml.tokens"` -> list of str, ...).
      source: the file, named in errors.

    Returns:
      A `Tokenizer`. Byte-level BPE (`"gpt2"`) encodes exactly as transformers' GGUF loader
      does; SentencePiece (`"llama"`: Llama 2, Mistral, Gemma 1-3) as the original SentencePiece
      model does (see `_sentencepiece_tokenizer`).

    Raises:
      ValueError: the file has no tokenizer, or one of another kind (`"t5"`, `"bert"`, ...).
    """
    from jquant.io.tokenizer import Tokenizer  # which imports this module

    kind = fields.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece_tokenizer(fields)
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r} is not supported; jquant builds 'gpt2' "
            "(byte-level BPE) and 'llama' (SentencePiece) tokenizers from GGUF metadata. Load "
            "the HF directory of this model."
        )
    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or ())
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab = {
        tok if set(tok) <= spelled else "".join(alphabet[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=fields.get("tokenizer.ggml.pre") in _IGNORE_MERGES_PRE,
        )
    )
    split = _PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    # Control tokens (<|im_start|>, ...) must match whole, never be cut by BPE. One spelled
    # outside the byte alphabet is a llama.cpp mislabel, skipped as transformers does.
    specials = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= spelled]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
        add_bos_token=_gguf_add_bos(fields),
    )


def _sentencepiece_tokenizer(fields: dict[str, Any]) -> Tokenizer:
    """The SentencePiece BPE tokenizer of a `tokenizer.ggml.model == "llama"` file.

    llama.cpp's converter writes the pieces of `tokenizer.model` as they are (`tokens`, `scores`,
    `token_type`) and, for Gemma, its added tokens: user-defined ones with `▁` turned back into
    spaces. Encoding follows SentencePiece: spaces become `▁`, a `▁` is prepended when
    `tokenizer.ggml.add_space_prefix` (default true; Gemma's is false), adjacent symbols merge
    into the piece of highest score first (`_spm_merges`), and a character outside the vocabulary
    becomes its UTF-8 bytes (`<0x0A>`, ...) or, with no byte pieces, the unknown token.

    Control (`<start_of_turn>`, `<bos>`), unknown and user-defined tokens written in the text are
    matched whole, as llama.cpp does (SentencePiece itself matches only user-defined ones); the
    text between two of them is encoded on its own, with the prefix space added again when the
    file asks for one, as llama.cpp does and Llama 2's reference code (one encode per segment)
    did. `add_bos_token` (default true, llama.cpp's default) and `add_eos_token` (default false)
    are applied by `encode(add_special_tokens=True)`. Decoding fuses byte pieces back into text,
    turns `▁` into spaces and drops the one prefix space.
    """
    from jquant.io.tokenizer import Tokenizer  # which imports this module

    tokens = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    scores = list(fields.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if "tokenizer.ggml.merges" in fields:
        merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    else:
        merges = _spm_merges(tokens, scores, types)
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((i for i, ty in enumerate(types) if ty == _UNKNOWN), None)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None if unk is None else tokens[unk],
            fuse_unk=True,
            byte_fallback=_BYTE in types,
        )
    )
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    to_space = normalizers.Replace(" ", _SPM_SPACE)
    if add_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), to_space])
    else:
        backend.normalizer = to_space
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    add_bos = _gguf_add_bos(fields) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [tokens[bos]] if add_bos else []
        last = [tokens[eos]] if add_eos else []
        single = [*first, "$A", *last]
        backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single),
            pair=" ".join([*single, *first, "$B:1", *last]),
            special_tokens=sorted({(tokens[i], i) for i in (bos, eos) if i is not None}),
        )
    specials = [t for t, ty in zip(tokens, types) if ty in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # SentencePiece matches user-defined pieces in the normalized text, so Gemma's "   " (stored
    # with spaces) also matches "▁ ▁". With a prefix space that would need "▁" before the piece
    # too: there they are matched in the raw text, as llama.cpp does.
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    backend.add_tokens([AddedToken(t, normalized=not add_prefix, special=False) for t in user])
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        chat_template=fields.get("tokenizer.chat_template"),
        add_bos_token=add_bos,
    )


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece's BPE encoding from its scored vocabulary.

    SentencePiece repeatedly merges the adjacent pair whose concatenation is the piece of highest
    score. Every split of a normal piece into two normal pieces is a merge, ranked by that score
    (ties by id, then by split point). Only normal pieces are merged into: control, byte and
    unused pieces never come out of a merge, and user-defined ones are matched whole before.
    """
    normal = {t for t, ty in zip(tokens, types) if ty == _NORMAL}
    ranked = []
    seen = set()
    for i, (tok, ty) in enumerate(zip(tokens, types)):
        if ty != _NORMAL or len(tok) < 2 or tok in seen:
            continue
        seen.add(tok)
        for k in range(1, len(tok)):
            if tok[:k] in normal and tok[k:] in normal:
                ranked.append((-scores[i], i, k))
    ranked.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]


# ---- writing: a tokenizer as GGUF metadata --------------------------------------------

_UNUSED = 5
# llama.cpp's `tokenizer.ggml.pre` for the byte-level pre-tokenizers jquant builds and reads
# (see `_PRE_TOKENIZER_SPLITS`): the split regex (None: GPT-2's built-in one) -> name.
_PRE_NAMES = {None: "gpt-2", _LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class GGUFTokenizer(NamedTuple):
    """The ``tokenizer.*`` metadata of a byte-level BPE tokenizer, as llama.cpp reads it."""

    pre: str  # tokenizer.ggml.pre
    tokens: list[str]  # byte-level spelled, one per id; [PAD{i}] fills up to the model's vocab
    token_types: list[int]  # 1 normal, 3 control, 4 user-defined, 5 unused (padding)
    merges: list[str]  # "a b", in priority order
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool
    chat_template: str | None

    def write(self, w) -> None:
        """Add these fields to a `gguf.GGUFWriter`."""
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        w.add_token_merges(self.merges)
        for value, add in ((self.bos, w.add_bos_token_id), (self.eos, w.add_eos_token_id),
                           (self.pad, w.add_pad_token_id)):  # fmt: skip
            if value is not None:
                add(value)
        w.add_add_bos_token(self.add_bos)
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


def gguf_tokenizer_fields(tokenizer: Tokenizer, vocab_size: int) -> GGUFTokenizer:
    """The GGUF metadata of a byte-level BPE `Tokenizer` for a model of ``vocab_size``
    embedding rows: what `tokenizer_from_gguf_fields` reads back into the same encoder, and
    llama.cpp tokenizes with (a pre-tokenizer of `_PRE_NAMES`, or SmolLM's digit split).

    Raises:
      ValueError: a tokenizer of another kind (SentencePiece's, WordPiece, ...), a
        pre-tokenizer llama.cpp has no name for, or more tokens than ``vocab_size``.
    """
    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec["model"], _pre_name(spec.get("pre_tokenizer"))
    decoder = (spec.get("decoder") or {}).get("type")
    if model["type"] != "BPE" or decoder != "ByteLevel":
        raise ValueError(f"tokenizer: a {model['type']} model with a {decoder} decoder; GGUF "
                         "export writes byte-level BPE tokenizers only (pass tokenizer=None "
                         "to write the weights alone)")  # fmt: skip
    if pre is None:
        raise ValueError(f"tokenizer: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} has "
                         "no llama.cpp name (byte-level GPT-2, Llama 3 and Qwen2 splits, "
                         "SmolLM's digits)")  # fmt: skip
    n = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"tokenizer: {n} tokens, more than the model's {vocab_size} "
                         "embedding rows")  # fmt: skip
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
    return GGUFTokenizer(pre=pre, tokens=tokens, token_types=types, merges=merges,
                         bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                         pad=tokenizer.pad_token_id, add_bos=tokenizer.add_bos_token,
                         chat_template=tokenizer.chat_template)  # fmt: skip
