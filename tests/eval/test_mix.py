"""`python-mix`, the default calibration text: nothing of the evaluation texts, its parts in
their shares all along, the same on every build, a clear error without the stdlib's tests."""

import hashlib
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jquant.calib import calibration_tokens
from jquant.calib.data import DEFAULT_CORPUS
from jquant.eval import CORPORA, _mix, load_corpus

# sha256 of `python-mix` (UTF-8) under the Python that docs/results.md's numbers come from.
PYTHON_MIX_SHA256 = {
    (3, 11, 7): "9551642143a07addfe055489ed8d6016788c2fe1664d36d538aab98913de6ef4"
}
SPAN = 64  # no run of this many characters of an evaluation text is in the mix


@pytest.fixture(scope="module")
def mix() -> str:
    return load_corpus("python-mix")


@pytest.fixture(scope="module")
def parts() -> list[tuple[str, str]]:
    return _mix.mix_parts()


@pytest.fixture(scope="module")
def eval_spans() -> set[str]:
    """Every SPAN-character substring of the evaluation texts, as strings."""
    texts = [load_corpus("pydoc-eval"), load_corpus("python-code")]
    return {t[i : i + SPAN] for t in texts for i in range(len(t) - SPAN + 1)}


def shared_spans(text: str, spans: set[str]) -> list[str]:
    return [text[i : i + SPAN] for i in range(len(text) - SPAN + 1) if text[i : i + SPAN] in spans]


def test_is_the_default_and_named():
    assert DEFAULT_CORPUS == "python-mix" and "python-mix" in CORPORA


def test_holds_no_run_of_the_evaluation_texts(mix, eval_spans):
    assert not shared_spans(mix, eval_spans)


def test_the_check_finds_a_planted_paragraph(mix, eval_spans):
    evaluation = load_corpus("pydoc-eval")
    paragraph = evaluation[len(evaluation) // 3 :][:300]
    planted = mix[:100_000] + paragraph + mix[100_000:]
    assert shared_spans(planted, eval_spans)


def test_no_file_of_python_code_or_of_pydoc_eval():
    from jquant.eval.corpus import PYTHON_CODE_MODULES

    assert not set(_mix.MIX_CODE_MODULES) & set(PYTHON_CODE_MODULES)
    assert list(_mix.MIX_CODE_MODULES) == sorted(_mix.MIX_CODE_MODULES)


def test_parts_hold_their_shares_all_along(mix, parts):
    shares = {p.name: p.share for p in _mix.PARTS}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert "\n\n".join(piece for _, piece in parts) == mix
    # Read in order, every part stays within 3 pieces (7,500 characters, about 2,000 tokens)
    # of its share of the text read so far: each is spread over the whole text.
    taken, read = dict.fromkeys(shares, 0), 0
    for name, piece in parts:
        taken[name] += len(piece)
        read += len(piece)
        for n, share in shares.items():
            assert abs(taken[n] - share * read) <= 3 * _mix.PIECE, (read, n)
    whole = {n: sum(len(p) for m, p in parts if m == n) for n in shares}
    for name, share in shares.items():
        assert whole[name] / sum(whole.values()) == pytest.approx(share, abs=0.01), name


def test_same_text_on_every_build(mix):
    _mix.mix_text.cache_clear()
    again = load_corpus("python-mix")
    assert again == mix and again is not mix and "\r" not in mix
    digest = PYTHON_MIX_SHA256.get(sys.version_info[:3])
    if digest is not None:
        assert hashlib.sha256(mix.encode("utf-8")).hexdigest() == digest


def test_reads_only_the_standard_library(monkeypatch, tmp_path):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for entry in stdlib.iterdir():  # the standard library but for test/mime.types
        if entry.name not in ("test", "site-packages"):
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "test").mkdir()
    for entry in (stdlib / "test").iterdir():
        if entry.name != "mime.types":
            (tmp_path / "test" / entry.name).symlink_to(entry)
    paths = dict(sysconfig.get_paths(), stdlib=str(tmp_path))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: paths)
    _mix.mix_text.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"'python-mix' needs .*test/mime\.types"):
            load_corpus("python-mix")
    finally:
        _mix.mix_text.cache_clear()


@pytest.mark.slow
def test_128_disjoint_windows_of_512(smollm, mix):
    tok = smollm.tokenizer
    ids = np.asarray(tok.encode(mix, add_special_tokens=False), np.int32)
    assert len(ids) >= 128 * 512
    windows = calibration_tokens(tok, "python-mix", samples=128, seq_len=512)
    np.testing.assert_array_equal(windows, ids[: 128 * 512].reshape(128, 512))
