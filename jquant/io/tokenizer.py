"""Tokenizers for imported checkpoints, built with `tokenizers` alone (no torch).

A GGUF file has no `tokenizer.json`: it stores the vocabulary, merges and special ids as
metadata. `tokenizer_from_gguf_fields` rebuilds from them the same `tokenizers.Tokenizer` that
transformers' GGUF converter builds (`transformers/integrations/gguf/gguf_tokenizer_mapping.py`),
which transformers 5 can only reach through torch. An HF directory's `tokenizer.json` is loaded
as it is.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    Wraps a `tokenizers.Tokenizer` (`.backend`). `encode` applies the source's own convention
    for a leading BOS (SmolLM2's adds none); nothing else is added. `add_bos_token` is that
    convention as the source's configuration states it (GGUF ``tokenizer.ggml.add_bos_token``,
    tokenizer_config.json ``add_bos_token``): what `encode_prompt`, perplexity and calibration
    follow (Gemma's, Llama's and Mistral's say True).

    >>> tok = Tokenizer(backend, bos_token_id=1, eos_token_id=2)  # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"))  # doctest: +SKIP
    'Hello world'
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self.backend = backend
        self.add_bos_token = bool(add_bos_token)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` applies the source's BOS convention."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple or 1-D integer array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        add_generation_prompt: bool = True,
        *,
        tokenize: bool = False,
        **kwargs,
    ) -> str | list[int]:
        """Render `messages` (`[{"role": ..., "content": ...}]`) with the model's template.

        Renders the way transformers' `apply_chat_template` does (sandboxed jinja2,
        `trim_blocks`, `lstrip_blocks`, `raise_exception`, `strftime_now`); extra keyword
        arguments become template variables.

        Args:
          messages: the conversation.
          add_generation_prompt: end with the assistant-turn header the model continues from.
          tokenize: return token ids instead of text, encoded with no special tokens added
            (templates write their own).

        Raises:
          ValueError: the source had no chat template.
        """
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (the source defines none); "
                "format the prompt yourself or load an instruct model."
            )
        text = _compile_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
            f"eos_token_id={self.eos_token_id}, add_bos_token={self.add_bos_token}, "
            f"chat_template={self.chat_template is not None})"
        )


def leading_bos(tokenizer) -> int | None:
    """The BOS id to put before a text, or None: the tokenizer's BOS id exactly when its
    configuration says to add one (``add_bos_token``; SmolLM2's adds none, Gemma's does).

    Takes a `Tokenizer` or any object with ``add_bos_token`` and ``bos_token_id`` (a
    transformers tokenizer); one without ``add_bos_token`` adds none.
    """
    if not getattr(tokenizer, "add_bos_token", False):
        return None
    return getattr(tokenizer, "bos_token_id", None)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of raw text as the model sees it in use: ``text`` encoded with no special
    tokens added, preceded by `leading_bos` (if any) unless it already starts with that BOS
    (a prompt written as ``"<bos>..."``). A chat-template rendering writes its own BOS: encode
    it with ``add_special_tokens=False`` instead.

    >>> encode_prompt(gemma_tokenizer, "Hello")  # doctest: +SKIP
    [2, 9259]
    """
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    bos = leading_bos(tokenizer)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


class NoChatTemplateError(ValueError):
    """The tokenizer has no chat template (its source defines none)."""


def chat_prompt(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (OpenAI-style ``[{"role": ..., "content": ...}]``) rendered
    by the tokenizer's own chat template, ending with the assistant-turn header the model
    continues from.

    Works with a `Tokenizer` or a transformers tokenizer. The template writes its own special
    tokens (BOS too, as ``{{ bos_token }}``, where the model wants one), so none are added when
    encoding. A raw-text prompt: `encode_prompt`, which adds BOS exactly when the tokenizer's
    ``add_bos_token`` says.

    Raises:
      NoChatTemplateError: (a ValueError) the tokenizer has no chat template.
      ValueError: the template failed on these messages (its ``raise_exception``, a jinja2
        error); the message says why.
    """
    import jinja2

    if hasattr(tokenizer, "chat_template") and not tokenizer.chat_template:
        raise NoChatTemplateError(
            "this tokenizer has no chat template (the source defines none); format the prompt "
            "yourself (a raw-text prompt) or load an instruct model."
        )
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    except (ValueError, jinja2.TemplateError) as e:
        raise ValueError(f"the chat template failed: {e}") from e
    # The template writes its own BOS ({{ bos_token }}): nothing is added.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _adds_bos(backend: tokenizers.Tokenizer, bos: int | None) -> bool:
    """Whether ``backend``'s post-processor puts ``bos`` first (a source that does not state
    ``add_bos_token``)."""
    if bos is None:
        return False
    ids = backend.encode("x", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


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


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


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


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_from_hf_dir(
    path: str | Path, config: dict[str, Any] | None = None
) -> Tokenizer | None:
    """Load `tokenizer.json` (+ `tokenizer_config.json`, `chat_template.jinja`) from an HF dir.

    Args:
      path: the model directory.
      config: the checkpoint config, whose bos/eos ids are used when tokenizer_config.json names
        no such tokens.

    Returns:
      A `Tokenizer`, or None when the directory has no `tokenizer.json`.
    """
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok_config = {}
    if (path / "tokenizer_config.json").is_file():
        tok_config = json.loads((path / "tokenizer_config.json").read_text())
    template = tok_config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # several named templates: use the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    config = config or {}

    def token_id(key: str) -> int | None:
        content = _token_content(tok_config.get(f"{key}_token"))
        found = backend.token_to_id(content) if content else None
        fallback = config.get(f"{key}_token_id")
        if isinstance(fallback, list):  # e.g. Llama 3 lists several eos ids; the first is primary
            fallback = fallback[0] if fallback else None
        return found if found is not None else fallback

    bos = token_id("bos")
    add_bos = tok_config.get("add_bos_token")
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_id=token_id("eos"),
        pad_token_id=token_id("pad"),
        chat_template=template,
        # As tokenizer_config.json states it, else as tokenizer.json's post-processor does.
        add_bos_token=_adds_bos(backend, bos) if add_bos is None else bool(add_bos),
    )
