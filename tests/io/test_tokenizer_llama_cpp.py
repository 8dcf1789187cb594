"""GGUF tokenizers of real models against llama.cpp's own expected token ids.

llama.cpp keeps vocabulary-only GGUF files of real models (Llama 2's SentencePiece vocabulary,
Phi-3's, Llama 3's and Qwen2's byte-level BPE, GPT-2's) with test texts (`.inp`) and the ids
llama.cpp's tokenizer gives them (`.out`, written by its test-tokenizer-0 with no special
tokens added). They ship inside the llama-cpp-python source distribution, a pinned PyPI
download (the sha256 is checked), cached like the registry's models.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from jquant.io import gguf as jgguf
from jquant.io.registry import cache_dir
from jquant.io.tokenizer import tokenizer_from_gguf_fields

SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
# name: (tokenizer.ggml.model, whether llama.cpp's file says to add BOS)
VOCABS = {
    "llama-spm": "llama",  # Llama 2: SentencePiece BPE, byte fallback, prefix space
    "phi-3": "llama",  # Phi-3: SentencePiece with added chat tokens
    "llama-bpe": "gpt2",  # Llama 3: byte-level BPE, ignore_merges
    "qwen2": "gpt2",
    "gpt-2": "gpt2",
}
SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def vocab_dir():
    """The extracted vocabulary files (fetched once into the jquant cache)."""
    target = cache_dir() / "llama-cpp-vocab-0.3.36"
    names = [f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")]
    if all((target / n).is_file() for n in names):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--dest", tmp, "llama-cpp-python==0.3.36"],
            check=True,
        )  # fmt: skip
        sdist = Path(tmp) / SDIST
        assert hashlib.sha256(sdist.read_bytes()).hexdigest() == SHA256
        with tarfile.open(sdist) as tar:
            for n in names:
                data = tar.extractfile(MODELS + n).read()
                part = target / f".{n}.part"
                part.write_bytes(data)
                part.rename(target / n)
    return target


def _cases(directory: Path, name: str) -> list[tuple[str, list[int]]]:
    texts = (directory / f"ggml-vocab-{name}.gguf.inp").read_text("utf-8").split(SEPARATOR)
    assert texts[-1] == ""  # every text ends with the separator
    lines = (directory / f"ggml-vocab-{name}.gguf.out").read_text("utf-8").split("\n")
    assert lines[-1] == ""
    texts, lines = texts[:-1], lines[:-1]
    assert len(texts) == len(lines) > 30
    return [(t, [int(i) for i in line.split()]) for t, line in zip(texts, lines)]


@pytest.mark.parametrize("name", list(VOCABS))
def test_ids_equal_llama_cpp(vocab_dir, name):
    meta = jgguf.read_metadata(vocab_dir / f"ggml-vocab-{name}.gguf")
    assert meta["tokenizer.ggml.model"] == VOCABS[name]
    tok = tokenizer_from_gguf_fields(meta, name)
    cases = _cases(vocab_dir, name)
    wrong = [(text, want, tok.encode(text, add_special_tokens=False)) for text, want in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:2]}"
    for text, want in cases:
        if text.isprintable() and text == text.strip():
            assert tok.decode(want) == text  # ids back to the exact text
