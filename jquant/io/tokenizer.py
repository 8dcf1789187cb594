"""Tokenizers for imported checkpoints, built with `tokenizers` alone (no torch).

`Tokenizer` wraps a `tokenizers.Tokenizer` with the model's special ids, BOS convention and
chat template; `encode_prompt`, `leading_bos` and `chat_prompt` turn a text or a conversation
into the ids the model sees. An HF directory's `tokenizer.json` is loaded as it is
(`tokenizer_from_hf_dir`); a GGUF file's is rebuilt from its metadata
(`tokenizer_from_gguf_fields`, from `jquant.io._gguf_tokenizer`).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jquant.io._gguf_tokenizer import tokenizer_from_gguf_fields as tokenizer_from_gguf_fields


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
