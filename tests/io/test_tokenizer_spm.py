"""SentencePiece (`tokenizer.ggml.model == "llama"`) tokenizers from GGUF metadata.

Small SentencePiece BPE models are trained here (no downloads), written as GGUF the way
llama.cpp's `convert_hf_to_gguf.py` writes Llama 2 and Gemma vocabularies, read back with
`read_metadata` and compared id for id with the `sentencepiece` model they came from.
"""

from __future__ import annotations

import re
import types

import gguf
import pytest

from jquant.io.gguf import read_metadata
from jquant.io.tokenizer import tokenizer_from_gguf_fields

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")
from sentencepiece import sentencepiece_model_pb2 as spm_pb  # noqa: E402

SPACE = "\u2581"
CHAT_TOKENS = ("<start_of_turn>", "<end_of_turn>")  # Gemma: user-defined in SP, control in GGUF
GEMMA_USER = (*CHAT_TOKENS, "\n\n", "<table>", "<b>", *(SPACE * n for n in range(2, 9)))

EXTRA = (
    "Ça a été très étrange — naïve café, Straße, Ελληνικά, русский язык. "
    "日本語のテキスト、中文文本，한국어 텍스트. "
)


def _pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _texts() -> list[str]:
    text = _pydoc()  # the models train on its first 60k characters; these come from later on
    return [
        text[70_000:72_500],
        text[-2_000:],
        " " + text[90_000:90_800],
        "def f(x):\n    return x ** 2  # square\n\n\tif a != b:\n\t\tpass\n",
        "Ångström façade jalapeño œuvre, naïve café à Zürich — déjà vu.",
        "日本語のテキスト 漢字鬱 中文文本，한국어 텍스트.",
        "emoji 🤖🚀 ✓ 👩‍💻 and é",
        "a  b   c    d" + " " * 40 + "e",
        "tabs\tand\t\tmore\n\n\nnewlines\r\n\r\nend",
        "   lead and trail   ",
        " ",
        "",
        "\n",
        "2024-06-01 3.14159 1,000,000 x1 42",
        "zero\u200bwidth and\u00a0nbsp, a literal ▁ marker",
        "<start_of_turn>user\nHi there!<end_of_turn>\n<start_of_turn>model\n",
        "<bos>text<eos> more <bos>",
        "<s>[INST] hi [/INST] ok</s> <s> again",
        "<unk> and <mask>",
        "<table><b>bold</b></table>",
    ]


TEXTS = _texts()


def _train(tmp, prefix, **options) -> spm_pb.ModelProto:
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(_pydoc()[:60_000] + "\n" + EXTRA * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp / prefix),
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        # Llama's and Gemma's models: no normalization, whitespace kept as it is.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        max_sentence_length=100_000,
        minloglevel=2,
        **options,
    )
    proto = spm_pb.ModelProto()
    proto.ParseFromString((tmp / f"{prefix}.model").read_bytes())
    return proto


def write_gguf(path, proto, *, arch, control=(), add_bos=True, add_eos=False):
    """Write `proto`'s vocabulary as llama.cpp's `_create_vocab_sentencepiece` does.

    Types come from the model (unknown, control, unused, byte); its user-defined pieces are
    the added tokens of tokenizer_config.json, which the converter types CONTROL when special
    (`control` here) and USER_DEFINED otherwise, with `▁` turned back into spaces; both get
    score -1000.
    """
    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    tokens, scores, toktypes = [], [], []
    for i, piece in enumerate(proto.pieces):
        token, score, toktype = piece.piece, piece.score, gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            toktype = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            toktype = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            toktype = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            toktype = gguf.TokenType.BYTE
        if piece.type == spm_pb.ModelProto.SentencePiece.USER_DEFINED:
            score = -1000.0
            if token in control:
                toktype = gguf.TokenType.CONTROL
            else:
                toktype = gguf.TokenType.USER_DEFINED
                token = token.replace(SPACE, " ")
        tokens.append(token)
        scores.append(score)
        toktypes.append(toktype)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(toktypes)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if sp.pad_id() >= 0:
        w.add_pad_token_id(sp.pad_id())
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load(path):
    return tokenizer_from_gguf_fields(read_metadata(path), str(path))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`{"llama": ..., "gemma": ...}`: the trained SP model, its GGUF and our tokenizer."""
    tmp = tmp_path_factory.mktemp("spm")
    llama = _train(tmp, "llama", vocab_size=1000, add_dummy_prefix=True)
    gemma = _train(
        tmp,
        "gemma",
        vocab_size=1200,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=["<mask>"],
        user_defined_symbols=list(GEMMA_USER),
    )
    out = {}
    for name, proto, arch, control in [
        ("llama", llama, "llama", ()),
        ("gemma", gemma, "gemma3", CHAT_TOKENS),
    ]:
        path = write_gguf(tmp / f"{name}.gguf", proto, arch=arch, control=control)
        sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        out[name] = types.SimpleNamespace(proto=proto, sp=sp, path=path, tok=load(path))
    return out


def no_prefix(proto) -> spm.SentencePieceProcessor:
    """`proto` with SentencePiece's dummy prefix off."""
    proto = spm_pb.ModelProto.FromString(proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def reference_ids(sp, text, *, bos=True, encode_segment=None) -> list[int]:
    """SentencePiece's ids for `text`, control and unknown tokens written in it matched whole.

    SentencePiece matches user-defined pieces in text but not control ones; llama.cpp (and
    Llama 2's reference code, one encode per segment) cut those out and encode the text
    between them on its own. `encode_segment(index, offset, segment)` overrides `sp.encode`.
    """
    whole = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    whole = [p for i, p in enumerate(whole) if sp.is_control(i) or sp.is_unknown(i)]
    pattern = "(" + "|".join(map(re.escape, sorted(whole, key=len, reverse=True))) + ")"
    ids = [sp.bos_id()] if bos else []
    offset = 0
    for index, part in enumerate(re.split(pattern, text)):
        if index % 2:
            ids.append(sp.piece_to_id(part))
        elif part:
            ids += encode_segment(index, offset, part) if encode_segment else sp.encode(part)
        offset += len(part)
    return ids


def pieces(tok, ids) -> list[str]:
    return [tok.backend.id_to_token(i) for i in ids]


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_ids_match_sentencepiece(models, name):
    m = models[name]
    assert sum(map(len, TEXTS)) > 5000
    for text in TEXTS:
        ours = m.tok.encode(text)
        ref = reference_ids(m.sp, text)
        assert ours == ref, (text[:60], pieces(m.tok, ours)[:30], m.sp.id_to_piece(ref)[:30])
        assert m.tok.encode(text, add_special_tokens=False) == ref[1:]


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_decode_round_trips(models, name):
    tok = models[name].tok
    for text in TEXTS:
        if name == "llama" and re.search("<s>|</s>|<unk>", text):
            continue  # the text after a control token gets its own prefix space (below)
        text = text.replace(SPACE, " ")  # SentencePiece's own space marker reads as a space
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text)[1:]) == text  # BOS first, then the same ids


def test_llama_style_prefix_space_and_byte_fallback(models):
    m = models["llama"]
    tok = m.tok
    assert tok.add_bos_token and (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert pieces(tok, tok.encode(" hi", add_special_tokens=False))[0] == SPACE * 2
    emoji = tok.encode("🤖", add_special_tokens=False)
    assert pieces(tok, emoji) == [SPACE, "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert tok.decode(emoji) == "🤖"
    # A control token is matched whole; the text after it starts a new segment, prefix and all.
    ids = tok.encode("<s>[INST] hi", add_special_tokens=False)
    assert ids[0] == m.sp.bos_id() and ids[1:] == m.sp.encode("[INST] hi")
    assert tok.decode(ids) == "<s> [INST] hi"
    assert tok.decode(ids, skip_special_tokens=True) == "[INST] hi"


def test_gemma_style_whole_tokens(models):
    m = models["gemma"]
    tok = m.tok
    assert tok.add_bos_token and (tok.bos_token, tok.eos_token) == ("<bos>", "<eos>")
    assert tok.pad_token_id == 0
    text = "<start_of_turn>user\nhi<end_of_turn>"
    ids = tok.encode(text, add_special_tokens=False)
    assert pieces(tok, ids)[0] == "<start_of_turn>" and pieces(tok, ids)[-1] == "<end_of_turn>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"
    # Whitespace runs are user-defined tokens, matched longest first like SentencePiece does.
    # In the file they are spelled with spaces; "▁ ▁" (SentencePiece's space marker) matches too.
    for text in ["a" + " " * 11 + "b", "a" + " ▁" * 5 + " b"]:
        run = tok.encode(text, add_special_tokens=False)
        assert m.sp.id_to_piece(run) == ["a", SPACE * 8, SPACE * 3, "b"]
        assert run == m.sp.encode(text)
    assert tok.decode(run) == "a" + " " * 11 + "b"
    assert tok.encode(" hi", add_special_tokens=False) == m.sp.encode(" hi")  # no dummy prefix


def test_bos_and_eos_follow_the_file(models, tmp_path):
    proto = models["llama"].proto
    sp = models["llama"].sp
    both = load(write_gguf(tmp_path / "e.gguf", proto, arch="llama", add_eos=True))
    none = load(write_gguf(tmp_path / "n.gguf", proto, arch="llama", add_bos=False))
    assert both.encode("hello") == [sp.bos_id(), *sp.encode("hello"), sp.eos_id()]
    assert none.encode("hello") == sp.encode("hello") and not none.add_bos_token
    assert both.encode("hello", add_special_tokens=False) == sp.encode("hello")
    pair = both.backend.encode("a", "b").ids
    bos, eos = sp.bos_id(), sp.eos_id()
    assert pair == [bos, *sp.encode("a"), eos, bos, *sp.encode("b"), eos]


def test_merges_in_the_file_are_used(models):
    m = models["llama"]
    fields = read_metadata(m.path)
    fields["tokenizer.ggml.merges"] = []  # no merges: every character stays on its own
    tok = tokenizer_from_gguf_fields(fields)
    assert pieces(tok, tok.encode("the", add_special_tokens=False)) == [SPACE, "t", "h", "e"]


def test_other_kinds_are_rejected():
    with pytest.raises(ValueError, match=r"'t5' is not supported.*'gpt2'.*'llama'"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "t5"}, "m.gguf")


@pytest.mark.reference
@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_against_transformers_gguf_loader(models, name):
    """transformers' own GGUF tokenizer, which disagrees with SentencePiece in two known ways.

    * Llama (`LlamaTokenizer`: `Metaspace(prepend_scheme="first")`): the prefix space is added
      only to text at the very start, and not when that text already starts with a space, where
      SentencePiece adds it anyway (`" hi"` is `▁▁ h i`, transformers says `▁ h i`). So text
      after a control token, or starting with a space, is encoded as with no dummy prefix.
    * Gemma (`gemma_tokenizer`): the user-defined whitespace-run tokens are respelled `▁▁...`
      and then not added as tokens (the spaced spelling is looked up), so runs of spaces are cut
      by BPE merges instead of matched longest first: same text, other ids.
    Both sides are asserted as they are; we follow SentencePiece (and llama.cpp).
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    m = models[name]
    hf = transformers.AutoTokenizer.from_pretrained(str(m.path.parent), gguf_file=m.path.name)
    plain = no_prefix(m.proto)

    def transformers_segment(index, offset, segment):
        if name == "llama" and offset == 0 and not segment.startswith(" "):
            return m.sp.encode(segment)
        return plain.encode(segment)

    differ = 0
    for text in TEXTS:
        ours, theirs = m.tok.encode(text), hf.encode(text)
        if name == "gemma" and "  " in text:
            assert hf.decode(theirs) == m.tok.decode(ours), text[:60]
        else:
            assert theirs == reference_ids(m.sp, text, encode_segment=transformers_segment)
        differ += ours != theirs
    assert differ >= 3  # the disagreement is real on these texts, not vacuous
