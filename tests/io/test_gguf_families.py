"""GGUF files of the families beyond Llama: Qwen3 and Gemma 1, 2 and 3.

Each tiny file is written here with `gguf`'s writer the way llama.cpp's converter writes that
architecture (tests/conftest.py `write_tiny_gguf`: its tensor names, Gemma's norms stored as
``1 + w``, no Q/K permutation, the sliding window and soft-caps as metadata). It must load to
the tensors it was written from, and (reference tests) to the logits of its HF twin: the
transformers model of the same family built from the same tensors, configured here by hand
rather than from what jquant read.
"""

from __future__ import annotations

import numpy as np
import pytest

from jquant import io as jio
from jquant.io import gguf as jgguf

ARCHS = ["qwen3", "gemma", "gemma2", "gemma3"]


@pytest.fixture(scope="module", params=ARCHS)
def written(request, tmp_path_factory, tiny):
    arch = request.param
    tensors = tiny.tensors(arch=arch, tied=arch != "qwen3")
    path = tiny.write_gguf(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", tensors, arch=arch)
    return arch, path, tensors


def test_round_trips_exactly(written, tiny):
    arch, path, tensors = written
    ckpt = jio.load_gguf(path)
    assert ckpt.config == tiny.config(arch=arch, tied=arch != "qwen3")
    assert set(ckpt.tensors) == set(tensors)
    for name, want in tensors.items():
        np.testing.assert_allclose(ckpt.tensors[name], want, rtol=0, atol=1e-6, err_msg=name)


def test_family_tensor_names():
    assert jgguf.hf_name("blk.2.attn_q_norm.weight", "qwen3") == (
        "model.layers.2.self_attn.q_norm.weight"
    )
    gemma = {
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
    for gguf_part, hf_part in gemma.items():
        for arch in ("gemma2", "gemma3"):
            assert jgguf.hf_name(f"blk.0.{gguf_part}.weight", arch) == (
                f"model.layers.0.{hf_part}.weight"
            )
    # In a llama file ffn_norm is the norm before the MLP, which HF calls post_attention.
    llama = jgguf.hf_name("blk.0.ffn_norm.weight")
    assert llama == "model.layers.0.post_attention_layernorm.weight"


def test_unknown_architecture_names_the_known_ones(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "x.gguf", tiny.tensors(), arch="phi3")
    with pytest.raises(ValueError, match="'phi3' is not supported") as err:
        jio.load_gguf(path)
    for known in jgguf.SUPPORTED_ARCHITECTURES:
        assert known in str(err.value)


def test_gemma3_pattern_from_metadata(tmp_path, tiny):
    """A file that lists its own sliding pattern (one flag per layer) overrides the default."""
    tensors = tiny.tensors(arch="gemma3")
    path = tmp_path / "g.gguf"
    tiny.write_gguf(path, tensors, arch="gemma3")
    meta = jgguf.read_metadata(path)
    meta["gemma3.attention.sliding_window_pattern"] = [False, True]
    config = jgguf.config_from_metadata(meta, {"token_embd.weight"}, str(path))
    assert config["layer_types"] == ["full_attention", "sliding_attention"]
    meta["gemma3.attention.sliding_window_pattern"] = [True]
    with pytest.raises(ValueError, match="sliding_window_pattern lists 1 layers"):
        jgguf.config_from_metadata(meta, {"token_embd.weight"}, str(path))


# ---- against transformers ----------------------------------------------------------------


def _hf_twin(arch, tensors, tiny):
    """The transformers model of ``arch`` with the tiny shape, from ``tensors``."""
    torch = pytest.importorskip("torch")
    import transformers

    t = tiny.shape
    common = dict(vocab_size=len(tiny.vocab()), hidden_size=t["hidden"],
                  intermediate_size=t["ffn"], num_hidden_layers=t["layers"],
                  num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
                  head_dim=t["head_dim"], rms_norm_eps=1e-5,
                  max_position_embeddings=256)  # fmt: skip
    if arch == "qwen3":
        config = transformers.Qwen3Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "gemma":
        config = transformers.GemmaConfig(**common, rope_theta=10000.0,
                                          hidden_activation="gelu_pytorch_tanh")  # fmt: skip
        cls = transformers.GemmaForCausalLM
    elif arch == "gemma2":
        config = transformers.Gemma2Config(
            **common, rope_theta=10000.0, sliding_window=8, query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        )  # fmt: skip
        cls = transformers.Gemma2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(
            **common, sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=6,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "sliding_attention": {"rope_type": "default",
                                                   "rope_theta": 10000.0}},
        )  # fmt: skip
        cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = "eager"
    model = cls(config).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return torch, model


@pytest.mark.reference
def test_logits_match_the_hf_twin(written, tiny):
    import jax.numpy as jnp

    from jquant.models import forward, load

    arch, path, tensors = written
    torch, hf = _hf_twin(arch, tensors, tiny)
    ids = np.random.default_rng(0).integers(3, len(tiny.vocab()), (1, 24))  # > the window
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    model, params, _ = load(str(path), dtype=jnp.float32)
    got, _ = forward(model, params, jnp.asarray(ids, jnp.int32))
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(np.asarray(got) - want).max()) / scale < 2e-5
