"""What each `model_type` fixes about the architecture (`Family`, `FAMILIES`), and which layers
attend within a sliding window (`layer_types`: `FULL` or `SLIDING` per layer).

`jquant.arch` re-exports every name here; `LlamaConfig.from_hf` reads a config with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """What a `model_type` fixes about the architecture (the rest is in its config).

    Attributes:
      qkv_bias: q/k/v projections always carry a bias (qwen2), whatever the config says.
      qk_norm: an RMSNorm on the queries and keys before RoPE: over ``head_dim``, every
        head alone, unless `qk_norm_whole`.
      qk_norm_whole: the q/k norms span the whole projection (``heads * head_dim`` and
        ``kv_heads * head_dim``: OLMoE) rather than each head.
      gemma: Gemma's conventions: RMSNorm weight applied as ``1 + w`` and embeddings
        multiplied by ``sqrt(hidden_size)``.
      sandwich_norms: norms after attention and around the MLP (Gemma 2/3).
      activation: the MLP activation when the config names none.
      sliding: how the layers using sliding-window attention are chosen: "none", "all"
        (mistral: every layer when ``sliding_window`` is set), "upper" (qwen2/qwen3: layers
        from ``max_window_layers`` on when ``use_sliding_window``), or "pattern" (gemma2/3:
        every layer but each ``sliding_window_pattern``-th).
      pattern: the default ``sliding_window_pattern``.
      moe: how the config names its mixture-of-experts fields: "none" (dense), "mixtral"
        (``num_local_experts``; every layer sparse; top-k weights always renormalized) or
        "qwen_moe" (``num_experts``, ``moe_intermediate_size``, ``norm_topk_prob``, dense
        layers by ``decoder_sparse_step`` / ``mlp_only_layers``, and Qwen2-MoE's shared
        expert by ``shared_expert_intermediate_size``) or "olmoe" (``num_experts``; every
        layer sparse; experts of width ``intermediate_size``; ``norm_topk_prob``).
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_whole: bool = False
    gemma: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    sliding: str = "none"
    pattern: int = 0
    moe: str = "none"


#: Every `model_type` `LlamaConfig.from_hf` accepts, and what it fixes.
FAMILIES = {
    "llama": Family(),
    "mistral": Family(sliding="all"),
    "qwen2": Family(qkv_bias=True, sliding="upper"),
    "qwen3": Family(qk_norm=True, sliding="upper"),
    "mixtral": Family(sliding="all", moe="mixtral"),
    "qwen2_moe": Family(qkv_bias=True, sliding="upper", moe="qwen_moe"),
    "qwen3_moe": Family(qk_norm=True, sliding="upper", moe="qwen_moe"),
    "olmoe": Family(qk_norm=True, qk_norm_whole=True, moe="olmoe"),
    "gemma": Family(gemma=True, activation="gelu_pytorch_tanh"),
    "gemma2": Family(gemma=True, sandwich_norms=True, activation="gelu_pytorch_tanh",
                     sliding="pattern", pattern=2),
    "gemma3_text": Family(gemma=True, sandwich_norms=True, qk_norm=True,
                          activation="gelu_pytorch_tanh", sliding="pattern", pattern=6),
}  # fmt: skip

#: Attention kinds of `LlamaConfig.layer_types`.
FULL, SLIDING = "full_attention", "sliding_attention"


def layer_types(config: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    """Each layer's attention kind (`FULL` or `SLIDING`) as transformers decides it.

    An explicit ``layer_types`` list wins (transformers 5 writes one); otherwise the family's
    rule (`Family.sliding`) applies to ``sliding_window``, ``use_sliding_window``,
    ``max_window_layers`` and ``sliding_window_pattern``. No window means all `FULL`.
    """
    family = FAMILIES[model_type]
    window = config.get("sliding_window")
    explicit = config.get("layer_types")
    if explicit:  # transformers 5 and jquant's Checkpoint.config write the kinds out
        types = tuple(str(t) for t in explicit)
        if len(types) != num_layers:
            raise ValueError(f"layer_types lists {len(types)} layers, the model has {num_layers}")
        return types if window else (FULL,) * num_layers
    # qwen2/qwen3 files carry a window they use only when use_sliding_window says so.
    if family.sliding == "upper" and not config.get("use_sliding_window", False):
        window = None
    if not window or family.sliding == "none":
        return (FULL,) * num_layers
    if family.sliding == "all":
        return (SLIDING,) * num_layers
    if family.sliding == "upper":
        first = int(config.get("max_window_layers", 28))
        return tuple(SLIDING if i >= first else FULL for i in range(num_layers))
    pattern = int(config.get("sliding_window_pattern") or family.pattern)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))
