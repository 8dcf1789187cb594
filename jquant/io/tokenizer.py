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
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

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


class Tokenizer:
    """Text <-> token ids, plus the model's chat template.

    Wraps a `tokenizers.Tokenizer` (`.backend`). `encode` applies the source's own convention
    for a leading BOS (SmolLM2's adds none); nothing else is added.

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
    ):
        self.backend = backend
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
            f"eos_token_id={self.eos_token_id}, chat_template={self.chat_template is not None})"
        )


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
      A `Tokenizer` encoding exactly as transformers' GGUF loader does.

    Raises:
      ValueError: the file has no tokenizer, or one other than byte-level BPE (`"gpt2"`).
    """
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r} is not supported; jquant builds byte-level "
            "BPE ('gpt2') tokenizers from GGUF metadata. Load the HF directory of this model."
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
    )


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

    return Tokenizer(
        backend,
        bos_token_id=token_id("bos"),
        eos_token_id=token_id("eos"),
        pad_token_id=token_id("pad"),
        chat_template=template,
    )
