"""`LlamaConfig`: the architecture of a decoder-only model, read from an HF config dict.

This module imports nothing of jquant: `jquant.io` reads configs with it and `jquant.models`
builds models from it (`jquant.models.config` re-exports it), so io never imports models.

One config covers the decoder families that share Llama's skeleton (RMSNorm, RoPE attention
with grouped key/value heads, a gated MLP): `llama` (SmolLM2 is one), `mistral`, `qwen2`,
`qwen3`, `gemma`, `gemma2` and `gemma3_text`. What differs between them is data, not code, and
`FAMILIES` holds it per `model_type`:

* q/k/v biases (qwen2); RMSNorm of every query and key head before RoPE (qwen3, gemma3);
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


@dataclasses.dataclass(frozen=True)
class Family:
    """What a `model_type` fixes about the architecture (the rest is in its config).

    Attributes:
      qkv_bias: q/k/v projections always carry a bias (qwen2), whatever the config says.
      qk_norm: an RMSNorm over ``head_dim`` on every query and key head, before RoPE.
      gemma: Gemma's conventions: RMSNorm weight applied as ``1 + w`` and embeddings
        multiplied by ``sqrt(hidden_size)``.
      sandwich_norms: norms after attention and around the MLP (Gemma 2/3).
      activation: the MLP activation when the config names none.
      sliding: how the layers using sliding-window attention are chosen: "none", "all"
        (mistral: every layer when ``sliding_window`` is set), "upper" (qwen2/qwen3: layers
        from ``max_window_layers`` on when ``use_sliding_window``), or "pattern" (gemma2/3:
        every layer but each ``sliding_window_pattern``-th).
      pattern: the default ``sliding_window_pattern``.
    """

    qkv_bias: bool = False
    qk_norm: bool = False
    gemma: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    sliding: str = "none"
    pattern: int = 0


#: Every `model_type` `LlamaConfig.from_hf` accepts, and what it fixes.
FAMILIES = {
    "llama": Family(),
    "mistral": Family(sliding="all"),
    "qwen2": Family(qkv_bias=True, sliding="upper"),
    "qwen3": Family(qk_norm=True, sliding="upper"),
    "gemma": Family(gemma=True, activation="gelu_pytorch_tanh"),
    "gemma2": Family(gemma=True, sandwich_norms=True, activation="gelu_pytorch_tanh",
                     sliding="pattern", pattern=2),
    "gemma3_text": Family(gemma=True, sandwich_norms=True, qk_norm=True,
                          activation="gelu_pytorch_tanh", sliding="pattern", pattern=6),
}  # fmt: skip

#: `model_type` values `LlamaConfig.from_hf` accepts.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

#: MLP activations implemented (HF `hidden_act` / `hidden_activation` names).
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new", "gelu")

#: Attention kinds of `LlamaConfig.layer_types`.
FULL, SLIDING = "full_attention", "sliding_attention"

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
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"LlamaConfig: model_type={self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self._check_ranges()

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
        )


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
        if config.qk_norm:
            shapes[f"{p}self_attn/q_norm/scale"] = (dh,)
            shapes[f"{p}self_attn/k_norm/scale"] = (dh,)
        for proj, shape in {"gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}.items():
            shapes[f"{p}mlp/{proj}/kernel"] = shape
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            shapes[f"{p}{norm}/scale"] = (d,)
    return shapes


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


def rope_inv_freq(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies ``(head_dim // 2,)`` float32, scaled as `config.rope_type` says.

    Computed in float32 as transformers does (`_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), so positions
    rotate by the same angles as in the reference implementation. ``local``: the sliding
    layers' frequencies (base `rope_local_theta`, unscaled, when the config has one).
    """
    dim = config.head_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
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
