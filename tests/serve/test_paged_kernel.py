"""The serving programs with attention in the paged-attention kernel (forced: on CPU, the
TPU kernel interpreted) against the same programs in XLA, and when "auto" picks the kernel.

The XLA path is the reference here: it gathers the pages and runs the attention every
other cache uses (`tests/serve/test_paged.py` holds it to the uncached forward).
"""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jquant.kernels import dispatch_table

from jquant import _attention_path, kernels, ops
from jquant.models import LlamaConfig, init_model
from jquant.serve.runner import Runner, Sampling

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)  # fmt: skip
# Gemma 2's attention: sliding and full layers alternating (one scan: a traced window),
# logit soft-cap, a query scale other than head_dim ** -0.5.
GEMMA2 = dataclasses.replace(
    CFG, sliding_window=6, layer_types=("sliding_attention", "full_attention") * 2,
    num_layers=4, attn_logit_softcap=8.0, query_pre_attn_scalar=24.0)


def _model(cfg):
    model = init_model(cfg, seed=0)
    return model, jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every traced call of the kernel entry, as (backend, interpret, tokens per row)."""
    calls, real = [], kernels.paged_attention

    def spy(q, *args, backend=None, interpret=False, **kw):
        calls.append((backend, interpret, q.shape[1]))
        return real(q, *args, backend=backend, interpret=interpret, **kw)

    monkeypatch.setattr(kernels, "paged_attention", spy)
    return calls


def _serve(model, params, path, kv_cache):
    """Two prompts (one over two prefill chunks) into scattered pages, then 6 greedy
    decode steps: the sampled tokens and their log-probabilities."""
    old = ops.set_attention_path(path)
    try:
        runner = Runner(model, params, rows=2, max_len=48, prefill_chunk=16, kv_cache=kv_cache)
    finally:
        ops.set_attention_path(old)
    tables = [[5, 1, 7], [2, 0, 6]]
    prompts = [list(range(4, 24)), list(range(40, 47))]
    tokens, logprobs, positions = [], [], []
    for table, prompt in zip(tables, prompts):
        for start in range(0, len(prompt), 16):
            out = runner.prefill([table], [prompt[start:start + 16]], [start],
                                 Sampling.greedy(1), logprobs=True)
        tokens.append([int(out.tokens[0])])
        logprobs.append([float(out.logprob[0])])
        positions.append(len(prompt))
    for _ in range(6):
        out = runner.decode(tables, [t[-1] for t in tokens], positions, Sampling.greedy(2),
                            logprobs=True)
        for i in range(2):
            tokens[i].append(int(out.tokens[i]))
            logprobs[i].append(float(out.logprob[i]))
            positions[i] += 1
    return tokens, np.array(logprobs)


@pytest.mark.parametrize("cfg, kv_cache", [(CFG, None), (CFG, "int8"), (GEMMA2, "fp8")],
                         ids=["float", "int8", "gemma2_fp8"])
def test_serving_with_the_kernel_equals_xla(cfg, kv_cache, kernel_calls):
    model, params = _model(cfg)
    want_tokens, want_logprobs = _serve(model, params, "xla", kv_cache)
    assert kernel_calls == []
    tokens, logprobs = _serve(model, params, "kernel", kv_cache)
    # traced once per program: prefill chunks of 16 and decode steps of 1 token per row
    assert {c[2] for c in kernel_calls} == {1, 16}
    backend = kernels.normalize_backend(None)  # CPU: the TPU kernel interpreted
    ran = ("tpu", True) if backend == "cpu" else (backend, False)
    assert all(c[:2] == ran for c in kernel_calls)
    assert tokens == want_tokens
    np.testing.assert_allclose(logprobs, want_logprobs, rtol=1e-4, atol=1e-4)


@pytest.fixture
def no_table(monkeypatch, tmp_path):
    monkeypatch.delenv("JQUANT_DISPATCH_TABLE", raising=False)
    monkeypatch.setattr(dispatch_table, "MEASURED_DIR", str(tmp_path / "measured"))
    old = dispatch_table.set_dispatch_table(None)
    yield
    dispatch_table.set_dispatch_table(old)


def _choice(path, tokens=1, dtype=np.float32, page_size=16):
    return _attention_path.paged_attention_kernel(path, tokens=tokens, dtype=dtype,
                                                  page_size=page_size, head_dim=64)


def test_auto_is_xla_without_a_measured_table(no_table, monkeypatch):
    assert _choice("auto") is None  # CPU
    monkeypatch.setattr(kernels, "normalize_backend", lambda b: "gpu")
    assert _choice("auto") is None  # a GPU, but nothing measured
    dispatch_table.set_dispatch_table({("gpu", "paged_attention"): 1})
    assert _choice("auto", tokens=1) == ("gpu", False)
    assert _choice("auto", tokens=16) is None  # measured at decode only
    assert _choice("auto", page_size=8) is None  # the GPU kernel's tile rule
    assert _choice("xla") is None
    with pytest.raises(ValueError, match="page_size=8 must be a power of two"):
        _choice("kernel", page_size=8)


def test_forced_kernel_on_cpu_interprets_the_tpu_kernel(no_table, monkeypatch):
    monkeypatch.setattr(kernels, "normalize_backend", lambda b: "cpu")
    assert _choice("kernel", tokens=128) == ("tpu", True)
    with pytest.raises(ValueError, match="float16 queries .* has no TPU kernel"):
        _choice("kernel", dtype=np.float16)


def test_the_path_setting_and_variable(monkeypatch):
    monkeypatch.setattr(_attention_path, "_attention_path", None)
    monkeypatch.setenv("JQUANT_ATTENTION", "kernel")
    assert ops.attention_path() == "kernel"
    assert ops.set_attention_path("xla") is None and ops.attention_path() == "xla"
    monkeypatch.setenv("JQUANT_ATTENTION", "fast")
    ops.set_attention_path(None)
    with pytest.raises(ValueError, match="JQUANT_ATTENTION: unknown attention path 'fast'"):
        ops.attention_path()
    with pytest.raises(ValueError, match="unknown attention path 'fast'"):
        ops.set_attention_path("fast")


def test_a_sharded_runner_refuses_the_forced_kernel():
    model, params = _model(CFG)
    old = ops.set_attention_path("kernel")
    try:
        with pytest.raises(ValueError, match="does not run on a sharded cache"):
            Runner(model, params, rows=2, max_len=32, shard=lambda p, c: (p, c))
    finally:
        ops.set_attention_path(old)
