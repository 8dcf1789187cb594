"""Named corpora: the pydoc halves, python-code, and text files."""

import copy
import hashlib
import importlib.util
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from jquant.eval import CORPORA, load_corpus
from jquant.eval.corpus import PYTHON_CODE_MODULES, _python_code_text

# sha256 of `python-code` (UTF-8) under the Python that docs/evaluation.md's numbers come from.
PYTHON_CODE_SHA256 = {
    (3, 11, 7): "cd848358a4bc277f7e1a0d2bf2b64515941d7135443ab25438184c8ee468dcaa"
}


def test_names():
    assert set(CORPORA) == {"python-mix", "pydoc-calib", "pydoc-eval", "python-code"}


def test_pydoc_halves_split_the_joined_topics():
    full = "\n\n".join(topics[k] for k in sorted(topics))
    calib, evaluation = load_corpus("pydoc-calib"), load_corpus("pydoc-eval")
    assert calib + evaluation == full
    assert len(calib) == len(full) // 2


def test_python_code_is_the_module_files_in_sorted_order():
    assert list(PYTHON_CODE_MODULES) == sorted(set(PYTHON_CODE_MODULES))
    files = [Path(importlib.util.find_spec(m).origin) for m in PYTHON_CODE_MODULES]
    expected = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    assert load_corpus("python-code") == expected
    _python_code_text.cache_clear()  # read again from the files, not from the cache
    text = load_corpus("python-code")
    assert text == expected and "\r" not in text
    digest = PYTHON_CODE_SHA256.get(sys.version_info[:3])
    if digest is not None:
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == digest


def test_python_code_is_long_enough():
    # ~3.8 characters per SmolLM2 token on this code: 189,780 characters are 49,535 tokens
    # (test_python_code_tokens counts them); 16,384 tokens must fit with room to spare.
    assert len(load_corpus("python-code")) > 120_000


@pytest.mark.slow
def test_python_code_tokens(smollm):
    ids = smollm.tokenizer.encode(load_corpus("python-code"), add_special_tokens=False)
    assert len(ids) >= 30_000


@pytest.mark.parametrize("other", ["pydoc-calib", "pydoc-eval"])
def test_python_code_shares_no_line_with_pydoc(other):
    # Python's docs quote code, but no line of these modules with 20+ characters and a word
    # (pydoc-eval and heapq share a rule of dashes).
    pydoc_lines = {line.strip() for line in load_corpus(other).splitlines()}
    code_lines = {line.strip() for line in load_corpus("python-code").splitlines()}
    shared = {s for s in code_lines & pydoc_lines if len(s) >= 20 and any(map(str.isalpha, s))}
    assert not shared


def test_python_code_without_source_says_so(monkeypatch):
    class Sourceless:
        def get_source(self, name):
            return None

    real = importlib.util.find_spec

    def find_spec(name, *args):
        spec = real(name, *args)
        if name == "heapq":  # a copy: find_spec returns an imported module's own __spec__
            spec = copy.copy(spec)
            spec.loader = Sourceless()
        return spec

    _python_code_text.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    try:
        with pytest.raises(ValueError, match="'heapq'.*without source"):
            load_corpus("python-code")
    finally:
        _python_code_text.cache_clear()


def test_path_to_a_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    assert load_corpus(path) == "héllo\nworld"
    assert load_corpus(str(path)) == "héllo\nworld"


def test_unknown_name_lists_the_names():
    names = "python-mix, pydoc-calib, pydoc-eval, python-code"
    with pytest.raises(ValueError, match=f"'wikitext'.*{names}"):
        load_corpus("wikitext")
