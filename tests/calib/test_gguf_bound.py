"""A model quantized from a GGUF file by a shipped recipe of 4 bits or fewer is no larger than
the file's tensors, counted by the `gguf` package's reader; the table keeps the file's format
where the recipe's would be larger, and a format jquant has no equal of is kept as the
recipe says, with a warning."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant.calib._gguf_bound import within_gguf
from jquant.calib.stream import quantize_to_disk
from jquant.io.packed import read_packed
from jquant.recipe import Recipe

# The shipped recipes storing the matrices in 4.5 bits a weight or fewer (scales included),
# so no more than a Q4_0 file's; gguf-q4_1 (5 bits) is checked against the Q4_1 file it
# reproduces, SmolLM2's. All but two are slow: each is a quantization of its own.
FAST = ("w4a16-rtn-g128", "gguf-q4_0")
LOW_BIT = FAST + ("w4a16-rtn-g64", "w4a16-gptq-g128", "w4a16-gptq-g64", "w4a16-awq-g128",
                  "w4a16-uint4-g64", "w4a16-hqq-g64", "w4a16-gptq-uint4-g64",
                  "w4a16-awq-gptq-uint4-g64", "w4a16-awq-gptq-uint4-g64-emb8", "nf4",
                  "w4a16-mxfp4", "w4a16-nvfp4", "w3a16-gptq-g64")  # fmt: skip
VOCAB, WIDTH, FFN, HEADS, KV_HEADS = 32768, 64, 128, 2, 1
Q = gguf.GGMLQuantizationType
Q4_0, Q4_1, Q8_0 = Q.Q4_0, Q.Q4_1, Q.Q8_0


def tensor_bytes(path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def write_wide_vocab(path, table_type, *, table_bytes=None):
    """A one-layer tied llama GGUF with a 32768-token table (the table the bulk of it):
    matrices Q4_0, the table ``table_type`` (``table_bytes`` raw bytes if given), norms F32."""
    rng = np.random.default_rng(0)
    head_dim = WIDTH // HEADS
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(1)
    w.add_vocab_size(VOCAB)
    w.add_context_length(256)
    w.add_embedding_length(WIDTH)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    shapes = {"attn_q": (WIDTH, WIDTH), "attn_k": (head_dim * KV_HEADS, WIDTH),
              "attn_v": (head_dim * KV_HEADS, WIDTH), "attn_output": (WIDTH, WIDTH),
              "ffn_gate": (FFN, WIDTH), "ffn_up": (FFN, WIDTH), "ffn_down": (WIDTH, FFN)}
    table = rng.normal(0, 0.02, (VOCAB, WIDTH)).astype(np.float32)
    if table_bytes is None:
        w.add_tensor("token_embd.weight", gguf.quants.quantize(table, table_type),
                     raw_dtype=table_type)  # fmt: skip
    else:
        w.add_tensor("token_embd.weight", rng.integers(0, 255, (VOCAB, table_bytes), np.uint8),
                     raw_dtype=table_type)  # fmt: skip
    for name, shape in shapes.items():
        value = rng.normal(0, 0.05, shape).astype(np.float32)
        w.add_tensor(f"blk.0.{name}.weight", gguf.quants.quantize(value, Q4_0), raw_dtype=Q4_0)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(WIDTH, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def q8_table(tmp_path_factory):
    return write_wide_vocab(tmp_path_factory.mktemp("src") / "q8.gguf", Q8_0)


@pytest.mark.parametrize("recipe", [r if r in FAST else pytest.param(r, marks=pytest.mark.slow)
                                    for r in LOW_BIT])  # fmt: skip
def test_no_larger_than_the_gguf(q8_table, recipe, tmp_path):
    tokens = np.random.RandomState(0).randint(0, VOCAB, (2, 32))
    _, report = quantize_to_disk(q8_table, recipe, tmp_path / "q", tokens=tokens,
                                 progress=False)  # fmt: skip
    assert report["weight_bytes"] <= tensor_bytes(q8_table)


@pytest.mark.parametrize("table_type, qtype", [(Q4_0, "int4"), (Q4_1, "uint4")])
def test_a_smaller_table_keeps_the_files_format(table_type, qtype, tmp_path):
    """A 4-bit table is half the INT8 table the recipe asks for: it stays in the file's
    format, with the values `gguf`'s own dequantization gives (Q4_0 as the file's blocks,
    bit for bit; Q4_1 with its zero point rounded to float16)."""
    source = write_wide_vocab(tmp_path / "q4.gguf", table_type)
    out, report = quantize_to_disk(source, "w4a16-rtn-g128", tmp_path / "q", progress=False)
    assert report["weight_bytes"] <= tensor_bytes(source)
    arrays, _, _ = read_packed(out)
    assert "lm_head/kernel" not in arrays  # the tied head still is the table
    table = arrays["embed_tokens/embedding"]
    assert (table.qtype, table.group_size, table.axis) == (qtype, 32, -1)
    record = next(t for t in gguf.GGUFReader(source).tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(record.data, table_type)
    got = np.asarray(table.dequantize(np.float32))
    if table_type == Q4_0:
        np.testing.assert_array_equal(got, expected)
    else:
        step = np.ptp(expected.reshape(-1, 32), axis=1) / 15
        err = np.abs(got - expected).reshape(-1, 32).max(axis=1)
        assert np.all(err <= 0.01 * step)


def test_a_smaller_table_without_an_equal_format_warns_and_keeps_the_recipe(tmp_path):
    """A table type jquant has no equal of (IQ4_NL: 18 bytes per 32 weights) is stored as the
    recipe says, with a warning naming both sizes: refusing would stop every Q4_K_M file."""
    source = write_wide_vocab(tmp_path / "iq4.gguf", Q.IQ4_NL, table_bytes=WIDTH // 32 * 18)
    recipe = Recipe.load("w4a16-rtn-g128")
    leaves = {"embed_tokens/embedding": jax.ShapeDtypeStruct((VOCAB, WIDTH), jnp.float32)}
    with pytest.warns(UserWarning, match=r"embed_tokens/embedding in 2\.16 MB, more than the "
                      r"file's IQ4_NL token_embd\.weight \(1\.18 MB\).*smaller rule"):
        got, kept = within_gguf(recipe, str(source), leaves)
    assert got is recipe and kept == {}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["w4a16-uint4-g64", "nf4", "gguf-q4_1"])
def test_smollm2_no_larger_than_its_gguf(recipe, tmp_path):
    source = jquant.io.model_path("smollm2-135m")
    _, report = quantize_to_disk("smollm2-135m", recipe, tmp_path / "q", progress=False)
    assert report["weight_bytes"] <= tensor_bytes(source)
