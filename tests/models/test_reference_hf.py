"""jquant's Llama against Hugging Face transformers (torch, float32): logits and greedy ids.

Tiny random models of each supported family run in seconds; the real SmolLM2-135M test is
also marked slow. torch is a test-only dependency (the `reference` extra).
"""

import numpy as np
import pytest

# torch is the one optional dependency: skipped without it, except in CI (tests/conftest.py).
torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

from jquant.models import (  # noqa: E402
    LlamaConfig,
    forward,
    generate,
    params_from_hf,
    rope_inv_freq,
)

pytestmark = pytest.mark.reference

torch.set_num_threads(2)

TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.1, rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1,
               pad_token_id=0)  # fmt: skip

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)  # fmt: skip

CASES = {
    "llama-untied-llama3-rope": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    ),
    "llama-attention-bias": (
        "LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, tie_word_embeddings=True),
    ),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, head_dim=16)),
}  # fmt: skip


def _hf_model(case):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY_HF, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # biases and norms start at 0 and 1; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _convert(hf):
    tensors = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    return params_from_hf(tensors, LlamaConfig.from_hf(hf.config.to_dict()))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    hf = _hf_model(request.param)
    model, params = _convert(hf)
    return hf, model, params


def test_logits_match(pair):
    hf, model, params = pair
    ids = np.random.default_rng(0).integers(3, 128, (2, 40))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    got, _ = forward(model, params, jnp.asarray(ids, jnp.int32))
    assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_greedy_generation_matches(pair):
    hf, model, params = pair
    prompt = np.random.default_rng(1).integers(3, 128, (1, 9))
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt), max_new_tokens=16, do_sample=False,
                          eos_token_id=2, pad_token_id=0)  # fmt: skip
    want = out[0, prompt.shape[1] :].tolist()
    got = generate(model, params, prompt[0].tolist(), max_new_tokens=16, stop_tokens=(2,))
    assert got.sequences()[0] == want[: got.lengths[0]]
    assert len(want) == got.lengths[0] or want[got.lengths[0]] == 0  # HF pads after eos


def test_llama3_rope_matches_transformers_function():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = transformers.LlamaConfig(**TINY_HF, rope_parameters=LLAMA3_ROPE)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    got = rope_inv_freq(LlamaConfig.from_hf(hf_config.to_dict()))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


# ---- the real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from jquant.io import load_checkpoint
    from jquant.models import load

    ckpt = load_checkpoint("smollm2-135m")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ckpt.config)).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.tensors.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if ckpt.config["tie_word_embeddings"]:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    model, params, tokenizer = load(ckpt, dtype=jnp.float32)
    return hf, model, params, tokenizer


@pytest.mark.slow
def test_smollm2_logits_and_greedy_match_hf(smollm2):
    from jquant.eval import load_corpus

    hf, model, params, tokenizer = smollm2
    ids = tokenizer.encode(load_corpus("pydoc-eval"), add_special_tokens=False)[:256]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits.numpy()
    got, _ = forward(model, params, jnp.asarray([ids], jnp.int32))
    delta = np.abs(np.asarray(got) - want).max()
    print(f"SmolLM2 max |dlogit| over 256 tokens: {delta:.2e} (logit range {np.ptp(want):.1f})")
    # Measured 8.1e-5 and 1.4e-4 on two machines (float32 summation order varies by CPU).
    assert delta < 5e-4

    from jquant.models import chat_prompt

    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=0)  # fmt: skip
    hf_ids = out[0, len(prompt) :].tolist()
    ours = generate(model, params, prompt, max_new_tokens=32,
                    stop_tokens=(tokenizer.eos_token_id,))  # fmt: skip
    print("SmolLM2 greedy:", repr(tokenizer.decode(ours.sequences()[0])))
    assert ours.sequences()[0] == hf_ids[: ours.lengths[0]]
