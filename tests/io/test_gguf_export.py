"""`jquant.io.gguf_export.write_gguf`: a jquant model as a GGUF file, judged by the gguf
package's own reader and dequantizer, by jquant's importer, and by llama.cpp itself
(llama-cpp-python): codes and scales as held, tokenization and perplexity as jquant's."""

from __future__ import annotations

import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import io as jio
from jquant.arch import LlamaConfig
from jquant.io.gguf_export import write_gguf
from jquant.models import forward, params_from_hf, params_to_hf
from jquant.qarray import QArray
from jquant.recipe import Recipe
from jquant.transform import quantize
from jquant.tree import leaves

EXACT = {"int8": "Q8_0", "int4": "Q4_0", "int5": "Q5_0"}
AFFINE = {"uint4": "Q4_1", "uint5": "Q5_1"}
TYPES = {**EXACT, **AFFINE}


def _recipe(qtype: str, *, scale_dtype: str = "float16", group: int = 32, table: bool = True):
    """Every kernel (and with ``table`` the embedding, so a tied head) in ``qtype``."""
    rule = {"weight": qtype, "group_size": group, "scale_dtype": scale_dtype}
    rules = [{"pattern": "(?i)embed", **rule} if table else {"pattern": "(?i)embed", "skip": True},
             {"pattern": "kernel$", **rule}]  # fmt: skip
    return Recipe.from_dict({"name": f"{qtype}-g{group}", "rules": rules})


def _model(tmp_path, tiny, *, tied: bool = True, scale: float = 1.0):
    """The tiny model read from its GGUF; ``scale`` multiplies its N(0, 1) matrices."""
    tensors = {n: w * np.float32(scale) if w.ndim == 2 else w
               for n, w in tiny.tensors(tied=tied).items()}  # fmt: skip
    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "src.gguf", tensors))
    model, params = params_from_hf(ckpt.tensors, LlamaConfig.from_hf(ckpt.config))
    return ckpt, model, params


def _affine_bound(q: QArray) -> np.ndarray:
    """Half a float16 ulp of ``|z·d|`` per group (``m``'s rounding), repeated per element,
    plus float32 rounding of the dequantization itself."""
    zd = np.abs(np.asarray(q.zero_point, np.float32) * np.asarray(q.scale, np.float32))
    per_group = np.maximum(zd * 2.0**-11, 2.0**-25) + 4 * np.finfo(np.float32).eps * (zd + 16)
    return np.repeat(per_group, q.group_size, axis=-1)


@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_load_gguf(tmp_path, tiny, qtype, tied):
    """jquant -> GGUF -> `load_gguf(packed=True)`: the same codes and scales; zero points
    of the affine types within the float16 rounding of ``m = −z·d``."""
    ckpt, _, params = _model(tmp_path, tiny, tied=tied)
    qparams = quantize(params, _recipe(qtype))
    config = {**ckpt.config, "tie_word_embeddings": tied}
    path = write_gguf(qparams, config, ckpt.tokenizer, tmp_path / "out.gguf")
    back = jio.load_gguf(path, packed=True)
    assert back.config == config
    written = params_to_hf(qparams)
    assert set(back.tensors) == set(written)
    for name, q in written.items():
        got = back.tensors[name]
        if not isinstance(q, QArray):
            np.testing.assert_array_equal(got, np.asarray(q, np.float32))
            continue
        assert (got.qtype, got.group_size, got.axis, got.shape) == (q.qtype, 32, q.axis, q.shape)
        np.testing.assert_array_equal(np.asarray(got.codes()), np.asarray(q.codes()))
        np.testing.assert_array_equal(np.asarray(got.scale),
                                      np.asarray(q.scale).astype(np.float32))  # fmt: skip
        mine, theirs = np.asarray(q.dequantize_stored()), np.asarray(got.dequantize_stored())
        if qtype in EXACT:
            assert got.zero_point is None
            np.testing.assert_array_equal(theirs, mine)
        else:
            assert np.all(np.abs(theirs - mine) <= _affine_bound(q)), name


def _gguf_tensors(path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    """The gguf package's own reading: name -> (type, dequantized (rows, cols) float32)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)
                     .reshape(tuple(int(n) for n in reversed(t.shape.tolist()))))
            for t in reader.tensors}  # fmt: skip


@pytest.mark.parametrize("qtype", list(TYPES))
def test_gguf_dequantize_equals_qarray(tmp_path, tiny, qtype):
    """`gguf.quants.dequantize` of every written block is the QArray's dequantize(), rows in
    llama.cpp's rotary order (the test's own `llama_cpp_permute`)."""
    ckpt, _, params = _model(tmp_path, tiny, tied=False)
    qparams = quantize(params, _recipe(qtype))
    write_gguf(qparams, ckpt.config, None, tmp_path / "out.gguf")
    tensors = _gguf_tensors(tmp_path / "out.gguf")
    heads = {".q_proj.": tiny.shape["heads"], ".k_proj.": tiny.shape["kv_heads"]}
    seen = 0
    for name, q in params_to_hf(qparams).items():
        if not isinstance(q, QArray):
            continue
        ggml, values = tensors[jio.gguf.gguf_name(name)]
        assert ggml.name == TYPES[qtype]
        want, bound = np.asarray(q.dequantize_stored(jnp.float32)), _affine_bound(q) \
            if qtype in AFFINE else 0.0  # fmt: skip
        n_head = next((n for k, n in heads.items() if k in name), None)
        if n_head is not None:
            want = tiny.permute(want, n_head)
            bound = tiny.permute(bound, n_head) if qtype in AFFINE else 0.0
        if qtype in EXACT:
            np.testing.assert_array_equal(values, want)
        else:
            assert np.all(np.abs(values - want) <= bound), name
        seen += 1
    assert seen == 2 * 7 + 2  # every kernel, the embedding and the untied head


def test_float_tensors_keep_their_dtype(tmp_path, tiny):
    ckpt, _, params = _model(tmp_path, tiny, tied=False)
    params = dict(jio_leaves(params))
    params["layers/0/mlp/up_proj/kernel"] = params["layers/0/mlp/up_proj/kernel"].astype(
        jnp.bfloat16)  # fmt: skip
    params["layers/0/mlp/down_proj/kernel"] = params["layers/0/mlp/down_proj/kernel"].astype(
        jnp.float16)  # fmt: skip
    write_gguf(params, ckpt.config, None, tmp_path / "out.gguf")
    tensors = _gguf_tensors(tmp_path / "out.gguf")
    for name, ggml in (("blk.0.ffn_up.weight", "BF16"), ("blk.0.ffn_down.weight", "F16"),
                       ("blk.0.attn_q.weight", "F32"), ("blk.0.attn_norm.weight", "F32")):
        assert tensors[name][0].name == ggml, name
    up = np.asarray(params["layers/0/mlp/up_proj/kernel"], np.float32).T
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"][1], up)


def jio_leaves(params):
    from jquant.tree import leaves

    return leaves(params)


@pytest.mark.parametrize("qtype, scale_dtype, group, why", [
    ("int4", "float16", 64, "int4 g64 float16 scales"),
    ("int4", "bfloat16", 32, "int4 g32 bfloat16 scales"),
    ("int6", "float16", 32, "int6 g32 float16 scales"),
])  # fmt: skip
def test_refusal_lists_every_tensor_and_writes_nothing(tmp_path, tiny, qtype, scale_dtype, group,
                                                       why):  # fmt: skip
    ckpt, _, params = _model(tmp_path, tiny)
    qparams = quantize(params, _recipe(qtype, scale_dtype=scale_dtype, group=group, table=False))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"write_gguf: 14 tensor\(s\) have no GGUF type") as e:
        write_gguf(qparams, ckpt.config, ckpt.tokenizer, tmp_path / "out" / "m.gguf")
    message = str(e.value)
    assert message.count(f"{why}: layers/") == 1
    for i in range(2):
        for proj in ("q", "k", "v", "o"):
            assert f"layers/{i}/self_attn/{proj}_proj/kernel" in message
        for proj in ("gate", "up", "down"):
            assert f"layers/{i}/mlp/{proj}_proj/kernel" in message
    assert list((tmp_path / "out").iterdir()) == []


def test_shipped_w4a16_recipe_is_refused(tmp_path, tiny):
    ckpt, _, params = _model(tmp_path, tiny)
    with pytest.raises(ValueError, match="int4 g64 bfloat16 scales: layers/0/"):
        write_gguf(quantize(params, "w4a16-rtn-g64"), ckpt.config, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_act_order_kernel_is_refused(tmp_path, tiny):
    """A kernel with an input permutation (an act-order GPTQ import) has no GGUF type: its
    stored codes are not in the inputs' order."""
    import dataclasses

    ckpt, _, params = _model(tmp_path, tiny)
    qparams = dict(leaves(quantize(params, _recipe("int4", table=False))))
    path = "layers/0/mlp/down_proj/kernel"
    q = qparams[path]
    perm = np.random.default_rng(0).permutation(q.k).astype(np.int32)
    qparams[path] = dataclasses.replace(q, perm=jnp.asarray(perm))
    with pytest.raises(ValueError, match=r"write_gguf: 1 tensor\(s\) have no GGUF type .*"
                       r"int4 g32 float16 scales with an act-order input permutation: "
                       + path):  # fmt: skip
        write_gguf(qparams, ckpt.config, ckpt.tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("change, message", [
    ({"model_type": "phi3"}, "model_type 'phi3' (GGUF export writes llama, mistral, qwen2, "
                             "qwen3, gemma, gemma2, gemma3_text, mixtral, qwen2_moe, qwen3_moe, "
                             "olmoe)"),
    ({"sliding_window": 8}, "sliding_window=8"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
])  # fmt: skip
def test_what_the_llama_architecture_cannot_hold_is_refused(tmp_path, tiny, change, message):
    ckpt, _, params = _model(tmp_path, tiny)
    with pytest.raises(ValueError, match=f"write_gguf: the model has {message}".replace(
            "(", r"\(").replace(")", r"\)")):  # fmt: skip
        write_gguf(params, {**ckpt.config, **change}, None, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_write_is_atomic(tmp_path, tiny, monkeypatch):
    ckpt, _, params = _model(tmp_path, tiny)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"old")
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        write_gguf(params, ckpt.config, None, out / "m.gguf")

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", dies)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(params, ckpt.config, None, out / "m.gguf", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["m.gguf"]
    assert (out / "m.gguf").read_bytes() == b"old"
    monkeypatch.undo()
    write_gguf(params, ckpt.config, None, out / "m.gguf", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["m.gguf"]
    assert jio.load_gguf(out / "m.gguf").config == ckpt.config


def test_tokenizer_metadata_round_trips(tmp_path, tiny):
    """The tokenizer fields the tiny file was written with come back as they were, and
    jquant's tokenizer of the export encodes as the source's."""
    ckpt, _, params = _model(tmp_path, tiny)
    write_gguf(params, ckpt.config, ckpt.tokenizer, tmp_path / "m.gguf")
    src = jio.gguf.read_metadata(tmp_path / "src.gguf")
    meta = jio.gguf.read_metadata(tmp_path / "m.gguf")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):  # fmt: skip
        assert meta[key] == src[key], key
    assert meta["tokenizer.ggml.pre"] == "gpt-2"  # what jquant's tokenizer of "smollm" splits by
    tok = jio.load_gguf(tmp_path / "m.gguf").tokenizer
    text = "hello world <|im_start|>user\nworld hello<|im_end|>"
    assert tok.encode(text) == ckpt.tokenizer.encode(text)


def test_wordpiece_tokenizer_is_refused():
    import tokenizers

    from jquant.io._gguf_tokenizer_export import gguf_tokenizer_fields
    from jquant.io.tokenizer import Tokenizer

    backend = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1},
                                                               unk_token="[UNK]"))  # fmt: skip
    with pytest.raises(ValueError, match="a WordPiece model with a None decoder; GGUF export "
                       "writes byte-level BPE and SentencePiece BPE tokenizers only"):  # fmt: skip
        gguf_tokenizer_fields(Tokenizer(backend, bos_token_id=None, eos_token_id=None), 2)


# ---- llama.cpp ------------------------------------------------------------------------


def _llama(path, n_ctx: int):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                           n_threads=2, verbose=False, seed=0)  # fmt: skip


def _llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], np.float32)


def _nll(logits: np.ndarray, tokens: list[int]) -> float:
    """Mean next-token cross-entropy (NumPy, float64)."""
    x = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float(np.mean(lse - x[np.arange(len(x)), tokens[1:]]))


def _mixed_recipe():
    """One GGUF type per kind of tensor, as `jquant allocate --gguf` mixes them."""
    rule = {"group_size": 32, "scale_dtype": "float16"}
    rules = [{"pattern": "(?i)embed", "weight": "int8", **rule},
             {"pattern": "self_attn/[qk]_proj", "weight": "uint5", **rule},
             {"pattern": "self_attn", "weight": "int4", **rule},
             {"pattern": "down_proj", "weight": "int5", **rule},
             {"pattern": "kernel$", "weight": "uint4", **rule}]  # fmt: skip
    return Recipe.from_dict({"name": "mixed", "rules": rules})


@pytest.mark.reference
@pytest.mark.parametrize("qtype", [*TYPES, "float", "mixed"])
def test_llama_cpp_runs_the_export_as_jquant(tmp_path, tiny, qtype):
    """llama.cpp loads the file, tokenizes as jquant does, and its perplexity on a window is
    jquant's (same quantized weights) within 0.5%. The matrices are N(0, 0.1²): with N(0, 1)
    the random model's logits reach the thousands and its perplexity 10⁸, where llama.cpp's
    8-bit activations (its quantized matmuls quantize the input to Q8_0/Q8_1 blocks) move it
    by percents."""
    ckpt, model, params = _model(tmp_path, tiny, scale=0.1)
    if qtype != "float":
        recipe = _mixed_recipe() if qtype == "mixed" else _recipe(qtype)
        model, params = quantize_model(model, params, recipe)
    # A head quantized apart from its tied embedding unties the model (the mixed recipe).
    config = {**ckpt.config, "tie_word_embeddings": model.config.tie_word_embeddings}
    path = write_gguf(params, config, ckpt.tokenizer, tmp_path / "m.gguf")
    if qtype == "mixed":  # five ggml types in one file
        types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2}
        assert types == {"Q8_0", "Q5_1", "Q4_0", "Q5_0", "Q4_1"}, types
    llm = _llama(path, 64)
    text = "hello world, hello <|im_start|>user\nworld hello<|im_end|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ckpt.tokenizer.encode(
        text, add_special_tokens=False)  # fmt: skip
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(3, ckpt.config["vocab_size"], 64)]
    ours = np.asarray(forward(model, params, jnp.asarray([tokens]))[0][0], np.float32)
    theirs = _llama_logits(llm, tokens)
    ppl_ours, ppl_theirs = math.exp(_nll(ours, tokens)), math.exp(_nll(theirs, tokens))
    assert ppl_theirs == pytest.approx(ppl_ours, rel=5e-3)
    if qtype == "float":  # no activation quantization in llama.cpp's F32 matmuls (its KV
        # cache is float16)
        np.testing.assert_allclose(theirs, ours, atol=2e-3 * np.abs(ours).max())


def quantize_model(model, params, recipe):
    from jquant.calib import quantize_loaded

    return quantize_loaded(model, params, recipe)


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("recipe", ["gguf-q4_0", "gguf-q8_0"])
def test_llama_cpp_runs_smollm2_export_as_jquant(tmp_path, smollm_path, recipe):
    """SmolLM2-135M quantized by a gguf-* recipe: llama.cpp's tokenization of the default
    text and its perplexity on four 512-token windows are jquant's (within 0.5%). (On four
    128-token windows llama.cpp's 8-bit activations moved the Q8_0 model's by 0.9%; on the
    default 32 windows of 512 by 0.07%.)"""
    from jquant.calib import quantize_loaded
    from jquant.eval import load_corpus
    from jquant.models import load

    model, params, tok, config = load(smollm_path, with_config=True)
    model, params = quantize_loaded(model, params, recipe)
    path = write_gguf(params, config, tok, tmp_path / "m.gguf")
    llm = _llama(path, 512)
    text = load_corpus("pydoc-eval")[:12000]
    ids = tok.encode(text, add_special_tokens=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    windows = [ids[i * 512:(i + 1) * 512] for i in range(4)]
    assert len(windows[-1]) == 512
    ours = np.asarray(forward(model, params, jnp.asarray(windows))[0], np.float32)
    nll_ours = np.mean([_nll(ours[i], w) for i, w in enumerate(windows)])
    nll_theirs = np.mean([_nll(_llama_logits(llm, w), w) for w in windows])
    assert math.exp(nll_theirs) == pytest.approx(math.exp(nll_ours), rel=5e-3)


@pytest.mark.slow
def test_smollm2_packed_re_export_is_the_original_bytes(tmp_path, smollm_path):
    """SmolLM2's Q4_1/Q8_0 GGUF loaded packed and written again: every tensor's type and
    bytes are the original file's (the Q4_1 min ``m`` comes back from ``z = −m/d``), read by
    the gguf package's own reader."""
    from jquant.models import load

    model, params, tok, config = load(smollm_path, with_config=True, packed=True)
    path = write_gguf(params, config, tok, tmp_path / "m.gguf")
    src = {t.name: t for t in gguf.GGUFReader(str(smollm_path)).tensors}
    out = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    assert set(out) == set(src)
    assert {t.tensor_type.name for t in src.values()} == {"Q4_1", "Q8_0", "F32"}
    for name, t in src.items():
        assert out[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(out[name].data).view(np.uint8),
                                      np.asarray(t.data).view(np.uint8), err_msg=name)


def test_q6_k_read_packed_is_written_back_byte_for_byte():
    """Random Q6_K super-blocks read by `load_gguf`'s packed reader (int6 codes, int8
    sub-scales under a float16 super-scale) are written back as the same bytes, and
    `gguf.quants.dequantize` of them is the QArray's dequantize()."""
    from jquant.io._gguf_packed import qarray_from_blocks
    from jquant.io.gguf_export import _quantized

    rng = np.random.default_rng(0)
    rows, cols = 6, 512
    raw = rng.integers(0, 256, (rows * cols // 256, 210), dtype=np.uint8)
    raw[:, 208:210] = rng.uniform(-1, 1, (len(raw), 1)).astype("<f2").view(np.uint8)
    q = qarray_from_blocks(raw, gguf.GGMLQuantizationType.Q6_K, (rows, cols))
    ggml, data = _quantized(q, "kernel", None)
    assert ggml == "Q6_K"
    np.testing.assert_array_equal(data.reshape(raw.shape), raw)
    np.testing.assert_array_equal(
        gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K).reshape(rows, cols),
        np.asarray(q.dequantize_stored()))  # fmt: skip
