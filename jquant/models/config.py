"""`LlamaConfig`: the architecture of a Llama-family model, read from an HF config dict.

One config covers the decoder-only models that share Llama's blocks (RMSNorm, RoPE attention
with grouped key/value heads, SwiGLU MLP): `llama` (SmolLM2 is one), `mistral` and `qwen2`.
What differs between them is data, not code: head counts, q/k/v biases (qwen2), RoPE base and
frequency scaling, a tied or separate LM head.

Not supported (ignored): Mistral/Qwen2 sliding-window attention. It only changes outputs for
contexts longer than the window (4096+ tokens); those models run with full attention here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

#: `model_type` values `LlamaConfig.from_hf` accepts.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: RoPE `rope_type` values implemented (`rope_scaling["rope_type"]`; None means "default").
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    bos_token_id: int | None = None  # from the config; generation does not add it
    eos_token_ids: tuple[int, ...] = ()  # default stop tokens for generation

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
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig: model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from an HF `config.json` dict (transformers 4 or 5 style).

        Args:
          config: the dict; `model_type` must be one of `SUPPORTED_MODEL_TYPES`.

        Raises:
          ValueError: unsupported `model_type`, RoPE scaling type, or inconsistent sizes.
        """
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; jquant's Llama-family model supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        theta, scaling = _rope(config)
        rope = _rope_fields(scaling, config.get("max_position_embeddings", 2048))
        heads = int(config["num_attention_heads"])
        # As in transformers: qwen2 always has q/k/v biases and never an o_proj bias;
        # llama's attention_bias covers all four projections; mistral has none.
        bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or 0),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bias,
            o_bias=bias and model_type != "qwen2",
            mlp_bias=bool(config.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
            **rope,
        )


def _rope(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 4 (`rope_theta` + `rope_scaling`) or
    transformers 5 (`rope_parameters`) style keys; older files spell `rope_type` as `type`."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = params or dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


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


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``(head_dim // 2,)`` float32, scaled as `config.rope_type` says.

    Computed in float32 as transformers does (`_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), so positions
    rotate by the same angles as in the reference implementation.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(
        np.float32
    )
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_scale(inv_freq, config)
    return inv_freq


def _llama3_scale(inv_freq: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly (transformers' formula, term for term)."""
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_max_position
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
