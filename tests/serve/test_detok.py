"""Incremental detokenization against the tokenizer's own decode of the whole sequence, with
real byte-level BPE and SentencePiece-style (Metaspace) tokenizers trained here on text
with multi-byte characters."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jquant.serve.detok import IncrementalText

TEXT = (
    "Ça a été très étrange — naïve café, Straße, Ελληνικά, русский язык. "
    "日本語のテキスト、中文文本，한국어 텍스트. Emoji: 🙂🚀👩‍💻 and math ∑∫√. "
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass\n"
)


class Counting:
    """A `tokenizers.Tokenizer` as the engine calls it, counting the ids it decodes."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text):
        return self.tok.encode(text).ids


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3], trainer)
    return tok


def _metaspace():
    """Llama 2 / Gemma style: ▁ for spaces, characters outside the vocabulary as <0xNN>
    byte tokens (byte fallback)."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=500, show_progress=False)
    trained.train_from_iterator([TEXT.replace("日本語", "").replace("🚀", "") * 3], trainer)
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    return tok


TOKENIZERS = {"byte_level": _byte_level, "metaspace": _metaspace}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request):
    return Counting(TOKENIZERS[request.param]())


def test_streamed_text_equals_decode_and_holds_back_partial_characters(tok):
    ids = tok.encode(TEXT)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # characters split over ids
    t, pieces = IncrementalText(tok), []
    for n, i in enumerate(ids, 1):
        pieces.append(t.push(i))
        assert "\ufffd" not in pieces[-1]  # never half a character
        assert tok.decode(ids[:n]).startswith(t.text)  # what is out is final
    pieces.append(t.flush())
    assert "".join(pieces) == t.text == tok.decode(ids) == TEXT


def test_work_per_token_is_constant(tok):
    ids = tok.encode(TEXT * 8)
    tok.decoded = 0
    t = IncrementalText(tok)
    t.extend(ids)
    assert t.text + t.flush() == tok.decode(ids)
    tok.decoded -= len(ids)  # the reference decode just above
    assert tok.decoded <= 16 * len(ids)  # a whole-text decode per token: ~len(ids)**2 / 2


def test_unusual_token_boundaries_end_as_decode_of_the_whole(tok):
    """Words tokenized one by one and joined: valid text, token boundaries that encoding the
    whole text would not give."""
    rng = np.random.default_rng(0)
    words = TEXT.split(" ")
    for _ in range(20):
        picked = rng.choice(len(words), int(rng.integers(1, 12)))
        ids = [i for w in picked for i in tok.encode(words[w] + " ")]
        t = IncrementalText(tok)
        out = t.extend(ids) + t.flush()
        assert out == t.text == tok.decode(ids)


def test_random_byte_level_ids_end_as_decode_of_the_whole():
    """Arbitrary ids of a byte-level vocabulary (invalid UTF-8 included), as a sampling
    model may produce them. (A byte-fallback decoder replaces an invalid run of byte tokens
    as a whole, which a bounded window cannot see: there only the replacement characters
    may differ; not tested.)"""
    tok = Counting(_byte_level())
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tok.tok.get_vocab_size(), int(rng.integers(1, 40))).tolist()
        t = IncrementalText(tok)
        out = t.extend(ids) + t.flush()
        assert out == t.text == tok.decode(ids)
