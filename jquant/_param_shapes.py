"""`param_shapes`: every parameter path of the model a `LlamaConfig` describes, with its shape.

`jquant.io` checks checkpoints against it (an import, a packed checkpoint) and
`jquant.models.load` builds models to it; `jquant.arch` re-exports it. `hf_name` maps a path
to its Hugging Face state-dict name (here, below `jquant.io` and `jquant.models`, which both
need it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jquant.arch import LlamaConfig

_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias",
            "weight": "weight"}  # fmt: skip


def hf_name(path: tuple) -> str:
    """The HF state-dict name of a jquant parameter path.

    >>> hf_name(("layers", 3, "mlp", "down_proj", "kernel"))
    'model.layers.3.mlp.down_proj.weight'
    >>> hf_name(("lm_head", "kernel"))
    'lm_head.weight'
    """
    *head, leaf = (str(p) for p in path)
    name = ".".join([*head, _HF_LEAF[leaf]])
    return name if head[0] == "lm_head" else f"model.{name}"


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path of the `jquant.models.Llama` that ``config`` describes, with its
    shape (the table in `jquant.models.llama`'s docstring; a test holds it to the model).

    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=1,
    ...                   num_heads=4, num_kv_heads=2)
    >>> param_shapes(cfg)["layers/0/self_attn/k_proj/kernel"]
    (64, 32)
    """
    d, f, v, dh = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    q_out, kv_out = config.num_heads * dh, config.num_kv_heads * dh
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens/embedding": (v, d), "norm/scale": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head/kernel"] = (d, v)
    for i in range(config.num_layers):
        p = f"layers/{i}/"
        attn = {"q_proj": (d, q_out), "k_proj": (d, kv_out), "v_proj": (d, kv_out),
                "o_proj": (q_out, d)}  # fmt: skip
        for proj, shape in attn.items():
            shapes[f"{p}self_attn/{proj}/kernel"] = shape
            if (config.qkv_bias and proj != "o_proj") or (config.o_bias and proj == "o_proj"):
                shapes[f"{p}self_attn/{proj}/bias"] = shape[1:]
        if config.qk_norm:  # per head, or the whole projection (OLMoE)
            whole = config.qk_norm_whole
            shapes[f"{p}self_attn/q_norm/scale"] = (q_out if whole else dh,)
            shapes[f"{p}self_attn/k_norm/scale"] = (kv_out if whole else dh,)
        if config.is_moe(i):  # jquant.models.moe.MoE: router (E, D) as HF stores it, experts
            e, fe = config.num_experts, config.moe_intermediate_size
            shapes[f"{p}mlp/gate/weight"] = (e, d)
            for proj, shape in {"gate_proj": (e, d, fe), "up_proj": (e, d, fe),
                                "down_proj": (e, fe, d)}.items():  # fmt: skip
                shapes[f"{p}mlp/experts/{proj}/kernel"] = shape
            if fs := config.shared_expert_intermediate_size:
                for proj, shape in {"gate_proj": (d, fs), "up_proj": (d, fs),
                                    "down_proj": (fs, d)}.items():  # fmt: skip
                    shapes[f"{p}mlp/shared_expert/{proj}/kernel"] = shape
                shapes[f"{p}mlp/shared_expert_gate/kernel"] = (d, 1)
        else:
            for proj, shape in {"gate_proj": (d, f), "up_proj": (d, f),
                                "down_proj": (f, d)}.items():  # fmt: skip
                shapes[f"{p}mlp/{proj}/kernel"] = shape
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            shapes[f"{p}{norm}/scale"] = (d,)
    return shapes
