"""HF directory import: safetensors (single, sharded, bf16), config variants, errors, hub ids."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jquant import io as jio
from jquant.io import hf as jhf


def hf_config_json(tiny, *, arch="llama", tied=True, **overrides) -> dict:
    """A transformers-5-style config.json for the tiny model."""
    c = tiny.config(arch=arch, tied=tied)
    raw = {k: c[k] for k in c if k not in ("rope_theta", "rope_scaling", "sliding_window")}
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    raw.pop("attention_bias")
    raw.update(hidden_act="silu", **overrides)
    return raw


def write_hf_dir(path, tiny, tensors, *, shards=1, config=None, dtype=np.float32):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or hf_config_json(tiny)))
    names = sorted(tensors)
    cast = {k: tensors[k].astype(dtype) for k in names}
    if shards == 1:
        save_file(cast, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: cast[k] for k in names[s::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip(tmp_path, tiny, shards):
    tensors = tiny.tensors(tied=True)
    ckpt = jio.load_hf_dir(write_hf_dir(tmp_path / "m", tiny, tensors, shards=shards))
    assert set(ckpt.tensors) == set(tensors)
    for name, want in tensors.items():
        assert ckpt.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)
    want_config = tiny.config(tied=True)
    assert ckpt.config == want_config
    assert ckpt.tokenizer is None


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_weights(tmp_path, tiny, dtype):
    tensors = tiny.tensors(tied=True)
    ckpt = jio.load_hf_dir(write_hf_dir(tmp_path / "m", tiny, tensors, dtype=dtype))
    name = "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(
        ckpt.tensors[name], tensors[name].astype(dtype).astype(np.float32)
    )


def test_reader_reads_every_dtype_as_saved(tmp_path):
    """jquant's own safetensors reader (header + file reads, no safe_open) against the arrays
    safetensors wrote: float32 for the checkpoint, bit-exact in the stored dtype."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5))
    arrays = {
        "bf16": values.astype(ml_dtypes.bfloat16),
        "f16": values.astype(np.float16),
        "f32": values.astype(np.float32),
        "f64": values,
        "f8": values.astype(ml_dtypes.float8_e4m3fn),
        "i32": np.arange(7, dtype=np.int32),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((2, 0), np.float32),
    }
    save_file(arrays, str(tmp_path / "x.safetensors"))
    entries = jhf._file_entries(tmp_path / "x.safetensors", multimodal=False)
    assert set(entries) == set(arrays)
    for k, v in arrays.items():
        got = entries[k].load(np.dtype(np.float32))
        assert got.dtype == np.float32 and got.shape == v.shape, k
        np.testing.assert_array_equal(got, v.astype(np.float32), err_msg=k)
        stored = entries[k].load(v.dtype)
        assert stored.dtype == v.dtype
        assert stored.tobytes() == v.tobytes(), k


def test_untied_needs_lm_head_and_tied_drops_it(tmp_path, tiny):
    untied = tiny.tensors(tied=False)
    config = hf_config_json(tiny, tied=False)
    ckpt = jio.load_hf_dir(write_hf_dir(tmp_path / "u", tiny, untied, config=config))
    assert "lm_head.weight" in ckpt.tensors
    tied = jio.load_hf_dir(write_hf_dir(tmp_path / "t", tiny, untied))  # tied config
    assert "lm_head.weight" not in tied.tensors
    missing = {k: v for k, v in untied.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="missing, e.g. lm_head.weight"):
        jio.load_hf_dir(write_hf_dir(tmp_path / "m", tiny, missing, config=config))


def test_qwen2_has_qkv_biases(tmp_path, tiny):
    tensors = tiny.tensors(arch="qwen2", tied=False)
    config = hf_config_json(tiny, arch="qwen2", tied=False)
    ckpt = jio.load_hf_dir(write_hf_dir(tmp_path / "q", tiny, tensors, config=config))
    assert ckpt.config["attention_bias"] is True
    assert "model.layers.0.self_attn.v_proj.bias" in ckpt.tensors
    assert "model.layers.0.self_attn.o_proj.bias" not in ckpt.tensors


def test_config_variants():
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    c = jhf.config_from_hf(
        dict(
            base,
            rope_theta=5e5,
            rope_scaling={
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    assert c["rope_theta"] == 5e5
    assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_scaling"]["factor"] == 8.0
    assert c["num_key_value_heads"] == 2 and c["head_dim"] == 4
    assert c["tie_word_embeddings"] is False and c["attention_bias"] is False
    v5 = jhf.config_from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 7e5}))
    assert (v5["rope_theta"], v5["rope_scaling"]) == (7e5, None)
    mistral = jhf.config_from_hf(dict(base, model_type="mistral", sliding_window=4096))
    assert mistral["sliding_window"] == 4096
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        jhf.config_from_hf(dict(base, model_type="gpt2"))
    with pytest.raises(ValueError, match="'intermediate_size' is missing"):
        jhf.config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="hidden_act='relu2' is not supported"):
        jhf.config_from_hf(dict(base, hidden_act="relu2"))
    # Qwen files carry a window they use only with use_sliding_window (from max_window_layers).
    qwen = dict(base, model_type="qwen2", num_hidden_layers=2, sliding_window=32768,
                max_window_layers=1)
    assert jhf.config_from_hf(qwen)["sliding_window"] is None
    used = jhf.config_from_hf(dict(qwen, use_sliding_window=True))
    assert used["sliding_window"] == 32768
    assert used["layer_types"][:2] == ["full_attention", "sliding_attention"]
    # An older Gemma 3 config.json: the pattern, local RoPE base and defaults it leaves out.
    gemma3 = jhf.config_from_hf(dict(base, model_type="gemma3_text", num_hidden_layers=2,
                                     sliding_window=512,
                                     sliding_window_pattern=2, rope_local_base_freq=10000.0,
                                     rope_theta=1e6))  # fmt: skip
    assert gemma3["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert (gemma3["rope_theta"], gemma3["rope_local_base_freq"]) == (1e6, 10000.0)
    assert gemma3["query_pre_attn_scalar"] == 256 and gemma3["tie_word_embeddings"] is True


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        jio.load_hf_dir(tmp_path)


def test_no_weights(tmp_path, tiny):
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(tiny)))
    with pytest.raises(ValueError, match="neither model.safetensors"):
        jio.load_hf_dir(tmp_path)


def test_missing_shard(tmp_path, tiny):
    path = write_hf_dir(tmp_path / "m", tiny, tiny.tensors(), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="lists shard model-00002-of-00002.safetensors"):
        jio.load_hf_dir(path)


def test_truncated_safetensors(tmp_path, tiny):
    path = write_hf_dir(tmp_path / "m", tiny, tiny.tensors())
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors"):
        jio.load_hf_dir(path)


def test_unexpected_tensor(tmp_path, tiny):
    tensors = dict(tiny.tensors(), **{"model.layers.0.mlp.up_proj.bias": np.zeros(96, np.float32)})
    with pytest.raises(ValueError, match="unexpected tensor.*up_proj.bias"):
        jio.load_hf_dir(write_hf_dir(tmp_path / "m", tiny, tensors))


def test_quantized_directory_of_an_unknown_method_is_named(tmp_path, tiny):
    """A quantization_config jquant does not read is refused by its quant_method (the GPTQ,
    AWQ and compressed-tensors ones load as QArrays: tests/io/test_gptq_awq.py and
    test_compressed_tensors.py); AutoGPTQ's quantize_config.json alone means GPTQ."""
    config = dict(hf_config_json(tiny), quantization_config={"quant_method": "bitsandbytes"})
    path = write_hf_dir(tmp_path / "m", tiny, tiny.tensors(), config=config)
    with pytest.raises(ValueError, match=r"quant_method 'bitsandbytes' is not one jquant reads "
                                         r"\(compressed-tensors, gptq, awq\)"):  # fmt: skip
        jio.load_hf_dir(path)
    plain = write_hf_dir(tmp_path / "p", tiny, tiny.tensors())
    assert jhf.quant_method(plain, json.loads((plain / "config.json").read_text())) is None
    (plain / "quantize_config.json").write_text(json.dumps({"bits": 4}))
    assert jhf.quant_method(plain, {}) == "gptq"
    with pytest.raises(ValueError, match=r"is read whole; lazy=True reads float"):
        jio.load_hf_dir(plain, lazy=True)


def test_hub_id_uses_snapshot_download(tmp_path, tiny, monkeypatch):
    import huggingface_hub
    local = write_hf_dir(tmp_path / "snap", tiny, tiny.tensors())
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    ckpt = jio.load_checkpoint("someorg/tiny-llama")
    assert ckpt.source == "someorg/tiny-llama"
    assert calls[0][0] == "someorg/tiny-llama" and "*.safetensors" in calls[0][1]["allow_patterns"]


def test_hub_failure_is_an_oserror(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not fetch 'someorg/tiny'.*no network"):
        jio.load_checkpoint("someorg/tiny")


def test_hub_failure_message_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("Got: ConnectError\nAn error happened while trying to locate the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not fetch 'someorg/tiny'") as e:
        jio.load_hub("someorg/tiny")
    assert "\n" not in str(e.value) and "ConnectError An error happened" in str(e.value)


# --- reference: tiny random transformers models saved with save_pretrained ---------------------


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_save_pretrained_round_trip(tmp_path, arch):
    torch = pytest.importorskip("torch")
    import transformers
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=arch == "qwen2",
    )
    if arch == "llama":
        config = transformers.LlamaConfig(
            **kwargs,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        model_cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**kwargs)
        model_cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = model_cls(config).to(torch.bfloat16 if arch == "llama" else torch.float32)
    model.save_pretrained(tmp_path, safe_serialization=True)

    ckpt = jio.load_hf_dir(tmp_path)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    assert set(ckpt.tensors) == set(state)
    for name, want in state.items():
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)
    c = ckpt.config
    assert c["model_type"] == arch and c["head_dim"] == 8
    assert c["tie_word_embeddings"] is config.tie_word_embeddings
    assert c["attention_bias"] is (arch == "qwen2")
    if arch == "llama":
        assert c["rope_scaling"]["rope_type"] == "llama3"
        assert c["rope_scaling"]["original_max_position_embeddings"] == 64
    else:
        assert c["rope_scaling"] is None


# --- multimodal Gemma 3: the text decoder only ---------------------------------------------------

#: Where each transformers version's Gemma3ForConditionalGeneration keeps the text model.
MM_LAYOUTS = {
    "v5": {"model.": "model.language_model.", "lm_head.": "lm_head.",
           "vision": ("model.vision_tower.", "model.multi_modal_projector.")},
    "v4": {"model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
           "vision": ("vision_tower.", "multi_modal_projector.")},
}  # fmt: skip


@pytest.mark.parametrize("layout", list(MM_LAYOUTS))
def test_multimodal_gemma3_loads_the_text_decoder(tmp_path, tiny, layout):
    text = tiny.tensors(arch="gemma3", tied=False)
    prefixes = MM_LAYOUTS[layout]
    stored = {}
    for name, value in text.items():
        head = "model." if name.startswith("model.") else "lm_head."
        stored[prefixes[head] + name[len(head) :]] = value
    for p in prefixes["vision"]:
        stored[p + "encoder.layers.0.mlp.fc1.weight"] = np.ones((4, 2), np.float32)
    t = tiny.shape
    # As google/gemma-3-4b-it's config.json: a sparse text_config (the rest is
    # Gemma3TextConfig's defaults), token ids and tying at the top level.
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "tie_word_embeddings": False,
        "image_token_index": 262144,
        "text_config": {
            "model_type": "gemma3_text",
            "vocab_size": len(tiny.vocab()),
            "hidden_size": t["hidden"],
            "intermediate_size": t["ffn"],
            "num_hidden_layers": t["layers"],
            "num_attention_heads": t["heads"],
            "num_key_value_heads": t["kv_heads"],
            "head_dim": t["head_dim"],
            "sliding_window": 8,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        },
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 2},
    }
    path = write_hf_dir(tmp_path / "mm", tiny, stored, config=config)
    with pytest.warns(UserWarning, match="only its text decoder is loaded, not the vision tower"):
        ckpt = jio.load_hf_dir(path)
    assert set(ckpt.tensors) == set(text)  # no vision tensor, HF text-model names
    assert not any("vision" in k or "multi_modal" in k for k in ckpt.tensors)
    for name, want in text.items():
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)
    c = ckpt.config
    assert c["model_type"] == "gemma3_text" and c["tie_word_embeddings"] is False
    assert (c["rope_theta"], c["rope_local_base_freq"]) == (1e6, 10000.0)  # defaults
    assert c["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert c["query_pre_attn_scalar"] == 256 and c["max_position_embeddings"] == 131_072
    assert c["layer_types"][:2] == ["sliding_attention", "sliding_attention"]  # 5 per global
    assert (c["bos_token_id"], c["eos_token_id"]) == (2, [1, 106])


def test_multimodal_config_other_than_gemma3_is_refused():
    from jquant.models import LlamaConfig

    text = dict(model_type="gemma3_text", vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=64)
    cfg = LlamaConfig.from_hf({"model_type": "gemma3", "text_config": text})
    assert cfg.model_type == "gemma3_text" and cfg.rope_theta == 1e6 and cfg.head_dim == 256
    for other in ("llava", "paligemma", "mistral3"):
        with pytest.raises(ValueError, match=f"model_type '{other}' is not supported"):
            jhf.config_from_hf({"model_type": other, "text_config": dict(text, model_type="llama")})


@pytest.mark.reference
def test_transformers_gemma3_multimodal_logits(tmp_path):
    """A tiny Gemma3ForConditionalGeneration saved by transformers: jquant runs its text
    decoder and gets the logits transformers gets for a text-only prompt."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    import transformers

    from jquant import models

    text = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    # The image tokens must lie inside the tiny vocabulary.
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
        mm_tokens_per_image=4, boi_token_index=120, eoi_token_index=121,
        image_token_index=122)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at 0 or 1; make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)

    with pytest.warns(UserWarning, match="vision tower"):
        model, params, _ = models.load(str(tmp_path), dtype=jnp.float32)
    assert model.config.model_type == "gemma3_text" and model.config.has_sliding
    ids = np.random.default_rng(0).integers(3, 120, (1, 24))  # text only: no image tokens
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    got, _ = models.forward(model, params, jnp.asarray(ids, jnp.int32))
    err = float(np.abs(np.asarray(got) - want).max()) / float(np.abs(want).max())
    assert err < 2e-5
