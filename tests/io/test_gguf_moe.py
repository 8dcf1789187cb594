"""Mixture-of-experts GGUF files (Mixtral as ``llama``, ``qwen2moe``, ``qwen3moe``, ``olmoe``)
against transformers and llama.cpp.

Each twin starts as a tiny random model built with transformers' own classes (torch float32,
routers scaled so that every expert gets tokens) and saved with ``save_pretrained``. It is
written to GGUF here as llama.cpp's convert_hf_to_gguf.py writes it, without jquant: its
``config.json`` read as the converter's hparams (`TextModel.set_gguf_parameters`, plus each
model class's own keys), each projection's per-expert Linears stacked in expert order along a
new leading axis (the converter's ``torch.stack(datas, dim=0)`` under its merged name), every
name mapped by gguf-py's own `TensorNameMap`, and the Q/K rows of ``llama`` permuted
(conftest's `llama_cpp_permute`). jquant must load it to transformers' logits and greedy
tokens, and llama.cpp itself must run the same file to jquant's logits.
"""

from __future__ import annotations

import json
import re

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import io as jio
from jquant.io import gguf as jgguf
from jquant.models import LlamaConfig, forward, generate, load
from jquant.qarray import QArray

# (transformers config class, model class, GGUF architecture, the config's MoE fields).
CASES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "llama",
                dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2moe",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3moe",
                  dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                       norm_topk_prob=True, head_dim=8)),
    # As OLMoE-1B-7B, as many key/value heads as query heads: llama.cpp's olmoe wants its
    # k_norm as wide as the model (jquant's HF import of a grouped one: test_moe.py).
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "olmoe",
              dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                   num_key_value_heads=4)),
}  # fmt: skip
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
            rms_norm_eps=1e-5, eos_token_id=2, bos_token_id=1, pad_token_id=0,
            tie_word_embeddings=False)  # fmt: skip
# Mixtral's experts are w1 (gate), w2 (down), w3 (up).
_EXPERT_RE = r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight"


def _hf_model(case, vocab):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    config_cls, model_cls, _, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(vocab_size=vocab, **{**TINY, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # routers: spread the logits out
                p.mul_(20.0)
            elif "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def write_twin(path, hp: dict, tensors: dict[str, np.ndarray], arch: str, tiny, *,
               quantize: tuple[str, ...] = (), skip: tuple[str, ...] = (),
               meta: dict | None = None, edit=None, dense_arch: str | None = None):  # fmt: skip
    """``tensors`` (HF names as save_pretrained writes them, one Linear per expert) and the
    config dict ``hp`` written as convert_hf_to_gguf.py writes architecture ``arch``.

    Args:
      quantize: GGUF names stored Q8_0 (`gguf.quants.quantize`); the rest F32.
      skip: GGUF names left out.
      meta: ``{key: value}`` metadata under ``{arch}.`` written over the converter's (ints as
        uint32, floats as float32, bools as bool).
      edit: ``edit(gguf_name, array) -> array``, applied to every tensor before it is written.
      dense_arch: name the tensors ``arch``'s map does not know (a dense block's MLP, which
        the converter cannot write for an MoE architecture) as this architecture does.
    """
    layers, heads = hp["num_hidden_layers"], hp["num_attention_heads"]
    kv = hp["num_key_value_heads"]
    head_dim = hp.get("head_dim")
    experts = hp.get("num_local_experts") or hp["num_experts"]
    keys = {
        # TextModel.set_gguf_parameters
        "block_count": layers, "context_length": hp["max_position_embeddings"],
        "embedding_length": hp["hidden_size"], "feed_forward_length": hp["intermediate_size"],
        "attention.head_count": heads, "attention.head_count_kv": kv,
        "rope.freq_base": float((hp.get("rope_parameters") or hp)["rope_theta"]),
        "attention.layer_norm_rms_epsilon": float(hp["rms_norm_eps"]),
        "expert_count": experts, "expert_used_count": hp["num_experts_per_tok"],
    }  # fmt: skip
    if head_dim:
        keys.update({"attention.key_length": head_dim, "attention.value_length": head_dim})
    if arch == "llama":  # LlamaModel
        keys.update(vocab_size=hp["vocab_size"],
                    **{"rope.dimension_count": head_dim or hp["hidden_size"] // heads})
    if arch in ("qwen2moe", "qwen3moe"):  # Qwen2MoeModel
        keys["expert_feed_forward_length"] = hp["moe_intermediate_size"]
        if hp.get("shared_expert_intermediate_size"):
            keys["expert_shared_feed_forward_length"] = hp["shared_expert_intermediate_size"]
    if arch == "olmoe":  # OlmoeModel writes its norm epsilon as a constant
        keys["attention.layer_norm_rms_epsilon"] = 1e-5
    keys.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in keys.items():
        if isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        else:
            w.add_float32(f"{arch}.{key}", value)
    vocab = tiny.vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3 if v in tiny.control else 1 for v in vocab])
    w.add_token_merges(tiny.merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    out: dict[str, np.ndarray] = {}
    stacks: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, value in tensors.items():
        if m := re.fullmatch(_EXPERT_RE, name):
            stacks.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = value
            continue
        if arch == "llama" and name.endswith("q_proj.weight"):  # LlamaModel.permute
            value = tiny.permute(value, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            value = tiny.permute(value, kv)
        out[name] = value
    for (block, proj), per_expert in stacks.items():
        stack = np.stack([per_expert[e] for e in range(experts)], axis=0)
        merged = (f"layers.{block}.feed_forward.experts.{proj}.weight" if arch == "llama"
                  else f"model.layers.{block}.mlp.experts.{proj}.weight")  # fmt: skip
        out[merged] = stack
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for name, value in out.items():
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None and dense_arch:
            dense = gguf.get_tensor_name_map(gguf.MODEL_ARCH[dense_arch.upper()], layers)
            gname = dense.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if gname in skip:
            continue
        value = np.ascontiguousarray(value if edit is None else edit(gname, value), np.float32)
        if gname in quantize:
            qtype = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gname, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _saved(hf, directory):
    from safetensors.numpy import load_file

    hf.save_pretrained(directory)
    hp = json.loads((directory / "config.json").read_text())
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return hp, tensors


@pytest.fixture(scope="module", params=list(CASES))
def twin(request, tmp_path_factory, tiny):
    """(case, transformers model, GGUF path, config.json dict, saved tensors)."""
    case = request.param
    hf = _hf_model(case, len(tiny.vocab()))
    directory = tmp_path_factory.mktemp(case)
    hp, tensors = _saved(hf, directory / "hf")
    path = write_twin(directory / "twin.gguf", hp, tensors, CASES[case][2], tiny)
    return case, hf, path, hp, tensors


IDS = np.random.default_rng(0).integers(3, 200, (2, 24))


def _hf_logits(hf, ids=IDS):
    import torch

    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()


def _close(got, want) -> float:
    scale = max(1.0, float(np.abs(want).max()))
    return float(np.abs(np.asarray(got) - want).max()) / scale


@pytest.mark.reference
def test_twin_loads_to_the_hf_logits(twin):
    """The config read from the metadata is the HF model's, and the logits are transformers'."""
    case, hf, path, hp, _ = twin
    model, params, _ = load(str(path), dtype=jnp.float32)
    c = model.config
    assert c.model_type == hf.config.model_type
    assert (c.num_experts, c.num_experts_per_tok) == (
        hp.get("num_local_experts") or hp["num_experts"], hp["num_experts_per_tok"])
    assert c.norm_topk_prob == (case != "olmoe" and case != "qwen2_moe")
    assert c.moe_layers == (0, 1, 2)
    assert c.shared_expert_intermediate_size == hp.get("shared_expert_intermediate_size", 0)
    got, _ = forward(model, params, jnp.asarray(IDS, jnp.int32))
    assert _close(got, _hf_logits(hf)) < 2e-5


@pytest.mark.slow  # transformers' generate: about 20 s per model here
@pytest.mark.reference
def test_twin_greedy_matches(twin):
    import torch

    _, hf, path, _, _ = twin
    model, params, _ = load(str(path), dtype=jnp.float32)
    prompt, steps = IDS[0, :12].tolist(), 16
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          pad_token_id=0)  # fmt: skip
    got = generate(model, params, prompt, max_new_tokens=steps, stop_tokens=())
    assert got.sequences()[0] == out[0, len(prompt):].tolist()


@pytest.mark.reference
def test_lazy_load_equals_eager(twin):
    _, _, path, _, _ = twin
    eager, lazy = jio.load_gguf(path), jio.load_gguf(path, lazy=True)
    assert set(lazy.tensors) == set(eager.tensors)
    for name in eager.tensors:
        np.testing.assert_array_equal(lazy.tensors[name], eager.tensors[name], err_msg=name)


# ---- llama.cpp ---------------------------------------------------------------------------


@pytest.mark.reference
def test_llama_cpp_runs_the_twin_as_jquant(twin):
    """llama.cpp (llama-cpp-python 0.3.36) evaluates the same file, its KV cache float32
    (``type_k=type_v=0``): its logits agree with jquant's within 2e-5 of the largest. Both
    compute in float32 from the same F32 weights and differ in summation order only (ggml's
    SIMD dot products, softmax, RMSNorm): measured 0.7e-6 to 2.1e-6. With llama.cpp's default
    float16 cache the gap is 1e-3 to 7e-3, which would hide small errors; a wrongly loaded
    expert, router or norm moves the logits by 1e-1 and more."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, _, path, _, _ = twin
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=32, n_batch=32,
                          n_threads=2, verbose=False, seed=0, type_k=0, type_v=0)  # fmt: skip
    model, params, _ = load(str(path), dtype=jnp.float32)
    for row in IDS:
        tokens = [int(t) for t in row]
        llm.reset()
        llm.eval(tokens)
        theirs = np.array(llm.scores[: len(tokens)], np.float32)
        ours = np.asarray(forward(model, params, jnp.asarray([tokens]))[0][0])
        assert _close(theirs, ours) < 2e-5


# ---- packed Q8_0 experts -----------------------------------------------------------------


@pytest.mark.reference
def test_q8_0_experts_load_packed(twin, tmp_path, tiny):
    """A twin with its expert stacks stored Q8_0: ``packed=True`` keeps each stack one
    QArray of logical shape ``(E, in, out)`` whose dequantization is gguf's own dequantizer's,
    each expert transposed; the model runs it as the dequantized load of the same file."""
    case, _, _, hp, tensors = twin
    arch = CASES[case][2]
    layers = range(hp["num_hidden_layers"])
    stacks = tuple(f"blk.{i}.ffn_{p}_exps.weight" for i in layers for p in ("gate", "up", "down"))
    path = write_twin(tmp_path / "q8.gguf", hp, tensors, arch, tiny,
                      quantize=stacks + ("blk.0.ffn_gate_inp.weight",))  # fmt: skip
    packed = jio.load_gguf(path, packed=True)
    file = {t.name: t for t in gguf.GGUFReader(path).tensors}
    moe = [i for i in layers if f"blk.{i}.ffn_gate_exps.weight" in file]
    for i in moe:
        for proj in ("gate", "up", "down"):
            q = packed.tensors[f"model.layers.{i}.mlp.experts.{proj}_proj.weight"]
            t = file[f"blk.{i}.ffn_{proj}_exps.weight"]
            want = gguf.quants.dequantize(t.data, t.tensor_type)  # (E, out, in)
            assert isinstance(q, QArray) and q.shape == np.swapaxes(want, 1, 2).shape
            np.testing.assert_array_equal(np.asarray(q.dequantize()), np.swapaxes(want, 1, 2))
    # A router stored quantized loads as float all the same (its parameter is no Dense kernel).
    assert isinstance(packed.tensors[f"model.layers.{moe[0]}.mlp.gate.weight"], np.ndarray)
    model, params, _ = load(str(path), dtype=jnp.float32, packed=True)
    got, _ = forward(model, params, jnp.asarray(IDS, jnp.int32))
    model, params, _ = load(str(path), dtype=jnp.float32)
    want, _ = forward(model, params, jnp.asarray(IDS, jnp.int32))
    assert _close(got, np.asarray(want)) < 1e-5


# ---- names and bad files -----------------------------------------------------------------


def test_expert_tensor_names():
    pairs = {
        "blk.2.ffn_gate_inp.weight": "model.layers.2.mlp.gate.weight",
        "blk.2.ffn_gate_exps.weight": "model.layers.2.mlp.experts.gate_proj.weight",
        "blk.2.ffn_up_exps.weight": "model.layers.2.mlp.experts.up_proj.weight",
        "blk.2.ffn_down_exps.weight": "model.layers.2.mlp.experts.down_proj.weight",
        "blk.2.ffn_gate_shexp.weight": "model.layers.2.mlp.shared_expert.gate_proj.weight",
        "blk.2.ffn_down_shexp.weight": "model.layers.2.mlp.shared_expert.down_proj.weight",
        "blk.2.ffn_gate_inp_shexp.weight": "model.layers.2.mlp.shared_expert_gate.weight",
    }
    for gguf_name, hf in pairs.items():
        assert jgguf.hf_name(gguf_name, "qwen2moe") == hf
        assert jgguf.gguf_name(hf, "qwen2moe") == gguf_name


def _random_moe(tmp_path, tiny, *, arch="qwen3moe", dense=(), **kwargs):
    """A random two-layer MoE file of ``arch`` (no transformers needed); ``dense``: the
    blocks with a dense MLP."""
    model_type = {"llama": "mixtral", "olmoe": "olmoe", "qwen2moe": "qwen2_moe"}.get(
        arch, "qwen3_moe")  # fmt: skip
    hp = dict(model_type=model_type, mlp_only_layers=list(dense),
              shared_expert_intermediate_size=64 if arch == "qwen2moe" else 0,
              vocab_size=len(tiny.vocab()), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
              num_experts=4, num_local_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=32, tie_word_embeddings=False,
              attention_bias=arch == "qwen2moe")  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32)
               for n, s in jio.expected_shapes(hp).items()}  # fmt: skip
    return write_twin(tmp_path / "m.gguf", hp, tensors, arch, tiny, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "qwen2moe", "qwen3moe", "olmoe"])
def test_random_moe_file_loads(tmp_path, tiny, arch):
    ckpt = jio.load_gguf(_random_moe(tmp_path, tiny, arch=arch))
    config = LlamaConfig.from_hf(ckpt.config)
    assert config.moe_layers == (0, 1) and config.num_experts == 4
    width = 64 if arch in ("llama", "olmoe") else 32  # Mixtral's, OLMoE's: intermediate_size
    assert config.moe_intermediate_size == width
    assert ckpt.tensors["model.layers.1.mlp.experts.down_proj.weight"].shape == (4, 32, width)


def test_squeezed_shared_expert_gate(tmp_path, tiny):
    """A qwen2moe shared-expert gate stored 1-D (``[D]``, which llama.cpp accepts as well as
    the converter's ``[D, 1]``) loads as HF's ``(1, D)``."""
    path = _random_moe(tmp_path, tiny, arch="qwen2moe", edit=lambda name, value: (
        value.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else value))  # fmt: skip
    assert [t.shape.tolist() for t in gguf.GGUFReader(path).tensors
            if t.name == "blk.1.ffn_gate_inp_shexp.weight"] == [[32]]  # fmt: skip
    ckpt = jio.load_gguf(path)
    assert ckpt.tensors["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert ckpt.config["shared_expert_intermediate_size"] == 64


def test_dense_block_of_a_qwen3moe_file(tmp_path, tiny):
    """A block without a router is a dense MLP (``ffn_{gate,up,down}``), as the HF config's
    ``mlp_only_layers`` makes it; ``leading_dense_block_count`` agrees or is refused."""
    meta = {"leading_dense_block_count": 1}
    path = _random_moe(tmp_path, tiny, dense=(0,), dense_arch="qwen3", meta=meta)
    ckpt = jio.load_gguf(path)
    assert ckpt.config["mlp_only_layers"] == [0]
    assert LlamaConfig.from_hf(ckpt.config).moe_layers == (1,)
    assert ckpt.tensors["model.layers.0.mlp.down_proj.weight"].shape == (32, 64)
    path = _random_moe(tmp_path, tiny, dense=(1,), dense_arch="qwen3", meta=meta)
    with pytest.raises(ValueError, match=r"leading_dense_block_count=1, but the blocks "
                       r"without a router are \[1\]"):  # fmt: skip
        jio.load_gguf(path)


@pytest.mark.parametrize("kwargs, match", [
    (dict(meta={"expert_used_count": 5}),
     r"qwen3moe.expert_used_count=5 exceeds qwen3moe.expert_count=4"),
    (dict(meta={"expert_count": 0}), r"qwen3moe.expert_count is 0"),
    (dict(skip=("blk.1.ffn_gate_inp.weight",)),
     r"block 1 has expert tensors but no router: tensor blk.1.ffn_gate_inp.weight is missing"),
    (dict(skip=("blk.1.ffn_up_exps.weight",)), r"missing, e.g. blk.1.ffn_up_exps.weight"),
    (dict(meta={"expert_feed_forward_length": 48}),
     r"tensor blk.0.ffn_gate_exps.weight has shape \(4, 32, 32\), but the config implies "
     r"\(4, 48, 32\)"),
    (dict(meta={"leading_dense_block_count": 1}),
     r"qwen3moe.leading_dense_block_count=1, but the blocks without a router are \[\]"),
    (dict(meta={"expert_gating_func": 2}), r"qwen3moe.expert_gating_func=2 is not supported"),
])  # fmt: skip
def test_bad_moe_file_names_the_problem(tmp_path, tiny, kwargs, match):
    path = _random_moe(tmp_path, tiny, **kwargs)
    with pytest.raises(ValueError, match=match):
        jio.load_gguf(path)


def test_expert_stack_of_another_count_names_the_tensor(tmp_path, tiny):
    """Three experts in one stack of a four-expert file."""
    path = _random_moe(tmp_path, tiny, edit=lambda name, value: value[:3] if name == (
        "blk.1.ffn_up_exps.weight") else value)  # fmt: skip
    with pytest.raises(ValueError, match=r"tensor blk.1.ffn_up_exps.weight has shape "
                       r"\(3, 32, 32\), but the config implies \(4, 32, 32\)"):  # fmt: skip
        jio.load_gguf(path)


def test_fused_gate_up_experts_are_refused(tmp_path, tiny):
    """convert_hf_to_gguf.py --fuse-gate-up-exps: ``torch.cat([gate, up], dim=1)`` per block."""
    path = _random_moe(tmp_path, tiny)
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "fused.gguf"), arch="qwen3moe")
    for field in reader.fields.values():
        if field.name.startswith("qwen3moe."):
            w.add_key_value(field.name, field.contents(), field.types[0])
    w.add_token_list(reader.fields["tokenizer.ggml.tokens"].contents())
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for i in (0, 1):
        gate, up = (tensors.pop(f"blk.{i}.ffn_{p}_exps.weight") for p in ("gate", "up"))
        tensors[f"blk.{i}.ffn_gate_up_exps.weight"] = np.concatenate([gate, up], axis=1)
    for name, value in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tensor blk.0.ffn_gate_up_exps.weight holds gate and "
                       "up experts fused"):  # fmt: skip
        jio.load_gguf(tmp_path / "fused.gguf")


def test_llama_file_with_a_dense_block_is_refused(tmp_path, tiny):
    """Mixtral has no dense layers: a ``llama`` file with experts in some blocks only."""
    path = _random_moe(tmp_path, tiny, arch="llama", skip=(
        "blk.1.ffn_gate_inp.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight",
        "blk.1.ffn_down_exps.weight"))  # fmt: skip
    with pytest.raises(ValueError, match="block 1 has no router .* every llama block is a "
                       "mixture of experts"):  # fmt: skip
        jio.load_gguf(path)
