"""`load_gguf(packed=True)`: GGUF quantized matrices as QArrays, against gguf's own dequantizer.

The reference is `gguf.quants.dequantize` (llama.cpp's gguf package, 0.19): each mapped ggml
type's QArray must dequantize to exactly its values (Q8_0, Q4_0, Q5_0, Q3_K, Q6_K) or within
the stated float32 bound (the types with a min: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K). Blocks come from
`gguf.quants.quantize` where gguf has a quantizer, otherwise they are random bytes with modest
float16 scales. A tiny model loaded packed must compute the float load's logits.
"""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import io as jio
from jquant.io import _gguf_packed
from jquant.models import forward
from jquant.models.load import load
from jquant.qarray import QArray

Q = gguf.GGMLQuantizationType
EXACT = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q3_K, Q.Q6_K]
AFFINE = [Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q4_K, Q.Q5_K]
QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q4_1, Q.Q5_1]  # gguf.quants.quantize has these
# Byte offsets of each block's float16 scales (ggml-common.h): d, and dmin / m where present.
HALF_FIELDS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
               Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
               Q.Q6_K: (208,)}  # fmt: skip
# (float32 bits/weight of the QArray, of the file) per type: what the module docstring states.
BITS = {Q.Q8_0: (8.5, 8.5), Q.Q4_0: (4.5, 4.5), Q.Q5_0: (5.5, 5.5), Q.Q4_1: (6.0, 5.0),
        Q.Q5_1: (7.0, 6.0), Q.Q6_K: (6.5625, 6.5625), Q.Q3_K: (3.5625, 3.4375),
        Q.Q4_K: (6.0, 4.5), Q.Q5_K: (7.0, 5.5), Q.Q2_K: (6.0, 2.625)}  # fmt: skip
# The affine types' bound: |QArray - gguf| <= this many float32 epsilons of the tensor's absmax.
AFFINE_EPS = 4


def random_raw(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Raw (rows, bytes per row) data of `qtype`: gguf's quantization of random weights, or
    random bytes whose float16 fields are modest scales of either sign."""
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for at in HALF_FIELDS[qtype]:
        d = rng.uniform(1e-3, 1e-2, len(blocks)) * rng.choice([-1, 1], len(blocks))
        blocks[:, at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def dequantized(q: QArray) -> np.ndarray:
    """The QArray's values in GGUF's row layout (rows, cols)."""
    out = np.asarray(q.dequantize(jnp.float32))
    return out if q.axis == -1 else out.T


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_exact_types_dequantize_as_gguf(qtype):
    raw = random_raw(qtype, (12, 512), np.random.default_rng(int(qtype)))
    q = _gguf_packed.qarray_from_blocks(raw, qtype, (12, 512))
    want = gguf.quants.dequantize(raw, qtype)
    assert q.shape == (512, 12) and q.axis == -2 and q.dtype == np.float32
    assert np.abs(want).max() > 0
    np.testing.assert_array_equal(dequantized(q), want)
    assert (q.bits_per_weight, 8 * raw.size / want.size) == BITS[qtype]


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda q: q.name)
def test_affine_types_dequantize_within_the_bound(qtype):
    raw = random_raw(qtype, (12, 512), np.random.default_rng(int(qtype)))
    q = _gguf_packed.qarray_from_blocks(raw, qtype, (12, 512))
    want = gguf.quants.dequantize(raw, qtype)
    got = dequantized(q)
    bound = AFFINE_EPS * np.finfo(np.float32).eps * np.abs(want).max()
    assert np.abs(got - want).max() <= bound
    assert not np.array_equal(got, want)  # the bound is needed: the rounding is not gguf's
    assert (q.bits_per_weight, 8 * raw.size / want.size) == BITS[qtype]


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q2_K], ids=lambda q: q.name)
def test_a_zero_scale_block_is_its_constant_exactly(qtype):
    """d == 0 (Q4_1/Q5_1) or a super-block d == 0 (K-quants): every value is the min term."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = random_raw(qtype, (4, 256), np.random.default_rng(1)).reshape(-1, size)
    d_at = HALF_FIELDS[qtype][0]
    blocks[::3, d_at : d_at + 2] = 0  # every third block
    raw = blocks.reshape(4, -1)
    got = dequantized(_gguf_packed.qarray_from_blocks(raw, qtype, (4, 256)))
    want = gguf.quants.dequantize(raw, qtype)
    zero = np.repeat(np.arange(len(blocks)) % 3 == 0, block).reshape(4, 256)
    assert np.abs(want[zero]).max() > 0  # the constant is not 0
    np.testing.assert_array_equal(got[zero], want[zero])


def test_embedding_and_row_permutation():
    raw = random_raw(Q.Q4_0, (8, 64), np.random.default_rng(2))
    want = gguf.quants.dequantize(raw, Q.Q4_0)
    emb = _gguf_packed.qarray_from_blocks(raw, Q.Q4_0, (8, 64), embedding=True)
    assert emb.shape == (8, 64) and emb.axis == -1
    np.testing.assert_array_equal(dequantized(emb), want)
    perm = _gguf_packed.qarray_from_blocks(raw, Q.Q4_0, (8, 64), rows=lambda a: a[::-1])
    np.testing.assert_array_equal(dequantized(perm), want[::-1])


def test_bad_blocks_name_the_tensor():
    raw = random_raw(Q.Q8_0, (4, 64), np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"blk\.0\.x: 271 bytes .* Q8_0 .* takes 272"):
        _gguf_packed.qarray_from_blocks(raw.reshape(-1)[:-1], Q.Q8_0, (4, 64), name="blk.0.x")
    with pytest.raises(ValueError, match=r"blk\.0\.x: ggml type IQ4_NL cannot be kept packed"):
        _gguf_packed.qarray_from_blocks(raw, Q.IQ4_NL, (4, 64), name="blk.0.x")
    with pytest.raises(ValueError, match=r"blk\.0\.x: rows of 48 elements"):
        _gguf_packed.qarray_from_blocks(raw, Q.Q8_0, (4, 48), name="blk.0.x")


# --- whole files --------------------------------------------------------------------------------


def _quantized_file(tiny, path, qtype, *, tied):
    tensors = tiny.tensors(tied=tied)
    matrices = {n: qtype for n, v in tensors.items() if v.ndim == 2}
    tiny.write_gguf(path, tensors, quantize=matrices)
    return matrices


@pytest.mark.parametrize("qtype,tied", [(Q.Q4_1, True), (Q.Q8_0, False)],
                         ids=["Q4_1-tied", "Q8_0-untied"])  # fmt: skip
def test_tiny_model_packed_computes_the_float_logits(tmp_path, tiny, qtype, tied):
    path = tmp_path / "q.gguf"
    matrices = _quantized_file(tiny, path, qtype, tied=tied)
    flt = jio.load_gguf(path, tokenizer=False)
    pk = jio.load_gguf(path, tokenizer=False, packed=True)
    assert set(pk.tensors) == set(flt.tensors) and pk.config == flt.config
    for name in flt.tensors:
        value = pk.tensors[name]
        if name not in matrices:
            assert isinstance(value, np.ndarray)
            np.testing.assert_array_equal(value, flt.tensors[name])
            continue
        assert isinstance(value, QArray), name
        # The float load is gguf's dequantization with Q/K rows un-permuted: the QArray's
        # rows must have been moved the same way.
        got, want = dequantized(value), flt.tensors[name]
        if qtype in EXACT:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            bound = AFFINE_EPS * np.finfo(np.float32).eps * np.abs(want).max()
            assert np.abs(got - want).max() <= bound, name
        embedding = name == "model.embed_tokens.weight"
        assert value.axis == (-1 if embedding else -2), name
    tokens = jax.random.randint(jax.random.key(0), (2, 11), 0, flt.config["vocab_size"])
    outs = []
    for ckpt in (flt, pk):
        model, params, _ = load(ckpt, dtype=jnp.float32)
        outs.append(np.asarray(forward(model, params, tokens)[0]))
    assert np.abs(outs[1] - outs[0]).max() <= 1e-4 * np.abs(outs[0]).max()
    layer = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    assert sum(isinstance(x, QArray) for x in layer) == len(matrices)


def _k_quant_file(path, qtype: Q) -> None:
    """A one-layer llama GGUF of hidden 256 (the K-quant super-block), tied, every matrix in
    `qtype` as random blocks (`random_raw`), norms float32."""
    hidden, heads, kv_heads, vocab = 256, 4, 2, 300
    rng = np.random.default_rng(int(qtype))
    w = gguf.GGUFWriter(str(path), arch="llama")
    settings = [(w.add_block_count, 1), (w.add_context_length, 64),
                (w.add_embedding_length, hidden), (w.add_feed_forward_length, 256),
                (w.add_head_count, heads), (w.add_head_count_kv, kv_heads),
                (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                (w.add_rope_dimension_count, hidden // heads),
                (w.add_vocab_size, vocab)]  # fmt: skip
    for add, value in settings:
        add(value)
    shapes = {"token_embd": (vocab, hidden), "blk.0.attn_q": (hidden, hidden),
              "blk.0.attn_k": (128, hidden), "blk.0.attn_v": (128, hidden),
              "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (256, hidden),
              "blk.0.ffn_up": (256, hidden), "blk.0.ffn_down": (hidden, 256)}  # fmt: skip
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", random_raw(qtype, shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q4_K], ids=lambda q: q.name)
def test_k_quant_model_packed_computes_the_float_logits(tmp_path, qtype):
    """Two-level (Q6_K) and affine (Q4_K) scales, Q/K rows un-permuted, in a model."""
    path = tmp_path / "k.gguf"
    _k_quant_file(path, qtype)
    flt = jio.load_gguf(path, tokenizer=False)
    pk = jio.load_gguf(path, tokenizer=False, packed=True)
    for name, value in pk.tensors.items():
        if isinstance(value, QArray):
            got, want = dequantized(value), flt.tensors[name]
            bound = 0 if qtype in EXACT else AFFINE_EPS * np.finfo(np.float32).eps
            assert np.abs(got - want).max() <= bound * np.abs(want).max(), name
    assert sum(isinstance(v, QArray) for v in pk.tensors.values()) == 8
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 300)
    outs = []
    for ckpt in (flt, pk):
        model, params, _ = load(ckpt, dtype=jnp.float32)
        outs.append(np.asarray(forward(model, params, tokens)[0]))
    assert np.isfinite(outs[0]).all()
    assert np.abs(outs[1] - outs[0]).max() <= 1e-4 * np.abs(outs[0]).max()


def test_unmapped_types_load_as_float(tmp_path, tiny):
    """An MXFP4 matrix (a type not mapped) is dequantized as without `packed`; the rest stays
    packed."""
    path = tmp_path / "q.gguf"
    tensors = tiny.tensors(tied=True)
    quantize = {n: Q.Q8_0 for n, v in tensors.items() if v.ndim == 2}
    quantize["model.layers.1.mlp.up_proj.weight"] = Q.MXFP4
    tiny.write_gguf(path, tensors, quantize=quantize)
    flt = jio.load_gguf(path, tokenizer=False)
    pk = jio.load_gguf(path, tokenizer=False, packed=True)
    up = pk.tensors["model.layers.1.mlp.up_proj.weight"]
    assert isinstance(up, np.ndarray)
    np.testing.assert_array_equal(up, flt.tensors["model.layers.1.mlp.up_proj.weight"])
    assert isinstance(pk.tensors["model.layers.1.mlp.down_proj.weight"], QArray)


def test_truncated_file_names_the_tensor(tmp_path, tiny):
    path = tmp_path / "q.gguf"
    _quantized_file(tiny, path, Q.Q4_1, tied=True)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"truncated: tensor \S+ ends past the end"):
        jio.load_gguf(path, tokenizer=False, packed=True)


def test_packed_is_not_lazy(tmp_path, tiny):
    path = tmp_path / "q.gguf"
    _quantized_file(tiny, path, Q.Q8_0, tied=True)
    with pytest.raises(ValueError, match="packed=True .* lazy=True"):
        jio.load_gguf(path, packed=True, lazy=True)


def test_load_checkpoint_passes_packed_to_gguf_only(tmp_path, tiny):
    path = tmp_path / "q.gguf"
    _quantized_file(tiny, path, Q.Q8_0, tied=True)
    ckpt = jio.load_checkpoint(path, tokenizer=False, packed=True)
    assert isinstance(ckpt.tensors["model.layers.0.mlp.up_proj.weight"], QArray)
    assert isinstance(jio.load_checkpoint(path, tokenizer=False).tensors[
        "model.layers.0.mlp.up_proj.weight"], np.ndarray)  # fmt: skip
    with pytest.raises(ValueError, match="packed=True .* this is an HF model"):
        jio.load_checkpoint(tmp_path, packed=True)


@pytest.mark.slow
def test_smollm_packed_perplexity_equals_the_float_load(smollm_path):
    """The real Q4_1 model: packed, its perplexity on 4 windows of 256 tokens of the default
    text is the float (dequantized) load's; its weights take ~6 bits instead of 32."""
    from jquant.eval import evaluate, load_corpus

    text = load_corpus("pydoc-eval")
    out = {}
    for packed in (False, True):
        model, params, tok = load(jio.load_gguf(smollm_path, packed=packed))
        out[packed] = evaluate(model, params, tok, text, seq_len=256, max_tokens=1024)
    assert out[True]["tokens"] == out[False]["tokens"] == 4 * 255
    assert out[True]["perplexity"] == pytest.approx(out[False]["perplexity"], abs=5e-4)
    assert out[False]["bits_per_weight"] == 32.0
    # Q4_1 matrices at 6 bits (float32 scale and zero point per 32), the Q8_0 embedding at 8.5,
    # float norms: 6.6 bits per weight over all weights.
    assert 6.4 < out[True]["bits_per_weight"] < 6.8
