"""Tokenizers from GGUF metadata and HF directories; SmolLM2's against transformers."""

from __future__ import annotations

import json

import pytest

from jquant import io as jio
from jquant.io import _gguf_tokenizer as jgtok
from jquant.io import tokenizer as jtok


@pytest.fixture
def tiny_tokenizer(tmp_path, tiny):
    return jio.load_gguf(tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors())).tokenizer


def test_bytes_to_unicode_is_gpt2s_alphabet():
    table = jgtok._bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_tiny_gguf_tokenizer_merges_and_round_trips(tiny_tokenizer, tiny):
    vocab = tiny.vocab()
    ids = tiny_tokenizer.encode("hello world")
    assert [vocab[i] for i in ids] == ["hell", "o", "Ġwor", "l", "d"]
    for text in ["hello world", "  spaces\tand\nnewlines  ", "ünïcödé ✓ 漢字", "x = f(1, 2)  # 42"]:
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_control_tokens_stay_whole(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_bos_follows_the_file(tmp_path, tiny):
    no_bos = jio.load_gguf(tiny.write_gguf(tmp_path / "a.gguf", tiny.tensors())).tokenizer
    bos = jio.load_gguf(
        tiny.write_gguf(tmp_path / "b.gguf", tiny.tensors(), add_bos=True)
    ).tokenizer
    assert bos.encode("hello") == [1] + no_bos.encode("hello")
    assert bos.encode("hello", add_special_tokens=False) == no_bos.encode("hello")
    assert (bos.bos_token, bos.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (bos.add_bos_token, no_bos.add_bos_token) == (True, False)


def test_encode_prompt_adds_one_bos_exactly_when_the_file_says(tmp_path, tiny):
    no_bos = jio.load_gguf(tiny.write_gguf(tmp_path / "a.gguf", tiny.tensors())).tokenizer
    bos = jio.load_gguf(
        tiny.write_gguf(tmp_path / "b.gguf", tiny.tensors(), add_bos=True)
    ).tokenizer
    plain = no_bos.encode("hello", add_special_tokens=False)
    assert jio.encode_prompt(no_bos, "hello") == plain and plain[0] != 1
    assert jio.encode_prompt(bos, "hello") == [1] + plain
    assert (jio.leading_bos(bos), jio.leading_bos(no_bos)) == (1, None)
    # A prompt that already starts with BOS (<|im_start|> is this vocabulary's BOS) keeps one.
    assert jio.encode_prompt(bos, "<|im_start|>hello") == [1] + plain
    assert jio.encode_prompt(bos, "") == [1]
    # Objects without the attribute (a stand-in, an older tokenizer) add none.
    assert jio.leading_bos(object()) is None


@pytest.mark.parametrize("fields, expected", [
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}, False),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"}, False),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"}, True),
    ({"tokenizer.ggml.model": "llama"}, True),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": False}, False),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.add_bos_token": True}, True),
])  # fmt: skip
def test_gguf_add_bos_defaults_are_llama_cpps(fields, expected):
    assert jgtok._gguf_add_bos(fields) is expected


@pytest.mark.parametrize("stated", [True, False, None])
def test_hf_dir_add_bos_token(tmp_path, tiny, stated):
    # The backend's post-processor adds BOS; tokenizer_config.json, when it states the flag, wins.
    source = jio.load_gguf(
        tiny.write_gguf(tmp_path / "b.gguf", tiny.tensors(), add_bos=True)
    ).tokenizer
    d = tmp_path / "hf"
    d.mkdir()
    source.backend.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>"}
    if stated is not None:
        config["add_bos_token"] = stated
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = jtok.tokenizer_from_hf_dir(d)
    assert tok.add_bos_token is (True if stated is None else stated)
    plain = source.encode("hello", add_special_tokens=False)
    assert jio.encode_prompt(tok, "hello") == ([1] + plain if tok.add_bos_token else plain)


def test_hf_dir_without_a_bos_post_processor_adds_none(tmp_path, tiny_tokenizer):
    tiny_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    tok = jtok.tokenizer_from_hf_dir(tmp_path)
    assert tok.bos_token_id == 1 and tok.add_bos_token is False


def test_chat_template(tiny_tokenizer):
    messages = [{"role": "user", "content": "hi"}]
    assert tiny_tokenizer.apply_chat_template(messages) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    text = tiny_tokenizer.apply_chat_template(messages)
    ids = tiny_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids == tiny_tokenizer.encode(text, add_special_tokens=False) and ids[0] == 1
    assert tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_no_chat_template_is_a_clear_error(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors(), template=None)
    with pytest.raises(ValueError, match="no chat template"):
        jio.load_gguf(path).tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_unsupported_tokenizer_kind_is_rejected():
    with pytest.raises(ValueError, match="'t5' is not supported"):
        jtok.tokenizer_from_gguf_fields({"tokenizer.ggml.model": "t5"})


def test_hf_dir_tokenizer(tmp_path, tiny_tokenizer, tiny):
    tiny_tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": {"content": "<|im_end|>", "special": True},
                "bos_token": "<|im_start|>",
                "chat_template": tiny.template,
            }
        )
    )
    tok = jtok.tokenizer_from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode("hello world") == tiny_tokenizer.encode("hello world")
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == tiny_tokenizer.apply_chat_template(messages)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # wins
    assert jtok.tokenizer_from_hf_dir(tmp_path).apply_chat_template(messages) == "hi"


def test_hf_dir_without_tokenizer(tmp_path):
    assert jtok.tokenizer_from_hf_dir(tmp_path) is None


# --- SmolLM2 against transformers' own GGUF tokenizer -------------------------------------------

TRICKY = [
    "",
    " ",
    "Hello, world!",
    "   leading and trailing   ",
    "tabs\tand\n\nnewlines\r\n\r\nend",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-06-01",
    "unicode: café naïve Ελληνικά русский 日本語 한국어 emoji 🤖🚀 ✓",
    "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't they'll I'm we've she'd IT'S",
    "zero\u200bwidth and\u00a0nbsp",
    "    \n    \n",
]


def pydoc_samples() -> list[str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    middle = len(text) // 2
    return [text[:2000], text[middle : middle + 3000], text[-1500:]]


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm_path):
    pytest.importorskip("torch")
    import transformers
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name
    )


@pytest.mark.slow
def test_smollm_tokenizer_basics(smollm):
    tok = smollm.tokenizer
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode("Hello") == [19556]  # no BOS: SmolLM2 adds none
    assert tok.add_bos_token is False and jio.encode_prompt(tok, "Hello") == [19556]
    assert "<|im_start|>" in tok.chat_template
    for text in pydoc_samples() + TRICKY:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("which", ["pydoc", "tricky"])
def test_smollm_tokenizer_matches_transformers(smollm, hf_gguf_tokenizer, which):
    tok = smollm.tokenizer
    texts = pydoc_samples() if which == "pydoc" else TRICKY
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_gguf_tokenizer.encode(text), text[:80]
        assert tok.decode(ids) == hf_gguf_tokenizer.decode(ids), text[:80]
        assert tok.decode(ids, skip_special_tokens=True) == hf_gguf_tokenizer.decode(
            ids, skip_special_tokens=True
        )
    assert sum(len(t) for t in texts) > 0


@pytest.mark.slow
@pytest.mark.reference
def test_smollm_backend_and_template_match_transformers(smollm, hf_gguf_tokenizer):
    ours = json.loads(smollm.tokenizer.backend.to_str())
    theirs = json.loads(hf_gguf_tokenizer.backend_tokenizer.to_str())
    for part in ("pre_tokenizer", "decoder", "normalizer"):
        assert ours[part] == theirs[part], part
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]
    key = lambda t: t["id"]  # noqa: E731
    assert sorted(ours["added_tokens"], key=key) == sorted(theirs["added_tokens"], key=key)
    assert smollm.tokenizer.eos_token_id == hf_gguf_tokenizer.eos_token_id
    for messages in (
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ):
        for gen in (True, False):
            assert smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == (
                hf_gguf_tokenizer.apply_chat_template(
                    messages, add_generation_prompt=gen, tokenize=False
                )
            )
