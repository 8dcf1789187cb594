"""GGUF tokenizers: the `tokenizers.Tokenizer` a GGUF file's `tokenizer.*` metadata describes.

A GGUF file has no `tokenizer.json`: it stores the vocabulary, merges and special ids as
metadata. `tokenizer_from_gguf_fields` rebuilds from them the same `tokenizers.Tokenizer` that
transformers' GGUF converter builds (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`),
which transformers 5 can only reach through torch: byte-level BPE (``"gpt2"``) and
SentencePiece (``"llama"``), with llama.cpp's defaults where the file is silent
(`_gguf_add_bos`). `jquant.io.tokenizer` re-exports it beside the `Tokenizer` it returns;
`jquant.io._gguf_tokenizer_export` writes a `Tokenizer` back as such metadata.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

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

