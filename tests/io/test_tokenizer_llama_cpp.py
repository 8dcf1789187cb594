"""GGUF tokenizers of real models against llama.cpp's own expected token ids.

llama.cpp keeps vocabulary-only GGUF files of real models (Llama 2's SentencePiece vocabulary,
Phi-3's, Llama 3's and Qwen2's byte-level BPE, GPT-2's) with test texts (`.inp`) and the ids
llama.cpp's tokenizer gives them (`.out`, written by its test-tokenizer-0 with no special
tokens added). They ship inside the llama-cpp-python source distribution, a pinned PyPI
download (the sha256 is checked), cached like the registry's models (tests/conftest.py
`vocab_dir`, `vocab_cases`).
"""

from __future__ import annotations

import pytest

from jquant.io import gguf as jgguf
from jquant.io.tokenizer import tokenizer_from_gguf_fields

# name: tokenizer.ggml.model (the files: tests/conftest.py `vocab_dir`)
VOCABS = {
    "llama-spm": "llama",  # Llama 2: SentencePiece BPE, byte fallback, prefix space
    "phi-3": "llama",  # Phi-3: SentencePiece with added chat tokens
    "llama-bpe": "gpt2",  # Llama 3: byte-level BPE, ignore_merges
    "qwen2": "gpt2",
    "gpt-2": "gpt2",
}


@pytest.mark.parametrize("name", list(VOCABS))
def test_ids_equal_llama_cpp(vocab_dir, vocab_cases, name):
    meta = jgguf.read_metadata(vocab_dir / f"ggml-vocab-{name}.gguf")
    assert meta["tokenizer.ggml.model"] == VOCABS[name]
    tok = tokenizer_from_gguf_fields(meta, name)
    cases = vocab_cases(name)
    wrong = [(text, want, tok.encode(text, add_special_tokens=False)) for text, want in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:2]}"
    for text, want in cases:
        if text.isprintable() and text == text.strip():
            assert tok.decode(want) == text  # ids back to the exact text
