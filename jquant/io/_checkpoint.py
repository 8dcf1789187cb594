"""The interchange format every importer returns, and the checks every importer shares.

Terminology: "HF layout" means tensor names and shapes exactly as Hugging Face transformers'
`LlamaForCausalLM` (or `Qwen2ForCausalLM`) state dict has them: linear weights are (out, in),
the embedding is (vocab, hidden). Importers convert whatever the file stores into that layout,
so the model code only ever sees one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jquant.arch import FAMILIES, SUPPORTED_MODEL_TYPES, LlamaConfig

from ._lazy import shape_of

__all__ = ["CONFIG_KEYS", "MOE_CONFIG_KEYS", "SUPPORTED_MODEL_TYPES", "Checkpoint", "check_tensors",
           "expected_shapes", "normalize_rope"]  # fmt: skip

#: Keys every `Checkpoint.config` has, HF `config.json` style.
CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "sliding_window",
    "bos_token_id",
    "eos_token_id",
    "hidden_act",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "layer_types",
    "rope_local_base_freq",
)

#: Keys a mixture-of-experts family's `Checkpoint.config` has besides `CONFIG_KEYS` (as
#: transformers' Qwen3-MoE config names them; `jquant.arch.LlamaConfig.from_hf` reads them
#: for Mixtral too): ``mlp_only_layers`` lists the dense layers, ``decoder_sparse_step`` is 1.
MOE_CONFIG_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                   "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step",
                   "shared_expert_intermediate_size")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A float model as read from disk: config, HF-layout tensors, tokenizer.

    Attributes:
      config: HF `config.json`-style dict with exactly the keys of `CONFIG_KEYS`. `rope_scaling`
        is None or a dict with a `"rope_type"` key (`"linear"`, `"yarn"`, `"llama3"`, ...).
        `attention_bias` is True when q/k/v carry biases; for `"qwen2"` that is q/k/v only (no
        `o_proj.bias`), for `"llama"` it is q/k/v/o. `sliding_window` is None unless the model
        really uses one, and `layer_types` then lists each layer's attention kind
        (`"sliding_attention"` or `"full_attention"`; None: all full). `hidden_act`,
        `query_pre_attn_scalar`, the two soft-caps and `rope_local_base_freq` (Gemma 3's
        sliding layers' RoPE base) are None where the family has no such thing.
      tensors: float32 numpy arrays in HF layout (see `expected_shapes`); an imported
        quantized checkpoint (GPTQ, AWQ, compressed-tensors, a GGUF loaded ``packed``) holds
        a `jquant.QArray` of logical shape ``(in, out)`` for each quantized matrix.
        `lm_head.weight` is absent when `config["tie_word_embeddings"]` is True. A dict,
        or, loaded with ``lazy=True``, a `LazyTensors` holding the same names and values
        that reads each tensor from disk when it is looked up.
      tokenizer: a `jquant.io.Tokenizer`, or None when the source carries none.
      source: where the checkpoint came from (a path or a hub id), for messages and reports.
    """

    config: dict[str, Any]  # HF config.json-style keys, see CONFIG_KEYS
    tensors: Mapping[str, np.ndarray]  # float32, HF names and (out, in) layout; dict or lazy
    tokenizer: Any  # jquant.io.Tokenizer or None
    source: str  # a path or hub id

    @property
    def num_parameters(self) -> int:
        """Number of stored float values (tied embeddings counted once); reads no data."""
        return sum(math.prod(shape_of(self.tensors, n)) for n in self.tensors)


def expected_shapes(config: dict[str, Any], *,
                    stacked_experts: bool = False) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Every tensor name a checkpoint with this config must have, with its HF-layout shape.

    Args:
      config: a dict with the keys of `CONFIG_KEYS` (and `MOE_CONFIG_KEYS` for an MoE family).
      stacked_experts: an MoE layer's experts as one tensor per projection,
        ``mlp.experts.{gate,up,down}_proj.weight`` ``(E, out, in)``, and its router as
        ``mlp.gate.weight`` (the names `jquant.models.params_to_hf` writes, and a GGUF's
        layout), instead of the per-expert Linears of transformers' ``save_pretrained``.

    Returns:
      `{name: shape}`; linear weights are (out_features, in_features).

    >>> cfg = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...            num_attention_heads=2, num_key_value_heads=1, head_dim=4,
    ...            tie_word_embeddings=True, attention_bias=False, model_type="llama")
    >>> expected_shapes(cfg)["model.layers.0.self_attn.k_proj.weight"]
    (4, 8)
    """
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    moe = None
    if FAMILIES[config["model_type"]].moe != "none":
        moe = LlamaConfig.from_hf(config)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = {
            "q_proj": (q_out, d),
            "k_proj": (kv_out, d),
            "v_proj": (kv_out, d),
            "o_proj": (d, q_out),
        }
        for proj, shape in attn.items():
            shapes[f"{p}self_attn.{proj}.weight"] = shape
        family = FAMILIES[config["model_type"]]
        if config["attention_bias"]:
            biased = ("q_proj", "k_proj", "v_proj")
            if not family.qkv_bias:
                biased += ("o_proj",)
            for proj in biased:
                shapes[f"{p}self_attn.{proj}.bias"] = attn[proj][:1]
        if family.qk_norm:  # per head, or the whole projection (OLMoE)
            whole = family.qk_norm_whole
            shapes[f"{p}self_attn.q_norm.weight"] = (q_out if whole else config["head_dim"],)
            shapes[f"{p}self_attn.k_norm.weight"] = (kv_out if whole else config["head_dim"],)
        if family.sandwich_norms:
            shapes[f"{p}pre_feedforward_layernorm.weight"] = (d,)
            shapes[f"{p}post_feedforward_layernorm.weight"] = (d,)
        if moe is not None and moe.is_moe(i):
            shapes.update(_moe_shapes(moe, p, stacked_experts))
        else:
            shapes[f"{p}mlp.gate_proj.weight"] = (f, d)
            shapes[f"{p}mlp.up_proj.weight"] = (f, d)
            shapes[f"{p}mlp.down_proj.weight"] = (d, f)
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
    return shapes


def _moe_shapes(config, prefix: str, stacked: bool) -> dict[str, tuple[int, ...]]:
    """An MoE layer's tensors as transformers' save_pretrained writes them: one Linear per
    expert, ``mlp.experts.{e}.{gate,up,down}_proj`` and the router ``mlp.gate`` (Qwen-MoE,
    OLMoE), ``block_sparse_moe.experts.{e}.w1/w3/w2`` and ``block_sparse_moe.gate`` (Mixtral);
    or, `stacked`, ``mlp.experts.{gate,up,down}_proj`` ``(E, out, in)`` and ``mlp.gate``."""
    d, f, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    projs = (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))
    if stacked:
        shapes = {f"{prefix}mlp.gate.weight": (e, d)}
        shapes.update({f"{prefix}mlp.experts.{p}.weight": (e, *s) for p, s in projs})
    else:
        block, names = "mlp", {p: p for p, _ in projs}
        if config.model_type == "mixtral":
            block, names = "block_sparse_moe", {"gate_proj": "w1", "up_proj": "w3",
                                                "down_proj": "w2"}  # fmt: skip
        shapes = {f"{prefix}{block}.gate.weight": (e, d)}
        for i in range(e):
            for proj, shape in projs:
                shapes[f"{prefix}{block}.experts.{i}.{names[proj]}.weight"] = shape
    if fs := config.shared_expert_intermediate_size:  # Qwen2-MoE
        for proj, shape in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
            shapes[f"{prefix}mlp.shared_expert.{proj}.weight"] = shape
        shapes[f"{prefix}mlp.shared_expert_gate.weight"] = (1, d)
    return shapes


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    config: dict[str, Any],
    source: str,
    *,
    file_name: Callable[[str], str] | None = None,
    stacked_experts: bool = False,
) -> None:
    """Raise a `ValueError` unless `tensors` has exactly the names and shapes `config` implies.

    Args:
      tensors: HF-named arrays, or a `LazyTensors` (checked from its shapes, no data read).
      config: the checkpoint config.
      source: the file or directory, named in the message.
      file_name: maps an HF name to what the file calls that tensor, for messages.
      stacked_experts: MoE experts stacked per projection (see `expected_shapes`).
    """
    file_name = file_name or (lambda name: name)
    expected = expected_shapes(config, stacked_experts=stacked_experts)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shown = lambda names: ", ".join(file_name(n) for n in names[:5])
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} tensor(s) the config requires are missing, e.g. "
            f"{shown(missing)}. The file is incomplete or does not match its config; "
            "re-download or re-export it."
        )
    if unexpected:
        raise ValueError(
            f"{source}: unexpected tensor(s) {shown(unexpected)}: this architecture variant is "
            "not supported by jquant's Llama-family importer."
        )
    for name, shape in expected.items():
        if (found := shape_of(tensors, name)) != shape:
            raise ValueError(
                f"{source}: tensor {file_name(name)} has shape {found}, "
                f"but the config implies {shape} (as {name}); the config and weights disagree."
            )


def normalize_rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """`(rope_theta, rope_scaling)` from either transformers 4 or 5 style config keys.

    transformers 5 writes `rope_parameters: {"rope_type", "rope_theta", ...}`; 4.x writes
    `rope_theta` plus `rope_scaling` (which older files spell with `"type"`).
    """
    params = dict(raw.get("rope_parameters") or {})
    theta = params.pop("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = params or dict(raw.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling
