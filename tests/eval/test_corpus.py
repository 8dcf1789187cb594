"""Named corpora: the pydoc halves and text files."""

from pydoc_data.topics import topics

import pytest

from jquant.eval import CORPORA, load_corpus


def test_pydoc_halves_split_the_joined_topics():
    full = "\n\n".join(topics[k] for k in sorted(topics))
    calib, evaluation = load_corpus("pydoc-calib"), load_corpus("pydoc-eval")
    assert calib + evaluation == full
    assert len(calib) == len(full) // 2
    assert set(CORPORA) == {"pydoc-calib", "pydoc-eval"}


def test_path_to_a_text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    assert load_corpus(path) == "héllo\nworld"
    assert load_corpus(str(path)) == "héllo\nworld"


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="'wikitext'.*pydoc-calib, pydoc-eval"):
        load_corpus("wikitext")
