"""The families beyond Llama against Hugging Face transformers (torch, float32).

Tiny random models built with transformers' own config and model classes: Gemma 1/2/3,
Qwen3, and the sliding windows of Mistral, Qwen2 and Qwen3. Every sliding window is 8
tokens and every prompt is longer, so a mask that ignored the window would change the
logits (`test_window_is_real` checks that it does). Each model is compared three ways:
logits of a whole prompt (`forward`), 64 greedy tokens through `generate`'s KV cache, and
the same 64 tokens through the serving engine's paged cache (`Runner`: chunked prefill, then
one-token decode steps).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dataclasses  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402

from jquant.models import LlamaConfig, forward, generate, params_from_hf  # noqa: E402
from jquant.serve.runner import Runner, Sampling  # noqa: E402

pytestmark = pytest.mark.reference

torch.set_num_threads(2)

VOCAB = 128
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5,
            eos_token_id=2, bos_token_id=1, pad_token_id=0)  # fmt: skip
WINDOW = 8

CASES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_activation="gelu_pytorch_tanh")),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        # A query scale other than head_dim's, and caps low enough to bite.
        dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
             final_logit_softcapping=5.0),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        # Layers sliding, full, sliding; global RoPE 1e6 with linear scaling, local 10k.
        dict(sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=16,
             rope_parameters={
                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3-sliding": (
        "Qwen3Config", "Qwen3ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen2-sliding": (
        "Qwen2Config", "Qwen2ForCausalLM",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
}  # fmt: skip
SLIDING_CASES = [c for c in CASES if c.endswith("sliding") or c in ("gemma2", "gemma3")]


def _hf_model(case):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    config._attn_implementation = "eager"  # soft-capping needs it
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # biases and norms start at 0 or 1; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _convert(hf):
    tensors = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    return params_from_hf(tensors, LlamaConfig.from_hf(hf.config.to_dict()))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    hf = _hf_model(request.param)
    model, params = _convert(hf)
    return request.param, hf, model, params


def _close(got, want):
    scale = max(1.0, float(np.abs(want).max()))
    return float(np.abs(np.asarray(got) - want).max()) / scale


def test_config_reads_the_family(pair):
    case, hf, model, _ = pair
    c, hc = model.config, hf.config
    assert c.model_type == hc.model_type
    if case.startswith("gemma"):
        assert c.norm_offset == 1.0 and c.embed_scale == pytest.approx(8.0)
        assert c.hidden_act == "gelu_pytorch_tanh"
    if hasattr(hc, "layer_types") and getattr(hc, "sliding_window", None):
        assert list(c.layer_types or ["full_attention"] * c.num_layers) == hc.layer_types
    if case in SLIDING_CASES:
        assert c.has_sliding and c.sliding_window == WINDOW
    else:
        assert not c.has_sliding


def test_logits_match(pair):
    _, hf, model, params = pair
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 40))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    got, _ = forward(model, params, jnp.asarray(ids, jnp.int32))
    assert _close(got, want) < 2e-5


@pytest.mark.parametrize("case", SLIDING_CASES)
def test_window_is_real(case):
    """The same weights with the window made wider than the prompt give other logits past
    the window (and the same before it): a mask that dropped the window would fail
    `test_logits_match`."""
    hf = _hf_model(case)
    model, params = _convert(hf)
    assert model.config.has_sliding
    ids = jnp.asarray(np.random.default_rng(0).integers(3, VOCAB, (1, 40)), jnp.int32)
    wide = dataclasses.replace(model.config, sliding_window=10**6)  # the same layers, no window
    unwindowed, _ = params_from_hf(
        {k: v.detach().numpy() for k, v in hf.state_dict().items()}, wide
    )
    a, _ = forward(model, params, ids)
    b, _ = forward(unwindowed, params, ids)
    assert _close(a[:, WINDOW + 1 :], np.asarray(b[:, WINDOW + 1 :])) > 1e-3
    np.testing.assert_allclose(a[:, :WINDOW], b[:, :WINDOW], rtol=1e-5, atol=1e-5)


def _hf_greedy(hf, prompt, steps):
    hf.generation_config.eos_token_id = None  # run all the steps, EOS or not
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


PROMPT = np.random.default_rng(1).integers(3, VOCAB, 20).tolist()  # longer than the window
STEPS = 64


@pytest.fixture(scope="module")
def hf_tokens(pair):
    return _hf_greedy(pair[1], PROMPT, STEPS)


def test_greedy_through_kv_cache_matches(pair, hf_tokens):
    _, _, model, params = pair
    got = generate(model, params, PROMPT, max_new_tokens=STEPS, stop_tokens=())
    assert got.sequences()[0] == hf_tokens


def test_greedy_through_serving_cache_matches(pair, hf_tokens):
    _, _, model, params = pair
    runner = Runner(model, params, rows=2, max_len=128, prefill_chunk=16)
    greedy = Sampling.greedy(1)
    table, pos = [list(range(15, 7, -1))], 0  # pages in reverse order
    for start in range(0, len(PROMPT), 16):  # chunked prefill, as the engine runs it
        token = int(runner.prefill(table, [PROMPT[start : start + 16]], [start], greedy)[0])
        pos = start + len(PROMPT[start : start + 16])
    out = [token]
    for _ in range(STEPS - 1):
        token = int(runner.decode(table, [token], [pos], greedy)[0])
        out.append(token)
        pos += 1
    assert out == hf_tokens
