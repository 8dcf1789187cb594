"""Mixture-of-experts models written as GGUF: what `jquant.io.gguf_export.write_gguf` adds
for Mixtral (llama.cpp's ``llama`` with experts), Qwen2-MoE (``qwen2moe``), Qwen3-MoE
(``qwen3moe``) and OLMoE (``olmoe``), as `jquant.io._gguf_moe` reads them back.

Tensors: the router ``mlp/gate/weight`` ``(E, D)`` as it is (``ffn_gate_inp``, ggml
``[D, E]``); each expert stack ``(E, in, out)`` as ``(E, out, in)`` (``ffn_{gate,up,down}_exps``,
ggml ``[in, out, E]``, each expert's rows after the previous expert's), a quantized stack's
blocks as its QArray stores them; Qwen2-MoE's shared expert (``ffn_*_shexp``) and its gate
``(D, 1)`` as ``ffn_gate_inp_shexp`` ``[D, 1]``. Keys: ``expert_count``,
``expert_used_count``, and for the Qwen families ``expert_feed_forward_length`` (Mixtral's and
OLMoE's experts are ``feed_forward_length`` wide) and Qwen2-MoE's
``expert_shared_feed_forward_length``.

Refused, because llama.cpp's architecture would compute something else: a dense layer among
the sparse ones (its four architectures route every block through experts and load no dense
MLP there: Qwen's ``mlp_only_layers``, ``decoder_sparse_step``); top-k weights normalized
otherwise than the architecture always does (llama and qwen3moe renormalize, qwen2moe and
olmoe do not, whatever ``expert_weights_norm`` says); a Qwen2-MoE without a shared expert
(llama.cpp requires one); an OLMoE whose q/k norms are not ``hidden_size`` wide (grouped
key/value heads, or heads × head_dim ≠ hidden_size).
"""

from __future__ import annotations

import gguf

from jquant.arch import LlamaConfig

#: jquant MoE model type -> the GGUF architecture it is written as.
ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                 "olmoe": "olmoe"}  # fmt: skip
# Whether llama.cpp's graph renormalizes the top-k routing weights (build_moe_ffn's norm_w,
# fixed per architecture).
_NORMALIZED = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}


def problems(cfg: LlamaConfig, arch: str) -> list[str]:
    """What llama.cpp's ``arch`` would compute otherwise for MoE model ``cfg``, each naming
    the config field."""
    out = []
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe(i)]
    if dense:
        out.append(f"dense MLP layers {dense} (mlp_only_layers / decoder_sparse_step; "
                   f"llama.cpp's {arch} routes every layer through experts)")  # fmt: skip
    if cfg.norm_topk_prob != _NORMALIZED[arch]:
        does = "renormalizes" if _NORMALIZED[arch] else "does not renormalize"
        out.append(f"norm_topk_prob={cfg.norm_topk_prob} (llama.cpp's {arch} {does} the "
                   "top-k routing weights)")  # fmt: skip
    if arch == "qwen2moe" and not cfg.shared_expert_intermediate_size:
        out.append("shared_expert_intermediate_size=0 (llama.cpp's qwen2moe requires a "
                   "shared expert)")  # fmt: skip
    if arch == "olmoe":
        widths = {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim}
        if any(w != cfg.hidden_size for w in widths.values()):
            out.append(f"q/k norms {widths['q']} and {widths['k']} wide (num_attention_heads "
                       f"{cfg.num_heads}, num_key_value_heads {cfg.num_kv_heads}, head_dim "
                       f"{cfg.head_dim}; llama.cpp's olmoe wants both hidden_size "
                       f"{cfg.hidden_size})")  # fmt: skip
    return out


def add_metadata(w: gguf.GGUFWriter, cfg: LlamaConfig) -> None:
    """The expert keys of ``w.arch``, as llama.cpp's converter writes them."""
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if w.arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if w.arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
