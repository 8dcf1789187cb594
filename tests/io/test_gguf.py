"""GGUF import: names, shapes, Q/K un-permutation, config, errors; the real SmolLM2 file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from jquant import io as jio
from jquant.io import gguf as jgguf

Q = gguf.GGMLQuantizationType


def test_hf_name_maps_every_llama_cpp_name():
    assert jgguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert jgguf.hf_name("output_norm.weight") == "model.norm.weight"
    assert jgguf.hf_name("output.weight") == "lm_head.weight"
    assert jgguf.hf_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert (
        jgguf.hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert jgguf.hf_name("blk.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert jgguf.hf_name("rope_freqs.weight") == "rope_freqs.weight"  # unknown: unchanged


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 8), (3, 64, 5), (1, 2, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols, tiny):
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    np.testing.assert_array_equal(jgguf.unpermute_rope_rows(tiny.permute(w, n_head), n_head), w)
    bias = w[:, 0]
    np.testing.assert_array_equal(
        jgguf.unpermute_rope_rows(tiny.permute(bias, n_head), n_head), bias
    )


def test_unpermute_rejects_odd_head_size():
    with pytest.raises(ValueError, match="un-permute"):
        jgguf.unpermute_rope_rows(np.zeros((6, 2), np.float32), 2)


def test_tiny_llama_round_trips_exactly(tiny_gguf):
    path, expected = tiny_gguf
    ckpt = jio.load_gguf(path)
    assert ckpt.source == str(path)
    assert set(ckpt.tensors) == set(expected)
    for name, want in expected.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_tiny_config(tiny_gguf, tiny):
    config = jio.load_gguf(tiny_gguf[0]).config
    assert set(config) == set(jio.CONFIG_KEYS)
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == tiny.shape["hidden"]
    assert config["intermediate_size"] == tiny.shape["ffn"]
    assert config["num_hidden_layers"] == tiny.shape["layers"]
    assert config["num_attention_heads"] == tiny.shape["heads"]
    assert config["num_key_value_heads"] == tiny.shape["kv_heads"]
    assert config["head_dim"] == tiny.shape["head_dim"]
    assert config["rms_norm_eps"] == 1e-5  # float32 in the file, shortest decimal here
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is False
    assert config["attention_bias"] is False
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_tied_embeddings_when_no_output_tensor(tmp_path, tiny):
    tensors = tiny.tensors(tied=True)
    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "t.gguf", tensors))
    assert ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensors


def test_quantized_tensors_dequantize_and_unpermute(tmp_path, tiny):
    tensors = tiny.tensors(tied=True, seed=1)
    quant = {
        "model.embed_tokens.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_1,
        "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.down_proj.weight": Q.Q4_1,
    }
    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "q.gguf", tensors, quantize=quant))
    for name, qtype in quant.items():
        # Blocks run along rows, so quantizing permuted rows == permuting quantized rows.
        want = gguf.quants.dequantize(gguf.quants.quantize(tensors[name], qtype), qtype)
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)
        assert not np.array_equal(ckpt.tensors[name], tensors[name])


def test_qwen2_biases_and_no_permutation(tmp_path, tiny):
    tensors = tiny.tensors(arch="qwen2", tied=False, seed=2)
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "q2.gguf", tensors, arch="qwen2"))
    assert ckpt.config["model_type"] == "qwen2" and ckpt.config["attention_bias"] is True
    for name, want in tensors.items():
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)


def test_linear_rope_scaling(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "r.gguf", tiny.tensors(), extra={"rope.scale_linear": 4.0})
    assert jio.load_gguf(path).config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        jio.load_gguf(path)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_file(tiny_gguf, tmp_path, fraction):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ValueError, match="cut.gguf.*(truncated|not a readable GGUF)"):
        jio.load_gguf(cut)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        jio.load_gguf(tmp_path / "nope.gguf")


def test_unsupported_architecture(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "f.gguf", tiny.tensors(), arch="falcon")
    with pytest.raises(ValueError, match="architecture 'falcon' is not supported"):
        jio.load_gguf(path)


def test_unsupported_architecture_is_rejected_before_the_full_parse(tmp_path, tiny, monkeypatch):
    path = tiny.write_gguf(tmp_path / "f.gguf", tiny.tensors(), arch="falcon")

    def slow_reader(*args, **kwargs):
        raise AssertionError("the whole file was parsed before the architecture check")

    monkeypatch.setattr(jgguf._gguf_reader, "read_gguf", slow_reader)
    with pytest.raises(ValueError, match="f.gguf: architecture 'falcon' is not supported"):
        jio.load_gguf(path)


def _write_header_only(path, kv: dict, *, arch_last: bool, endianess=gguf.GGUFEndian.LITTLE):
    """A GGUF with metadata only; `arch_last` moves general.architecture behind the rest."""
    w = gguf.GGUFWriter(str(path), arch="qwen2", endianess=endianess)
    w.add_uint32("x.u32", 7)
    w.add_float64("x.f64", 1.5)
    w.add_bool("x.bool", True)
    w.add_string("x.str", "héllo")
    w.add_array("x.strings", ["a", "bc", ""])
    w.add_array("x.ints", [1, 2, 3])
    w.add_array("x.nested", [[1, 2], [3]])
    for key, value in kv.items():
        w.add_string(key, value)
    if arch_last:
        data = w.kv_data[0]
        data["general.architecture"] = data.pop("general.architecture")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch_last", [False, True])
@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_read_architecture_from_the_header(tmp_path, arch_last, endianess):
    path = _write_header_only(tmp_path / "h.gguf", {"general.name": "n"}, arch_last=arch_last,
                              endianess=endianess)  # fmt: skip
    assert jgguf.read_architecture(path) == "qwen2"


def test_read_architecture_of_a_non_gguf(tmp_path, tiny_gguf):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    assert jgguf.read_architecture(junk) is None
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf[0].read_bytes()[:30])
    assert jgguf.read_architecture(cut) is None
    assert jgguf.read_architecture(tiny_gguf[0]) == "llama"


def test_missing_tensor_is_named(tmp_path, tiny):
    path = tiny.write_gguf(
        tmp_path / "m.gguf", tiny.tensors(), skip=("model.layers.1.mlp.up_proj.weight",)
    )
    with pytest.raises(ValueError, match=r"missing, e.g. blk\.1\.ffn_up\.weight"):
        jio.load_gguf(path)


def test_shape_mismatch_vs_config(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "s.gguf", tiny.tensors(), ffn=128)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_\w+\.weight has shape .* config implies"):
        jio.load_gguf(path)


def test_read_metadata(tiny_gguf, tiny):
    meta = jgguf.read_metadata(tiny_gguf[0])
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == tiny.shape["layers"]


# --- the embedded SmolLM2-135M-Instruct ---------------------------------------------------------


@pytest.mark.slow
def test_smollm_config(smollm):
    c = smollm.config
    assert c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 30
    assert c["hidden_size"] == 576
    assert c["num_attention_heads"] == 9 and c["num_key_value_heads"] == 3
    assert c["head_dim"] == 64
    assert c["intermediate_size"] == 1536
    assert c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 100000.0 and c["rope_scaling"] is None
    assert c["rms_norm_eps"] == 1e-5
    assert c["max_position_embeddings"] == 8192
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


@pytest.mark.slow
def test_smollm_tensors(smollm):
    t = smollm.tensors
    assert len(t) == 2 + 30 * 9 and "lm_head.weight" not in t
    assert smollm.num_parameters == 134_515_008
    assert t["model.embed_tokens.weight"].shape == (49152, 576)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert t["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in t.values())


@pytest.fixture(scope="module")
def transformers_gguf_model(smollm_path):
    """transformers' own GGUF loader (torch, float32) on the same file."""
    torch = pytest.importorskip("torch")
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_path.parent), gguf_file=smollm_path.name, dtype=torch.float32
    )
    return model


@pytest.mark.slow
@pytest.mark.reference
def test_smollm_tensors_equal_transformers(smollm, transformers_gguf_model):
    state = {k: v.detach().numpy() for k, v in transformers_gguf_model.state_dict().items()}
    assert transformers_gguf_model.config.tie_word_embeddings is True
    state.pop("lm_head.weight")  # tied: the same storage as the embedding
    assert set(state) == set(smollm.tensors)
    worst = max(float(np.max(np.abs(state[k] - smollm.tensors[k]))) for k in state)
    assert worst == 0.0


@pytest.mark.slow
@pytest.mark.reference
def test_smollm_config_matches_transformers(smollm, transformers_gguf_model):
    theirs = transformers_gguf_model.config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert smollm.config[key] == getattr(theirs, key), key
    assert smollm.config["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert smollm.config["rope_theta"] == theirs.rope_parameters["rope_theta"]
