"""`write_gguf` for mixture-of-experts models: Mixtral (GGUF ``llama``), Qwen2-MoE
(``qwen2moe``), Qwen3-MoE (``qwen3moe``) and OLMoE (``olmoe``).

Each model is a tiny random one built from HF-layout tensors (`jquant.io.expected_shapes`: an
expert stack ``(E, out, in)`` as convert_hf_to_gguf.py stacks the experts), routers scaled so
that tokens pick different experts. Judged by llama.cpp itself (llama-cpp-python 0.3.36)
running the exported file, by the gguf package's own reader and dequantizer (what is stored:
the names, each stack as ggml ``[in, out, E]`` holding those HF tensors, the keys), and by
`load_gguf(packed=True)` (the inverse: config, tensors, codes and scales).
"""

from __future__ import annotations

import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import io as jio
from jquant.arch import LlamaConfig
from jquant.calib import quantize_loaded
from jquant.io.gguf_export import write_gguf
from jquant.models import forward, params_from_hf, params_to_hf
from jquant.qarray import QArray

# model_type -> (GGUF architecture, the tiny dense family its attention is, its MoE fields).
FAMILIES = {
    "mixtral": ("llama", "llama", dict(num_experts=4, num_experts_per_tok=2,
                                       norm_topk_prob=True, moe_intermediate_size=96)),
    "qwen2_moe": ("qwen2moe", "qwen2", dict(num_experts=4, num_experts_per_tok=2,
                                            norm_topk_prob=False, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64)),
    "qwen3_moe": ("qwen3moe", "qwen3", dict(num_experts=6, num_experts_per_tok=3,
                                            norm_topk_prob=True, moe_intermediate_size=32)),
    # As OLMoE-1B-7B, as many key/value heads as query heads (llama.cpp's q/k norms are
    # hidden_size wide); experts as wide as intermediate_size.
    "olmoe": ("olmoe", "qwen3", dict(num_experts=4, num_experts_per_tok=2,
                                     norm_topk_prob=False, moe_intermediate_size=96,
                                     num_key_value_heads=4)),
}  # fmt: skip
# llama.cpp's block tensor names of an MoE layer (gguf-py's MODEL_TENSOR names), by HF part.
EXPERT_NAMES = {
    "mlp.gate": "ffn_gate_inp",
    "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# Mixtral's experts are w1 (gate), w3 (up), w2 (down).
MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
TOKENS = [int(t) for t in np.random.default_rng(1).integers(3, 200, 24)]


def _config(tiny, kind: str, **change) -> dict:
    """The Checkpoint.config of the tiny ``kind`` model (as `load_gguf` spells it)."""
    _, dense, moe = FAMILIES[kind]
    return {**tiny.config(arch=dense, tied=False), "model_type": kind, "mlp_only_layers": [],
            "decoder_sparse_step": 1, "shared_expert_intermediate_size": 0, **moe,
            **change}  # fmt: skip


def _tensors(config) -> dict[str, np.ndarray]:
    """Random HF-layout tensors: matrices N(0, 0.1²), routers N(0, 2²), norms N(0, 1)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in jio.expected_shapes(config).items():
        w = rng.standard_normal(shape).astype(np.float32)
        out[name] = w * np.float32(2.0 if name.endswith("mlp.gate.weight") else
                                   0.1 if len(shape) > 1 else 1.0)  # fmt: skip
    return out


def _model(tiny, kind: str, recipe: str | None = None, **change):
    """(config, HF tensors, model, params) of the tiny ``kind``, quantized by ``recipe``."""
    config = _config(tiny, kind, **change)
    tensors = _tensors(config)
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    if recipe is not None:
        model, params = quantize_loaded(model, params, recipe)
    return config, tensors, model, params


def _hf_layer(hf: dict[str, np.ndarray], i: int, experts: int) -> dict[str, np.ndarray]:
    """Layer ``i``'s MoE tensors of the HF checkpoint ``hf`` by llama.cpp name, as
    convert_hf_to_gguf.py writes them: each projection's per-expert Linears stacked in expert
    order along a new leading axis (its ``torch.stack(datas, dim=0)``)."""
    out, stacks = {}, {}
    for name, w in hf.items():
        m = re.fullmatch(rf"model\.layers\.{i}\.(?:mlp|block_sparse_moe)\.(.+)\.weight", name)
        if m is None:
            continue
        if e := re.fullmatch(r"experts\.(\d+)\.(\w+)", m.group(1)):
            stacks.setdefault(MIXTRAL.get(e.group(2), e.group(2)), {})[int(e.group(1))] = w
        else:
            out[f"blk.{i}.{EXPERT_NAMES['mlp.' + m.group(1)]}.weight"] = w
    for proj, per in stacks.items():
        stack = np.stack([per[e] for e in range(experts)])
        out[f"blk.{i}.{EXPERT_NAMES['mlp.experts.' + proj]}.weight"] = stack
    return out


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory, tiny):
    """The tiny byte-level BPE tokenizer (llama.cpp loads no file without a vocabulary)."""
    path = tiny.write_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", tiny.tensors())
    return jio.load_gguf(path).tokenizer


def _logits(model, params, tokens) -> np.ndarray:
    return np.asarray(forward(model, params, jnp.asarray([tokens]))[0][0], np.float32)


@pytest.mark.parametrize("recipe", [None, "gguf-q8_0", "gguf-q4_0"])
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_round_trip_through_load_gguf(tmp_path, tiny, tiny_tokenizer, kind, recipe):
    """jquant -> GGUF -> `load_gguf(packed=True)`: the config, every float tensor bit for bit,
    and each QArray's codes and scales (an expert stack one QArray ``(E, in, out)``)."""
    config, _, _, params = _model(tiny, kind, recipe)
    path = write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf")
    back = jio.load_gguf(path, packed=True)
    assert back.config == config
    written = params_to_hf(params)
    assert set(back.tensors) == set(written)
    stacks = 0
    for name, value in written.items():
        got = back.tensors[name]
        if isinstance(value, QArray):
            assert (got.qtype, got.group_size, got.shape) == (value.qtype, 32, value.shape)
            np.testing.assert_array_equal(np.asarray(got.codes()), np.asarray(value.codes()))
            np.testing.assert_array_equal(np.asarray(got.scale),
                                          np.asarray(value.scale, np.float32))  # fmt: skip
            stacks += ".experts." in name
        else:
            np.testing.assert_array_equal(got, np.asarray(value, np.float32), err_msg=name)
    assert stacks == (0 if recipe is None else 2 * 3)  # gate, up and down of both layers


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_what_is_stored(tmp_path, tiny, tiny_tokenizer, kind):
    """The gguf package's reading of the float export: llama.cpp's names, each expert stack
    ggml ``[in, out, E]`` holding the HF ``(E, out, in)`` tensor it was built from (the
    router ``[D, E]``, Qwen2-MoE's shared-expert gate ``[D, 1]``), and the expert keys."""
    arch = FAMILIES[kind][0]
    config, hf, _, params = _model(tiny, kind)
    reader = gguf.GGUFReader(str(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf")))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert fields["general.architecture"] == arch
    stored = _hf_layer(hf, 1, config["num_experts"])
    assert len(stored) == (8 if kind == "qwen2_moe" else 4)
    for name, want in stored.items():
        t = tensors[name]
        assert t.shape.tolist() == list(reversed(want.shape)), name  # ggml: fastest first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=name)
    assert tensors["blk.0.ffn_gate_exps.weight"].shape.tolist() == [
        64, config["moe_intermediate_size"], config["num_experts"]]  # fmt: skip
    assert not any(n.startswith("blk.0.ffn_gate.") for n in tensors)  # no dense MLP
    keys = {k.removeprefix(f"{arch}."): v for k, v in fields.items() if "expert" in k}
    want = {"expert_count": config["num_experts"],
            "expert_used_count": config["num_experts_per_tok"]}  # fmt: skip
    if arch in ("qwen2moe", "qwen3moe"):
        want["expert_feed_forward_length"] = config["moe_intermediate_size"]
    if arch == "qwen2moe":
        want["expert_shared_feed_forward_length"] = 64
    assert keys == want
    assert fields[f"{arch}.feed_forward_length"] == config["intermediate_size"]


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_gguf_dequantizes_the_stacks_as_jquant(tmp_path, tiny, tiny_tokenizer, kind):
    """`gguf.quants.dequantize` of every Q4_0 expert stack (and Qwen2-MoE's Q4_0 shared
    expert and its gate) is the QArray's dequantize(), each expert transposed to HF's
    ``(out, in)``."""
    config, _, _, params = _model(tiny, kind, "gguf-q4_0")
    reader = gguf.GGUFReader(str(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf")))
    tensors = {t.name: t for t in reader.tensors}
    seen = 0
    for name, q in params_to_hf(params).items():
        part = name.removesuffix(".weight").split(".", 3)[-1]
        if not isinstance(q, QArray) or part not in EXPERT_NAMES:
            continue
        t = tensors[f"blk.{name.split('.')[2]}.{EXPERT_NAMES[part]}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(
            tuple(reversed(t.shape.tolist())))  # fmt: skip
        np.testing.assert_array_equal(got, np.swapaxes(np.asarray(q.dequantize()), -1, -2))
        seen += 1
    assert seen == (2 * 7 if kind == "qwen2_moe" else 2 * 3)


# ---- llama.cpp ------------------------------------------------------------------------


def _llama(path, n_ctx: int = 32, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                           n_threads=2, verbose=False, seed=0, **kwargs)  # fmt: skip


TOL = 2e-5  # of the largest logit


@pytest.mark.reference
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_llama_cpp_logits_and_greedy_are_jquants(tmp_path, tiny, tiny_tokenizer, kind):
    """llama.cpp runs the float export (its KV cache float32): its logits on 24 tokens are
    jquant's within 2e-5 of the largest (test_gguf_moe.py's bound; measured 0.5e-6 to
    1.2e-6: summation order only; a top-k left unnormalized where llama.cpp renormalizes
    moves them by 1e-4 to 2e-2). Then llama.cpp continues 16 prompt tokens greedily by 8,
    and at each step where jquant's top two logits are further apart than twice that bound,
    jquant's greedy token over the same prefix is llama.cpp's."""
    config, _, model, params = _model(tiny, kind)
    llm = _llama(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf"),
                 type_k=0, type_v=0)  # GGML_TYPE_F32  # fmt: skip
    llm.reset()
    llm.eval(TOKENS)
    theirs = np.array(llm.scores[: len(TOKENS)], np.float32)
    ours = _logits(model, params, TOKENS)
    scale = np.abs(ours).max()
    assert np.abs(theirs - ours).max() <= TOL * scale
    prompt = TOKENS[:16]
    llm.reset()
    llm.eval(prompt)
    for _ in range(8):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    sequence = [int(t) for t in llm.input_ids[: llm.n_tokens]]
    ours = _logits(model, params, sequence)[len(prompt) - 1: -1]
    top2 = np.sort(ours, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * TOL * scale
    assert clear.sum() >= 6
    assert (np.argmax(ours, -1)[clear] == np.array(sequence[len(prompt):])[clear]).all()


@pytest.mark.reference
@pytest.mark.parametrize("recipe", ["gguf-q8_0", "gguf-q4_0"])
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_llama_cpp_runs_quantized_export_as_jquant(tmp_path, tiny, tiny_tokenizer, kind, recipe):
    """The same with Q8_0/Q4_0 expert stacks (and attention, shared expert, table, head).
    llama.cpp's quantized matmuls quantize activations to 8 bits, and the perturbed router
    inputs flip a near-tied top-k at some positions (one flip moves a position by up to 0.34
    of the largest logit), so the perplexity of 64 tokens, the dense families' measure, is
    too loose here (Mixtral Q8_0: 1.9% off; gate and up stacks swapped, Q4_0: only 0.4% to
    7%). Per position, the largest logit error relative to the largest logit: median under
    0.05 and 90th percentile under 0.08 (measured 0.010 to 0.023 and 0.013 to 0.041; with
    gate and up stacks swapped the medians are 0.11 to 0.53). The float export of the
    QArrays' dequantized values runs in llama.cpp to jquant's quantized logits within 2e-5
    (the layout is exact; what remains is llama.cpp's activation rounding)."""
    config, _, model, params = _model(tiny, kind, recipe)
    llm = _llama(write_gguf(params, config, tiny_tokenizer, tmp_path / "m.gguf"), n_ctx=64)
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 200, 64)]
    llm.reset()
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)], np.float32)
    ours = _logits(model, params, tokens)
    per_position = np.abs(theirs - ours).max(-1) / np.abs(ours).max()
    assert np.median(per_position) < 0.05
    assert np.percentile(per_position, 90) < 0.08
    dequantized = jax.tree.map(lambda v: v.dequantize() if isinstance(v, QArray) else v,
                               params, is_leaf=lambda v: isinstance(v, QArray))  # fmt: skip
    llm = _llama(write_gguf(dequantized, config, tiny_tokenizer, tmp_path / "f.gguf"),
                 n_ctx=64, type_k=0, type_v=0)  # fmt: skip
    llm.eval(tokens)
    theirs = np.array(llm.scores[: len(tokens)], np.float32)
    assert np.abs(theirs - ours).max() <= TOL * np.abs(ours).max()


# ---- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("kind, change, message", [
    ("qwen3_moe", {"mlp_only_layers": [0]}, r"dense MLP layers \[0\] \(mlp_only_layers / "
     r"decoder_sparse_step; llama.cpp's qwen3moe routes every layer through experts\)"),
    ("qwen2_moe", {"decoder_sparse_step": 2}, r"dense MLP layers \[0\]"),
    ("qwen2_moe", {"norm_topk_prob": True}, r"norm_topk_prob=True \(llama.cpp's qwen2moe does "
                                            r"not renormalize the top-k routing weights\)"),
    ("qwen3_moe", {"norm_topk_prob": False}, r"norm_topk_prob=False \(llama.cpp's qwen3moe "
                                             r"renormalizes"),
    ("olmoe", {"norm_topk_prob": True}, r"norm_topk_prob=True \(llama.cpp's olmoe does not"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0},
     r"shared_expert_intermediate_size=0 \(llama.cpp's qwen2moe requires a shared expert\)"),
    ("olmoe", {"num_key_value_heads": 2}, r"q/k norms 64 and 32 wide .*num_key_value_heads 2"),
])  # fmt: skip
def test_what_llama_cpp_cannot_run_is_refused(tmp_path, tiny, kind, change, message):
    """Each of these llama.cpp refuses to load (a dense block has no ffn_gate_inp, a qwen2moe
    block no ffn_gate_inp_shexp, an olmoe k_norm the wrong width) or runs with the other
    routing normalization: one ValueError naming the field, and no file."""
    config, _, _, params = _model(tiny, kind, **change)
    with pytest.raises(ValueError, match="write_gguf: the model has .*" + message):
        write_gguf(params, config, None, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_expert_stacks_without_a_ggml_type_are_refused(tmp_path, tiny):
    """int4 in groups of 64 with bfloat16 scales: every stack listed, nothing written."""
    config, _, model, params = _model(tiny, "qwen3_moe")
    _, qparams = quantize_loaded(model, params, "w4a16-rtn-g64")
    with pytest.raises(ValueError, match=r"write_gguf: \d+ tensor\(s\) have no GGUF type") as e:
        write_gguf(qparams, config, None, tmp_path / "m.gguf")
    for i in range(2):
        for proj in ("gate", "up", "down"):
            assert f"layers/{i}/mlp/experts/{proj}_proj/kernel" in str(e.value)
    assert "int4 g64 bfloat16 scales: " in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_writes_the_quantized_experts(tmp_path, tiny, tiny_tokenizer):
    """``jquant export MOE.gguf --recipe gguf-q8_0 --format gguf``: the file holds the same
    tensors, byte for byte, as `write_gguf` of the recipe applied in Python."""
    from jquant.cli import main

    config, _, model, params = _model(tiny, "qwen3_moe")
    source = write_gguf(params, config, tiny_tokenizer, tmp_path / "src.gguf")
    out = tmp_path / "cli.gguf"
    assert main(["export", str(source), "--recipe", "gguf-q8_0", "--format", "gguf", "-o",
                 str(out)]) == 0  # fmt: skip
    _, qparams = quantize_loaded(model, params, "gguf-q8_0")
    want = write_gguf(qparams, config, tiny_tokenizer, tmp_path / "py.gguf")
    got = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    expected = {t.name: t for t in gguf.GGUFReader(str(want)).tensors}
    assert set(got) == set(expected)
    assert got["blk.1.ffn_down_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    for name, t in expected.items():
        assert got[name].tensor_type == t.tensor_type, name
        np.testing.assert_array_equal(np.asarray(got[name].data), np.asarray(t.data), name)
