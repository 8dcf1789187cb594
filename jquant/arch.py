"""`LlamaConfig`: the architecture of a decoder-only model, read from an HF config dict.

This module imports nothing of jquant but its own helpers, which it re-exports: `Family`,
`FAMILIES` and `layer_types` (`jquant._families`), `param_shapes` (every parameter's shape,
`jquant._param_shapes`) and `rope_inv_freq` (RoPE frequencies, `jquant._rope`). `jquant.io`
reads configs with it and `jquant.models` builds models from it (`jquant.models.config`
re-exports it), so io never imports models.

One config covers the decoder families that share Llama's skeleton (RMSNorm, RoPE attention
with grouped key/value heads, a gated MLP): `llama` (SmolLM2 is one), `mistral`, `qwen2`,
`qwen3`, `gemma`, `gemma2` and `gemma3_text`, and the mixture-of-experts families `mixtral`,
`qwen2_moe`, `qwen3_moe` and `olmoe` (the MLP of some or all layers replaced by routed experts,
`jquant.models.moe`). What differs between them is data, not code, and
`FAMILIES` holds it per `model_type`:

* q/k/v biases (qwen2); RMSNorm of every query and key head before RoPE (qwen3, gemma3), or of
  the whole query and key projections (olmoe);
* Gemma's RMSNorm weight applied as ``1 + w`` and its embeddings scaled by ``sqrt(hidden)``;
* Gemma 2/3's "sandwich" norms: after attention and around the MLP, not only before;
* the MLP's activation (SiLU, or GELU with the tanh approximation in Gemma's GeGLU);
* the attention scale (``query_pre_attn_scalar ** -0.5`` in Gemma 2/3), tanh soft-capping of
  attention scores and final logits (Gemma 2);
* sliding-window attention: which layers use it (``layer_types``), the window, and the
  RoPE base of those local layers (Gemma 3 rotates them with 10,000, global ones with 1e6).

>>> cfg = LlamaConfig.from_hf({"model_type": "gemma2", "vocab_size": 256, "hidden_size": 64,
...     "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
...     "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 32})
>>> cfg.layer_types[:2], cfg.sandwich_norms, cfg.norm_offset
(('sliding_attention', 'full_attention'), True, 1.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jquant._families import FAMILIES as FAMILIES
from jquant._families import FULL as FULL
from jquant._families import SLIDING as SLIDING
from jquant._families import Family as Family
from jquant._families import layer_types as layer_types
from jquant._param_shapes import param_shapes as param_shapes
from jquant._rope import rope_inv_freq as rope_inv_freq
from jquant._rotation import HF_KEY as ROTATION_KEY
from jquant._rotation import Rotation as Rotation
from jquant._rotation import rotation_blocker

#: `model_type` values `LlamaConfig.from_hf` accepts.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

#: MLP activations implemented (HF `hidden_act` / `hidden_activation` names).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")

#: RoPE `rope_type` values implemented (`rope_scaling["rope_type"]`; None means "default").
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: The RoPE bases `LlamaConfig` accepts: real checkpoints use 10,000 (Llama 2, Gemma) to
#: 1e6 (Qwen, Mistral) and beyond for long context; a base near 1 rotates every dimension
#: by whole turns within a few tokens.
_ROPE_THETA = (100.0, 1e12)

#: Gemma3TextConfig's defaults, for what a multimodal Gemma 3 `text_config` leaves out.
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    max_position_embeddings=131_072, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_local_base_freq=10_000.0, sliding_window=4096, query_pre_attn_scalar=256,
    bos_token_id=2, eos_token_id=1, tie_word_embeddings=True)  # fmt: skip


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The text decoder's config of a multimodal Gemma 3 `config.json` (`model_type: "gemma3"`):
    its `text_config` over Gemma3TextConfig's defaults, as `"gemma3_text"`, with the top
    level's token ids and embedding tying where it sets them. Any other dict is returned as is.
    """
    if config.get("model_type") != "gemma3" or not isinstance(config.get("text_config"), Mapping):
        return config
    top = ("tie_word_embeddings", "bos_token_id", "eos_token_id")
    top = {k: config[k] for k in top if config.get(k) is not None}
    return {**_GEMMA3_TEXT_DEFAULTS, **config["text_config"], **top, "model_type": "gemma3_text"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Architecture hyperparameters of a Llama-family decoder (hashable: it is jit-static).

    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> cfg.head_dim, cfg.num_groups
    (16, 2)
    """

    vocab_size: int  # rows of the embedding table and of the logits
    hidden_size: int  # model width D
    intermediate_size: int  # MLP width F
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads; num_heads must be a multiple (GQA)
    head_dim: int = 0  # per-head width; 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_type: str = "default"  # "default", "linear" or "llama3" frequency scaling
    rope_factor: float = 1.0  # "linear"/"llama3": how much longer the context is made
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_position: int = 8192  # "llama3" only: pretraining context
    max_position_embeddings: int = 2048  # longest context the model supports
    tie_word_embeddings: bool = False  # LM head = embedding table (no lm_head/kernel)
    qkv_bias: bool = False  # q/k/v projections carry a bias (qwen2)
    o_bias: bool = False  # o_proj carries a bias (llama with attention_bias=True)
    mlp_bias: bool = False  # unsupported when True; kept so from_hf can reject it
    model_type: str = "llama"  # the HF model_type it came from
    bos_token_id: int | None = None  # from the config; the tokenizer decides whether to add it
    eos_token_ids: tuple[int, ...] = ()  # default stop tokens for generation
    hidden_act: str = "silu"  # MLP activation: down(act(gate(x)) * up(x))
    qk_norm: bool = False  # RMSNorm (head_dim) on query and key heads before RoPE
    qk_norm_whole: bool = False  # the qk_norm spans the whole projection (heads * head_dim),
    #   not one head (OLMoE)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): 1 for Gemma
    embed_scale: float = 1.0  # embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    sandwich_norms: bool = False  # Gemma 2/3: post-attention, pre- and post-MLP norms
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (else head_dim)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the output logits (Gemma 2)
    sliding_window: int | None = None  # a sliding layer's query sees its last `window` tokens
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; () means all FULL
    rope_local_theta: float | None = None  # RoPE base of sliding layers (default rope, no
    #   scaling); None: they rotate as the full-attention layers do
    num_experts: int = 0  # experts per mixture-of-experts layer; 0: a dense model
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # one expert's MLP width; 0 means intermediate_size
    norm_topk_prob: bool = True  # the top-k routing weights are renormalized to sum to 1
    moe_layers: tuple[int, ...] = ()  # which layers are MoE (the rest dense MLPs)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: width of the shared expert every
    #   token also goes through (its output gated by a sigmoid); 0: none
    rotation: Rotation | None = None  # what `jquant.rotate` left to do online; None: the
    #   model is not rotated

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig: {name}={value!r} must be a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not isinstance(self.head_dim, int) or self.head_dim < 0:
            raise ValueError(
                f"LlamaConfig: head_dim={self.head_dim!r} must be a positive int (or 0: "
                "hidden_size // num_heads)"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"LlamaConfig: rope_type={self.rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.mlp_bias:
            raise ValueError("LlamaConfig: mlp_bias=True is not supported")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"LlamaConfig: hidden_act={self.hidden_act!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {
                FULL, SLIDING
            }:
                raise ValueError(
                    f"LlamaConfig: layer_types must list {FULL!r} or {SLIDING!r} for each of "
                    f"the {self.num_layers} layers; got {self.layer_types!r}"
                )
            if SLIDING in self.layer_types and not (self.sliding_window or 0) > 0:
                raise ValueError("LlamaConfig: sliding layers need a positive sliding_window")
        if self.qk_norm_whole and not self.qk_norm:
            raise ValueError("LlamaConfig: qk_norm_whole=True needs qk_norm=True")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig: model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self._check_moe()
        self._check_ranges()
        if self.rotation is not None and (why := rotation_blocker(self)):
            raise ValueError(f"LlamaConfig: rotation is not possible: {why}")

    def _check_moe(self) -> None:
        """Mixture-of-experts fields consistent: top-k within the expert count, MoE layers
        only with experts and only among the model's layers."""
        if not self.num_experts and not self.moe_layers:
            return
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(
                f"LlamaConfig: num_experts={self.num_experts!r} must be a positive int when "
                f"moe_layers={self.moe_layers!r} are given"
            )
        k = self.num_experts_per_tok
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(
                f"LlamaConfig: num_experts_per_tok={k!r} must be an int in [1, num_experts="
                f"{self.num_experts}]: each token is routed to that many distinct experts"
            )
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size < 0:
            raise ValueError(
                f"LlamaConfig: moe_intermediate_size={self.moe_intermediate_size!r} must be a "
                "positive int (or 0: intermediate_size)"
            )
        if not isinstance(self.shared_expert_intermediate_size, int) or (
            self.shared_expert_intermediate_size < 0
        ):
            raise ValueError(
                "LlamaConfig: shared_expert_intermediate_size="
                f"{self.shared_expert_intermediate_size!r} must be an int >= 0 (0: none)"
            )
        if self.moe_intermediate_size == 0:
            object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
        bad = [i for i in self.moe_layers if not isinstance(i, int) or
               not 0 <= i < self.num_layers]  # fmt: skip
        if bad or len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(
                f"LlamaConfig: moe_layers={self.moe_layers!r} must list distinct layer indices "
                f"in [0, num_layers={self.num_layers})"
            )

    def _check_ranges(self) -> None:
        """Every number within what real checkpoints of the families use (a value outside,
        e.g. ``rope_theta=1`` or ``rms_norm_eps=10``, runs but gives garbage)."""
        floats = [("rms_norm_eps", 0.0, 1e-3, False), ("rope_theta", *_ROPE_THETA, True),
                  ("embed_scale", 0.0, math.inf, False)]  # fmt: skip
        if self.rope_local_theta is not None:
            floats.append(("rope_local_theta", *_ROPE_THETA, True))
        if self.rope_type != "default":
            floats.append(("rope_factor", 1.0, math.inf, True))
        if self.rope_type == "llama3":
            floats.append(("rope_low_freq_factor", 0.0, math.inf, False))
            floats.append(("rope_high_freq_factor", self.rope_low_freq_factor, math.inf, False))
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None:
                floats.append((name, 0.0, math.inf, False))
        for name, low, high, closed in floats:
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            inside = number and math.isfinite(value) and (
                low <= value if closed else low < value) and value <= high  # fmt: skip
            if not inside:
                high_text = "" if high == math.inf else f", at most {high:g}"
                raise ValueError(
                    f"LlamaConfig: {name}={value!r} is out of range: it must be a finite number "
                    f"{'>=' if closed else '>'} {low:g}{high_text}"
                )
        if self.rope_type == "llama3" and not (
            isinstance(self.rope_original_max_position, int)
            and self.rope_original_max_position > 0
        ):
            raise ValueError(
                f"LlamaConfig: rope_original_max_position={self.rope_original_max_position!r} "
                "must be a positive int"
            )
        if self.sliding_window is not None and not (
            isinstance(self.sliding_window, int) and self.sliding_window >= 1
        ):
            raise ValueError(
                f"LlamaConfig: sliding_window={self.sliding_window!r} must be an int >= 1 "
                "(or None: no sliding window)"
            )
        bos = () if self.bos_token_id is None else (self.bos_token_id,)
        for name, ids in (("bos_token_id", bos), ("eos_token_ids", self.eos_token_ids)):
            bad = [i for i in ids if not isinstance(i, int | np.integer) or
                   not 0 <= i < self.vocab_size]  # fmt: skip
            if bad:
                raise ValueError(
                    f"LlamaConfig: {name} {bad[0]!r} is out of range: token ids must be in "
                    f"[0, vocab_size={self.vocab_size})"
                )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends within the sliding window only."""
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    def is_moe(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` runs a mixture of experts (else a dense MLP)."""
        return layer in self.moe_layers

    @property
    def has_sliding(self) -> bool:
        """Whether any layer uses sliding-window attention."""
        return SLIDING in self.layer_types

    @property
    def attn_scale(self) -> float:
        """The factor on ``q . k`` before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from an HF `config.json` dict (transformers 4 or 5 style).

        Args:
          config: the dict; `model_type` must be one of `SUPPORTED_MODEL_TYPES`, or `"gemma3"`
            with a `text_config` (see `text_config`).

        Raises:
          ValueError: unsupported `model_type`, RoPE scaling type, activation, or
            inconsistent sizes.
        """
        config = text_config(config)  # a multimodal Gemma 3 config: its text decoder
        model_type = config.get("model_type", "llama")
        if model_type not in FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; jquant's decoder supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        family = FAMILIES[model_type]
        theta, scaling, local_theta = _rope(config)
        rope = _rope_fields(scaling, config.get("max_position_embeddings", 2048))
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        if model_type == "qwen2_moe" and config.get("qkv_bias", True) is False:
            raise ValueError("qwen2_moe with qkv_bias=False is not supported (the family's "
                             "q/k/v projections carry biases)")  # fmt: skip
        if model_type == "olmoe" and config.get("clip_qkv") is not None:
            raise ValueError(f"olmoe with clip_qkv={config['clip_qkv']!r} is not supported "
                             "(q/k/v clamped); only clip_qkv=None is")  # fmt: skip
        # As in transformers: qwen2 always has q/k/v biases and never an o_proj bias;
        # llama's attention_bias covers all four projections; mistral has none.
        bias = family.qkv_bias or bool(config.get("attention_bias", False))
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
        layers = int(config["num_hidden_layers"])
        types = layer_types(config, model_type, layers)
        act = config.get("hidden_activation") or config.get("hidden_act") or family.activation
        if family.gemma and act == "gelu":  # Gemma 1 configs say "gelu"; HF runs the tanh one
            act = "gelu_pytorch_tanh"
        optional = lambda key: None if config.get(key) is None else float(config[key])  # noqa: E731
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or 0),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", family.gemma)),
            qkv_bias=bias,
            o_bias=bias and not family.qkv_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
            hidden_act=act,
            qk_norm=family.qk_norm,
            qk_norm_whole=family.qk_norm_whole,
            norm_offset=1.0 if family.gemma else 0.0,
            embed_scale=float(np.float32(hidden**0.5)) if family.gemma else 1.0,
            sandwich_norms=family.sandwich_norms,
            # transformers' default when a Gemma 2/3 config leaves it out: 256.
            query_pre_attn_scalar=(optional("query_pre_attn_scalar") or 256.0)
            if family.sandwich_norms else None,
            attn_logit_softcap=optional("attn_logit_softcapping"),
            final_logit_softcap=optional("final_logit_softcapping"),
            sliding_window=int(config["sliding_window"]) if SLIDING in types else None,
            layer_types=types if SLIDING in types else (),
            rope_local_theta=(local_theta or 10000.0) if model_type == "gemma3_text" else None,
            **rope,
            **_moe_fields(config, model_type, layers),
            rotation=Rotation.from_hf(config.get(ROTATION_KEY)),
        )


def _moe_fields(config: Mapping[str, Any], model_type: str, num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts fields of a config, as transformers reads them: Mixtral's
    ``num_local_experts`` (every layer sparse, top-k weights renormalized), OLMoE's
    ``num_experts`` and ``norm_topk_prob`` (default False; every layer sparse, experts of
    width ``intermediate_size``) or Qwen-MoE's
    ``num_experts``, ``moe_intermediate_size`` and ``norm_topk_prob`` (default False), with
    layer ``i`` sparse unless it is in ``mlp_only_layers`` or ``(i + 1) %
    decoder_sparse_step`` is not 0; Qwen2-MoE's ``shared_expert_intermediate_size`` too."""
    family = FAMILIES[model_type]
    if family.moe == "none":
        return {}
    # Mixtral's own name first; transformers maps num_experts to it (Qwen3-MoE files carry
    # both), and jquant's Checkpoint.config spells it num_experts for every family.
    keys = ("num_local_experts", "num_experts")
    if family.moe != "mixtral":
        keys = keys[::-1]
    key = next((k for k in keys if config.get(k) is not None), keys[0])
    for name in (key, "num_experts_per_tok"):
        if config.get(name) is None:
            raise ValueError(f"a {family.moe} config needs {name!r}, the config has none")
    experts = int(config[key])
    if experts == 0 and family.moe == "qwen_moe":  # transformers: num_experts=0 is all dense
        return {}
    if experts < 1:
        raise ValueError(f"config {key}={experts} must be at least 1 for a {family.moe} model")
    fields: dict[str, Any] = dict(num_experts=experts,
                                  num_experts_per_tok=int(config["num_experts_per_tok"]))
    if family.moe == "mixtral":
        return dict(fields, moe_layers=tuple(range(num_layers)))
    if family.moe == "olmoe":
        return dict(fields, norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                    moe_layers=tuple(range(num_layers)))  # fmt: skip
    step = int(config.get("decoder_sparse_step", 1) or 1)
    dense = {int(i) for i in config.get("mlp_only_layers") or ()}
    return dict(
        fields,
        moe_intermediate_size=int(config.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0)
        if model_type == "qwen2_moe" else 0,
        moe_layers=tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0),
    )


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None, float | None]:
    """(rope_theta, rope_scaling, local rope_theta) from transformers 4 (`rope_theta` +
    `rope_scaling`, Gemma 3's `rope_local_base_freq`) or transformers 5 (`rope_parameters`,
    per layer type for Gemma 3) style keys; older files spell `rope_type` as `type`."""
    params = dict(config.get("rope_parameters") or {})
    local = config.get("rope_local_base_freq")
    if FULL in params:  # transformers 5 Gemma 3: one set per layer type
        local = (params.get(SLIDING) or {}).get("rope_theta", local)
        params = dict(params[FULL] or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = params or dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    local = None if local is None else float(local)
    if scaling.get("rope_type", "default") == "default":
        return theta, None, local
    return theta, scaling, local


def _rope_fields(scaling: dict[str, Any] | None, max_position: int) -> dict[str, Any]:
    if scaling is None:
        return {}
    kind = scaling["rope_type"]
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    fields: dict[str, Any] = dict(rope_type=kind, rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        fields.update(
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_position=int(
                scaling.get("original_max_position_embeddings") or max_position
            ),
        )
    return fields
