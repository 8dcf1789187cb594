"""Mixture-of-experts GGUF files: llama.cpp's expert tensors and metadata, as `load_gguf`
reads them (`jquant.models.moe` runs the result).

Architectures: ``llama`` with ``llama.expert_count`` (Mixtral, as llama.cpp's
convert_hf_to_gguf.py writes it; it loads as `model_type` ``mixtral``), ``qwen2moe``,
``qwen3moe`` and ``olmoe``.

Tensors, per block ``N``. The converter stacks each projection's experts into one torch tensor
``(E, out, in)``; ggml lists dimensions fastest-first, so the file says ``[in, out, E]``, and
read slowest-first each expert's matrix is HF's ``(out, in)`` under a leading expert axis.
They load under the stacked names `jquant.models.params_to_hf` writes (``expected_shapes``
with ``stacked_experts``)::

    blk.N.ffn_gate_inp.weight          [D, E]     mlp.gate.weight                  (E, D)
    blk.N.ffn_{gate,up}_exps.weight    [D, F, E]  mlp.experts.{gate,up}_proj.weight  (E, F, D)
    blk.N.ffn_down_exps.weight         [F, D, E]  mlp.experts.down_proj.weight       (E, D, F)
    blk.N.ffn_{gate,up,down}_shexp     (qwen2moe) mlp.shared_expert.{gate,up,down}_proj
    blk.N.ffn_gate_inp_shexp.weight    [D, 1]     mlp.shared_expert_gate.weight      (1, D)

(a squeezed ``[D]`` shared-expert gate, which llama.cpp also accepts, loads as ``(1, D)``).
A block with a router is sparse; one without uses the dense ``ffn_{gate,up,down}``.

Metadata (``{arch}.`` keys): ``expert_count`` and ``expert_used_count`` (top-k);
``expert_feed_forward_length`` (one expert's width; qwen2moe/qwen3moe; llama and olmoe
experts are ``feed_forward_length`` wide); ``expert_shared_feed_forward_length`` (qwen2moe;
``feed_forward_length`` when absent, as llama.cpp defaults it). Routing is llama.cpp's for
each architecture: softmax, top k, and the k weights renormalized for ``llama`` (Mixtral) and
``qwen3moe`` but not for ``qwen2moe`` and ``olmoe``, unless the file's
``expert_weights_norm`` says otherwise. ``leading_dense_block_count``, where a file has it,
must agree with the blocks that have no router. Sigmoid gating (``expert_gating_func``) and
a weights scale (``expert_weights_scale``) other than 1 are refused, and so is the converter's
optional ``ffn_gate_up_exps`` (gate and up stacks fused, ``--fuse-gate-up-exps``).
"""

from __future__ import annotations

import re
from typing import Any

import gguf

#: GGUF MoE architectures -> HF model_type (a ``llama`` file with experts is ``mixtral``).
MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}

#: llama.cpp block tensor -> HF name part (under ``model.layers.N.``), jquant's stacked names.
BLOCK_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}

# Whether llama.cpp renormalizes the top-k routing weights (its build_moe_ffn's norm_w).
_NORMALIZED = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
# Architectures whose every block is sparse (the HF families have no dense layers).
_ALL_SPARSE = ("llama", "olmoe")
_EXPERT_PARTS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def model_type(meta: dict[str, Any], arch: str) -> str | None:
    """The HF model_type of an MoE file of architecture ``arch``, or None for a dense one."""
    if arch == "llama" and meta.get("llama.expert_count"):
        return "mixtral"
    return MODEL_TYPES.get(arch)


def is_router(hf: str) -> bool:
    """Whether HF name ``hf`` is an MoE router (loaded as float even with ``packed``: its
    parameter is an ``(E, D)`` weight, not a Dense kernel)."""
    return hf.endswith(".mlp.gate.weight")


def config_keys(meta: dict[str, Any], arch: str, tensor_names: set[str], layers: int,
                ffn: int, source: str) -> dict[str, Any]:  # fmt: skip
    """The `jquant.io.MOE_CONFIG_KEYS` of an MoE file (empty for a dense one).

    Args:
      meta: the file's metadata.
      arch: its ``general.architecture``.
      tensor_names: the file's tensor names; a block is sparse when it has a router.
      layers, ffn: ``block_count`` and ``feed_forward_length``.
      source: the file, named in errors.

    Raises:
      ValueError: naming the key or tensor: a missing or out-of-range expert count or top-k,
        expert tensors without a router, dense blocks where the architecture has none or
        where ``leading_dense_block_count`` says otherwise, unsupported gating, gate and up
        experts fused into one tensor.
    """
    kind = model_type(meta, arch)
    if kind is None:
        return {}

    def key(name: str) -> str:
        return f"{arch}.{name}"

    for name in ("expert_count", "expert_used_count"):
        value = meta.get(key(name))
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: metadata key {key(name)} is {value!r}; an MoE file "
                             "needs a positive int there")  # fmt: skip
    experts, used = meta[key("expert_count")], meta[key("expert_used_count")]
    if used > experts:
        raise ValueError(f"{source}: {key('expert_used_count')}={used} exceeds "
                         f"{key('expert_count')}={experts}: each token is routed to that many "
                         "distinct experts")  # fmt: skip
    if meta.get(key("expert_gating_func"), gguf.ExpertGatingFuncType.SOFTMAX) != (
        gguf.ExpertGatingFuncType.SOFTMAX
    ):
        raise ValueError(f"{source}: {key('expert_gating_func')}="
                         f"{meta[key('expert_gating_func')]} is not supported; jquant's "
                         "router is a softmax (1)")  # fmt: skip
    if (scale := float(meta.get(key("expert_weights_scale"), 1.0))) != 1.0:
        raise ValueError(f"{source}: {key('expert_weights_scale')}={scale:g} is not "
                         "supported (only 1)")  # fmt: skip
    if fused := sorted(n for n in tensor_names if n.endswith(".ffn_gate_up_exps.weight")):
        raise ValueError(f"{source}: tensor {fused[0]} holds gate and up experts fused "
                         "(convert_hf_to_gguf.py --fuse-gate-up-exps), which jquant does not "
                         "read; convert without that option")  # fmt: skip
    dense = _dense_blocks(tensor_names, layers, source)
    if dense and arch in _ALL_SPARSE:
        raise ValueError(f"{source}: block {dense[0]} has no router (blk.{dense[0]}."
                         f"ffn_gate_inp.weight) but every {arch} block is a mixture of "
                         "experts")  # fmt: skip
    leading = meta.get(key("leading_dense_block_count"))
    if leading is not None and dense != list(range(leading)):
        raise ValueError(f"{source}: {key('leading_dense_block_count')}={leading}, but the "
                         f"blocks without a router are {dense}")  # fmt: skip
    width = meta.get(key("expert_feed_forward_length"))
    if width is None and arch in ("qwen2moe", "qwen3moe"):
        raise ValueError(f"{source}: metadata key {key('expert_feed_forward_length')} is "
                         "missing; the file is damaged")  # fmt: skip
    shared = 0
    if arch == "qwen2moe" and any(n.endswith("ffn_gate_shexp.weight") for n in tensor_names):
        shared = meta.get(key("expert_shared_feed_forward_length"), ffn)
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": width or ffn,
        "norm_topk_prob": bool(meta.get(key("expert_weights_norm"), _NORMALIZED[arch])),
        "mlp_only_layers": dense,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": shared,
    }


def _dense_blocks(tensor_names: set[str], layers: int, source: str) -> list[int]:
    """The blocks without a router; a block with expert stacks but no router is an error."""
    parts: dict[int, set[str]] = {}
    for name in tensor_names:
        if (m := _BLOCK.fullmatch(name)) and m.group(2) in _EXPERT_PARTS:
            parts.setdefault(int(m.group(1)), set()).add(m.group(2))
    for block in sorted(parts):
        if "ffn_gate_inp" not in parts[block]:
            raise ValueError(f"{source}: block {block} has expert tensors but no router: "
                             f"tensor blk.{block}.ffn_gate_inp.weight is missing")  # fmt: skip
    return [i for i in range(layers) if i not in parts]
