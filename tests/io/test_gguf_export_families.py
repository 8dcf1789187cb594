"""`write_gguf` beyond Llama: Qwen2, Qwen3 and Gemma 1/2/3, and SentencePiece tokenizers.

Judged by `load_gguf` (the exact inverse: tensors, codes and scales, config, logits), by the
gguf package's own reader (what is stored: Gemma's ``1 + w`` norms, unpermuted Q/K, the
architecture's keys) and by llama.cpp itself (llama-cpp-python 0.3.36): its logits on the
exported file, and its tokenization of an exported SentencePiece vocabulary (Llama 2's and
Phi-3's real ones, from llama.cpp's own test files) against jquant's and llama.cpp's recorded
ids.
"""

from __future__ import annotations

import json
import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import io as jio
from jquant.arch import LlamaConfig
from jquant.calib import quantize_loaded
from jquant.io._gguf_tokenizer_export import gguf_tokenizer_fields
from jquant.io.gguf_export import write_gguf
from jquant.io.tokenizer import Tokenizer, tokenizer_from_gguf_fields
from jquant.models import forward, params_from_hf, params_to_hf
from jquant.qarray import QArray

# GGUF architecture -> tied embeddings (both kinds are written; gemma/gemma2 only tie).
ARCHS = {"qwen2": True, "qwen3": False, "gemma": True, "gemma2": True, "gemma3": False}
GEMMA = ("gemma", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory, tiny):
    """The tiny byte-level BPE tokenizer (llama.cpp loads no file without a vocabulary)."""
    path = tiny.write_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", tiny.tensors())
    return jio.load_gguf(path).tokenizer


def _family(tiny, arch: str, recipe: str | None = None):
    """(config, model, params) of the tiny ``arch`` model, matrices N(0, 0.1²) (with N(0, 1)
    the random model's logits reach the thousands), quantized by ``recipe``."""
    config = tiny.config(arch=arch, tied=ARCHS[arch])
    tensors = {n: w * np.float32(0.1) if w.ndim == 2 else w
               for n, w in tiny.tensors(arch=arch, tied=ARCHS[arch]).items()}  # fmt: skip
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    if recipe is not None:
        model, params = quantize_loaded(model, params, recipe)
    return config, model, params


def _logits(model, params, tokens) -> np.ndarray:
    return np.asarray(forward(model, params, jnp.asarray([tokens]))[0][0], np.float32)


TOKENS = [int(t) for t in np.random.default_rng(1).integers(3, 200, 24)]  # > the window (8)


@pytest.mark.parametrize("recipe", [None, "gguf-q8_0", "gguf-q4_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_through_load_gguf(tmp_path, tiny, tiny_tokenizer, arch, recipe):
    """jquant -> GGUF -> `load_gguf(packed=True)`: the config, every float tensor (a Gemma norm
    ``w`` as float32(1 + w) − 1: the stored ``1 + w`` is exactly float32(1 + w)), the QArrays'
    codes and scales, and the logits."""
    config, model, params = _family(tiny, arch, recipe)
    path = write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf")
    back = jio.load_gguf(path, packed=True)
    assert back.config == config
    written = params_to_hf(params)
    assert set(back.tensors) == set(written)
    quantized = 0
    for name, value in written.items():
        got = back.tensors[name]
        if isinstance(value, QArray):
            assert (got.qtype, got.group_size, got.shape) == (value.qtype, 32, value.shape)
            np.testing.assert_array_equal(np.asarray(got.codes()), np.asarray(value.codes()))
            np.testing.assert_array_equal(np.asarray(got.scale),
                                          np.asarray(value.scale, np.float32))  # fmt: skip
            quantized += 1
        elif arch in GEMMA and name.endswith("norm.weight"):
            w = np.asarray(value, np.float32)
            np.testing.assert_array_equal(got + np.float32(1), w + np.float32(1), err_msg=name)
        else:
            np.testing.assert_array_equal(got, np.asarray(value, np.float32), err_msg=name)
    # 7 kernels a layer, and the recipe's Q8_0 table (and untied head).
    assert quantized == (0 if recipe is None else 2 * 7 + (1 if ARCHS[arch] else 2))
    model2, params2 = params_from_hf(back.tensors, LlamaConfig.from_hf(back.config))
    ours, again = _logits(model, params, TOKENS), _logits(model2, params2, TOKENS)
    # Gemma's norms differ by float32 rounding of (1 + w) − 1; the others are bit for bit.
    np.testing.assert_allclose(again, ours, rtol=0, atol=1e-5 * np.abs(ours).max())


def test_what_is_stored(tmp_path, tiny, tiny_tokenizer):
    """The gguf package's reading of the files: llama.cpp's tensor names, Q/K rows as HF's
    (no permutation outside llama), Gemma norms as 1 + w, Qwen2's biases, the keys."""
    stored = {}
    for arch in ARCHS:
        config, _, params = _family(tiny, arch)
        path = write_gguf(params, config, tiny_tokenizer, tmp_path / f"{arch}.gguf")
        reader = gguf.GGUFReader(str(path))
        fields = {k: f.contents() for k, f in reader.fields.items()}
        tensors = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist())))
                   for t in reader.tensors}  # fmt: skip
        hf = tiny.tensors(arch=arch, tied=ARCHS[arch])
        assert fields["general.architecture"] == arch
        q = hf["model.layers.1.self_attn.q_proj.weight"] * np.float32(0.1)
        np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], q)
        norm = "blk.0.ffn_norm.weight"  # gemma2/3: the MLP's input norm, HF's pre_feedforward
        want = hf["model.layers.0." + ("pre_feedforward_layernorm" if arch in ("gemma2", "gemma3")
                                       else "post_attention_layernorm") + ".weight"]  # fmt: skip
        np.testing.assert_array_equal(tensors[norm], want + np.float32(arch in GEMMA))
        assert ("output.weight" in tensors) == (not ARCHS[arch])
        stored[arch] = fields, tensors
    assert "blk.0.attn_q.bias" in stored["qwen2"][1] and "blk.0.attn_k.bias" in stored["qwen2"][1]
    assert "blk.0.attn_q_norm.weight" in stored["qwen3"][1]
    fields = stored["gemma2"][0]
    assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"],
            fields["gemma2.attention.sliding_window"]) == (50.0, 30.0, 8)  # fmt: skip
    fields = stored["gemma3"][0]
    assert (fields["gemma3.attention.sliding_window"], fields["gemma3.rope.freq_base_swa"],
            fields["gemma3.attention.key_length"]) == (8, 10000.0, 16)  # fmt: skip
    assert "gemma3.attn_logit_softcapping" not in fields


def test_sliding_pattern_and_global_rope(tmp_path, tiny, tiny_tokenizer):
    """A Gemma 3 whose layers are not llama.cpp's default pattern gets the per-layer flags; its
    global and local RoPE bases come back apart; a gemma2 without a window is told it slides
    nowhere (llama.cpp's gemma2 otherwise slides over 4096)."""
    config = {**tiny.config(arch="gemma3", tied=False), "rope_theta": 1e6,
              "rope_local_base_freq": 20000.0,
              "layer_types": ["full_attention", "sliding_attention"]}  # fmt: skip
    model, params = params_from_hf(tiny.tensors(arch="gemma3", tied=False),
                                   LlamaConfig.from_hf(config))  # fmt: skip
    back = jio.load_gguf(write_gguf(params, config, tiny_tokenizer, tmp_path / "g3.gguf"))
    assert back.config == config
    meta = jio.gguf.read_metadata(tmp_path / "g3.gguf")
    assert meta["gemma3.attention.sliding_window_pattern"] == [False, True]
    config = {**tiny.config(arch="gemma2"), "sliding_window": None, "layer_types": None}
    _, params = params_from_hf(tiny.tensors(arch="gemma2"), LlamaConfig.from_hf(config))
    write_gguf(params, config, tiny_tokenizer, tmp_path / "g2.gguf")
    meta = jio.gguf.read_metadata(tmp_path / "g2.gguf")
    assert meta["gemma2.attention.sliding_window_pattern"] == [False, False]
    assert "gemma2.attention.sliding_window" not in meta
    assert jio.load_gguf(tmp_path / "g2.gguf").config == config


@pytest.mark.parametrize("arch, change, message", [
    ("qwen2", {"model_type": "phi3"}, "model_type 'phi3' (GGUF export writes llama, mistral, "
                                      "qwen2, qwen3, gemma, gemma2, gemma3_text, mixtral, "
                                      "qwen2_moe, qwen3_moe, olmoe)"),
    ("gemma2", {"query_pre_attn_scalar": 32}, "query_pre_attn_scalar=32 (llama.cpp's gemma2 "
                                              "scales queries by 16 ** -0.5 at 2 layers)"),
    ("gemma2", {"attn_logit_softcapping": None}, "no attn_logit_softcapping"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 (llama.cpp's "
                                                 "gemma3 does not cap)"),
    ("gemma", {"tie_word_embeddings": False}, "an untied lm_head (llama.cpp's gemma reuses"),
    ("qwen3", {"attention_bias": True}, "attention biases"),
    ("qwen2", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
     "sliding_window=8 (llama.cpp's qwen2 architecture attends to every position)"),
])  # fmt: skip
def test_what_llama_cpp_would_compute_otherwise_is_refused(tmp_path, tiny, arch, change,
                                                           message):  # fmt: skip
    config = tiny.config(arch=arch, tied=ARCHS[arch])
    _, params = params_from_hf(tiny.tensors(arch=arch, tied=ARCHS[arch]),
                               LlamaConfig.from_hf(config))  # fmt: skip
    with pytest.raises(ValueError, match="write_gguf: the model has .*" + message.replace(
            "(", r"\(").replace(")", r"\)").replace("*", r"\*")):  # fmt: skip
        write_gguf(params, {**config, **change}, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---- llama.cpp ------------------------------------------------------------------------


def _llama(path, n_ctx: int = 32, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                           n_threads=2, verbose=False, seed=0, **kwargs)  # fmt: skip


def _nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Mean next-token cross-entropy (NumPy, float64)."""
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float(np.mean(lse - x[np.arange(len(x)), tokens[1:]]))


@pytest.mark.reference
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_logits_are_jquants(tmp_path, tiny, tiny_tokenizer, arch):
    """llama.cpp runs the float export (its KV cache in float32, so nothing is rounded to
    float16 on the way) and its logits on 24 tokens (three times the sliding window) are
    jquant's: within 1e-4 of the largest logit for Qwen (measured 7.5e-7), 1e-3 for Gemma
    (measured 4.3e-4), whose GELU ggml's CPU backend reads from a table indexed by the
    float16-rounded input (ggml-cpu/vec.h, GGML_GELU_FP16)."""
    config, model, params = _family(tiny, arch)
    llm = _llama(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf"),
                 type_k=0, type_v=0)  # GGML_TYPE_F32  # fmt: skip
    llm.reset()
    llm.eval(TOKENS)
    theirs = np.array(llm.scores[: len(TOKENS)], np.float32)
    ours = _logits(model, params, TOKENS)
    tol = 1e-3 if arch in GEMMA else 1e-4
    assert np.abs(theirs - ours).max() <= tol * np.abs(ours).max()


@pytest.mark.reference
@pytest.mark.parametrize("recipe", ["gguf-q8_0", "gguf-q4_0"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_runs_quantized_export_as_jquant(tmp_path, tiny, tiny_tokenizer, arch, recipe):
    """The same with Q8_0/Q4_0 blocks: llama.cpp's quantized matmuls quantize activations to
    8 bits, so the perplexity of 64 tokens is compared: within 1% of jquant's. With the
    recipes' Q8_0 table the head is a quantized matmul too (its activations 8-bit in llama.cpp);
    measured: at most 0.35% for nine of the ten, 0.50% for gemma3 Q4_0 (untied head)."""
    config, model, params = _family(tiny, arch, recipe)
    llm = _llama(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf"), n_ctx=64)
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 200, 64)]
    llm.reset()
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)], np.float32)
    ours = _logits(model, params, tokens)
    assert math.exp(_nll(theirs, tokens)) == pytest.approx(math.exp(_nll(ours, tokens)), rel=1e-2)


# ---- SentencePiece tokenizers -----------------------------------------------------------

SPM_TEXTS = ["Hello world", " leading space", "two  spaces and\ttabs\nnewline",
             "digits 1234567", "naïve café, Ελληνικά, 日本語", "a byte-fallback 鬱 and 🤖",
             "<s>after a control token", "a" + " " * 11 + "b", ""]  # fmt: skip


def _spm(vocab_dir, name: str, style: str = "prefix") -> Tokenizer:
    """llama.cpp's vocabulary ``name`` as it is (``"prefix"``), or made Gemma-like
    (``"gemma"``): no prefix space, and the runs of 2 to 8 ``▁`` user-defined pieces spelled
    with spaces, as the converter writes Gemma's."""
    meta = jio.gguf.read_metadata(vocab_dir / f"ggml-vocab-{name}.gguf")
    if style == "gemma":
        tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
        for n in range(2, 9):
            i = tokens.index("▁" * n)
            tokens[i], types[i] = " " * n, gguf.TokenType.USER_DEFINED
        meta.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.add_space_prefix": False})  # fmt: skip
    return tokenizer_from_gguf_fields(meta, name)


def _write_vocab(tmp_path, tiny, tok: Tokenizer, name: str):
    """A tiny llama model with ``tok``'s vocabulary written by `write_gguf`."""
    vocab = tok.vocab_size
    config = {**tiny.config(), "vocab_size": vocab, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id}  # fmt: skip
    params = {p: np.zeros(s, np.float32)
              for p, s in jio.expected_shapes(config).items()}  # fmt: skip
    _, params = params_from_hf(params, LlamaConfig.from_hf(config))
    return write_gguf(params, config, tok, tmp_path / f"{name}.gguf")


@pytest.mark.parametrize("name, style", [("llama-spm", "prefix"), ("phi-3", "prefix"),
                                         ("llama-spm", "gemma")])  # fmt: skip
def test_sentencepiece_reads_back_the_same_encoder(tmp_path, tiny, vocab_dir, vocab_cases, name,
                                                   style):  # fmt: skip
    """Llama 2's and Phi-3's vocabularies (and Llama 2's made Gemma-like) written and read
    back: the same `tokenizers` model, normalizer and added tokens, and llama.cpp's recorded
    ids for its test texts."""
    tok = _spm(vocab_dir, name, style)
    prefix = style == "prefix"
    path = _write_vocab(tmp_path, tiny, tok, name)
    meta = jio.gguf.read_metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert meta["tokenizer.ggml.add_space_prefix"] is prefix
    user = [t for t, k in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])
            if k == gguf.TokenType.USER_DEFINED]  # fmt: skip
    assert sorted(user) == ([" " * n for n in range(2, 9)] if style == "gemma" else
                            ["</s>"] if name == "phi-3" else [])  # Phi-3's file types it so
    back = jio.load_gguf(path).tokenizer
    assert back.backend.to_str() == tok.backend.to_str()
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id, back.add_bos_token) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.add_bos_token)
    if prefix:
        for text, want in vocab_cases(name):
            assert back.encode(text, add_special_tokens=False) == want, text


@pytest.mark.reference
@pytest.mark.parametrize("name, style", [("llama-spm", "prefix"), ("phi-3", "prefix"),
                                         ("llama-spm", "gemma")])  # fmt: skip
def test_llama_cpp_tokenizes_the_export_as_jquant(tmp_path, tiny, vocab_dir, vocab_cases, name,
                                                  style):  # fmt: skip
    """llama.cpp loads the exported vocabulary (scores derived from the merges) and tokenizes
    llama.cpp's own test texts and ours (spaces, digits, accents, CJK, a character outside
    the vocabulary spelled as bytes, a control token, Gemma-like whitespace pieces) as jquant
    does; as it is, also as it recorded for the original file."""
    tok = _spm(vocab_dir, name, style)
    prefix = style == "prefix"
    llm = _llama(_write_vocab(tmp_path, tiny, tok, name), vocab_only=True)
    cases = vocab_cases(name)
    bytes_seen = 0
    for text in SPM_TEXTS + [t for t, _ in cases]:
        ours = tok.encode(text, add_special_tokens=False)
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == ours, text
        bytes_seen += any(tok.backend.id_to_token(i).startswith("<0x") for i in ours)
    assert bytes_seen >= 1
    assert llm.tokenize(b"hi", add_bos=True)[0] == tok.bos_token_id
    if prefix:
        for text, want in cases:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text


@pytest.mark.reference
def test_llama_cpp_placeholder_scores_would_not_do(tmp_path, tiny, vocab_dir, monkeypatch):
    """Why the scores are derived from the merges: llama.cpp's converter for a tokenizer.json
    (`LlamaHfVocab`) scores every piece −1000, and llama.cpp then merges leftmost first."""
    from jquant.io import gguf_export

    tok = _spm(vocab_dir, "llama-spm")

    def placeholder(tokenizer, vocab_size):
        fields = gguf_tokenizer_fields(tokenizer, vocab_size)
        return fields._replace(scores=[-1000.0] * len(fields.scores))

    monkeypatch.setattr(gguf_export, "gguf_tokenizer_fields", placeholder)
    llm = _llama(_write_vocab(tmp_path, tiny, tok, "flat"), vocab_only=True)
    differ = [t for t in SPM_TEXTS
              if llm.tokenize(t.encode(), add_bos=False) != tok.encode(t, add_special_tokens=False)]
    assert len(differ) >= 3, differ


def test_tokenizer_json_forms(tmp_path, vocab_dir):
    """A tokenizer.json of SentencePiece kind: Metaspace(prepend_scheme="never") is written as
    no prefix space; "first" (the prefix only where the text does not start with a space) is
    refused, as are merges that no scored vocabulary gives and a missing byte fallback."""
    tok = _spm(vocab_dir, "llama-spm")
    spec = json.loads(tok.backend.to_str())

    def variant(**change):
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(json.dumps({**spec, **change}))
        return Tokenizer(backend, bos_token_id=1, eos_token_id=2, add_bos_token=True)

    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never",
                 "split": False}  # fmt: skip
    never = variant(normalizer=None, pre_tokenizer=metaspace)
    fields = gguf_tokenizer_fields(never, 32000)
    assert fields.add_space_prefix is False
    with pytest.raises(ValueError, match=r"Metaspace\(prepend_scheme='first'\) adds no ▁ before"):
        gguf_tokenizer_fields(variant(normalizer=None, pre_tokenizer={
            **metaspace, "prepend_scheme": "first"}), 32000)  # fmt: skip
    dropped = {**spec["model"], "merges": spec["model"]["merges"][1:]}  # "▁ t" is missing
    with pytest.raises(ValueError, match="its merges are not those of a SentencePiece vocabulary"):
        gguf_tokenizer_fields(variant(model=dropped), 32000)
    with pytest.raises(ValueError, match="without byte fallback"):
        gguf_tokenizer_fields(variant(model={**spec["model"], "byte_fallback": False}), 32000)


@pytest.mark.reference
def test_llama_cpp_tokenizes_a_transformers_tokenizer_json(tmp_path, tiny, vocab_dir, vocab_cases):
    """A Llama 2 tokenizer.json as transformers builds one (`LlamaConverter` with
    ``legacy=True``: Prepend + Replace, BPE with byte fallback, merges from
    `transformers.tokenization_utils_base.generate_merges` over the scored vocabulary, which
    interleaves the merges of equal-score pieces) read by `tokenizer_from_hf_dir` and written:
    llama.cpp tokenizes llama.cpp's test texts as its recorded ids and as the tokenizer.json,
    and jquant reads back the same encoder on them and on Python's pydoc topics (465k chars)."""
    from pydoc_data.topics import topics

    import tokenizers
    from tokenizers import AddedToken, decoders, normalizers
    from transformers.tokenization_utils_base import generate_merges

    from jquant.io._hf_export import write_tokenizer
    from jquant.io.tokenizer import tokenizer_from_hf_dir

    meta = jio.gguf.read_metadata(vocab_dir / "ggml-vocab-llama-spm.gguf")
    pieces, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    vocab = {t: i for i, t in enumerate(pieces)}
    merges = generate_merges(vocab, dict(zip(pieces, scores)))
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                               normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in ("<unk>", "<s>", "</s>")])  # fmt: skip
    (tmp_path / "hf").mkdir()
    write_tokenizer(tmp_path / "hf", Tokenizer(backend, bos_token_id=1, eos_token_id=2,
                                               add_bos_token=True))  # fmt: skip
    tok = tokenizer_from_hf_dir(tmp_path / "hf")
    path = _write_vocab(tmp_path, tiny, tok, "llama-spm")
    llm = _llama(path, vocab_only=True)
    back = jio.load_gguf(path).tokenizer
    for text, want in vocab_cases("llama-spm"):
        ours = tok.encode(text, add_special_tokens=False)
        assert ours == want, text
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert back.encode(text, add_special_tokens=False) == want, text
    big = "\n\n".join(topics[k] for k in sorted(topics))
    assert back.encode(big, add_special_tokens=False) == tok.encode(big, add_special_tokens=False)
