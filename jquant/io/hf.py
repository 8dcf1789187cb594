"""Reading Hugging Face model directories (config.json + safetensors) without torch.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and optionally `tokenizer.json` / `tokenizer_config.json`.
Tensors are already in HF layout; they are only cast to float32 (bf16 and f16 included).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from ._checkpoint import SUPPORTED_MODEL_TYPES, Checkpoint, check_tensors, normalize_rope
from .tokenizer import tokenizer_from_hf_dir

# Files a hub snapshot needs; never the .bin / .pth / .gguf siblings.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model")
# Buffers some older checkpoints saved that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Multimodal Gemma 3: where the text decoder's tensors live (transformers 5, then 4.x names)
# -> the text model's names; and the vision tensors, which are not loaded.
_TEXT_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                  "language_model.lm_head.": "lm_head."}  # fmt: skip
_VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                    "multi_modal_projector.")  # fmt: skip
# safetensors dtype codes -> numpy dtypes, for the raw-bytes fallback.
_RAW_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def config_from_hf(raw: dict[str, Any], source: str = "<config.json>") -> dict[str, Any]:
    """The `Checkpoint.config` of a transformers `config.json` dict (4.x or 5.x style).

    A multimodal Gemma 3 config (`model_type: "gemma3"`) gives its text decoder's, as
    `"gemma3_text"` (`jquant.arch.text_config`).

    Raises:
      ValueError: unsupported `model_type`, a missing key, or a variant jquant cannot run
        (an activation it lacks, MLP biases).
    """
    from jquant.arch import LlamaConfig, text_config

    raw = dict(text_config(raw))
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; jquant imports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}."
        )

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ValueError(f"{source}: required key {key!r} is missing")
        return raw[key]

    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: MLP biases are not supported")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    for key in ("vocab_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
        need(key)
    try:
        cfg = LlamaConfig.from_hf(raw)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{source}: {err}") from None
    theta, scaling = normalize_rope(raw)
    if cfg.rope_local_theta is not None or model_type.startswith("gemma3"):
        theta = cfg.rope_theta  # transformers 5 nests it per layer type
        scaling = None if cfg.rope_type == "default" else _scaling_of(cfg)
    return {
        "model_type": model_type,
        "vocab_size": need("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": need("intermediate_size"),
        "num_hidden_layers": need("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        "head_dim": raw.get("head_dim") or hidden // heads,
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": need("max_position_embeddings"),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
        "sliding_window": cfg.sliding_window,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "hidden_act": cfg.hidden_act,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
        "attn_logit_softcapping": cfg.attn_logit_softcap,
        "final_logit_softcapping": cfg.final_logit_softcap,
        "layer_types": list(cfg.layer_types) or None,
        "rope_local_base_freq": cfg.rope_local_theta,
    }


def _scaling_of(cfg) -> dict[str, Any]:
    """A `LlamaConfig`'s RoPE scaling as an HF `rope_scaling` dict."""
    out: dict[str, Any] = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
    if cfg.rope_type == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_position)  # fmt: skip
    return out


def _read_raw(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Read tensors straight from the safetensors bytes (header: u64 length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in _RAW_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        values = data[start:end].view(_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = values.astype(np.float32)
    return out


def _get_float32(f, path: Path, name: str) -> np.ndarray:
    try:
        return f.get_tensor(name).astype(np.float32)
    except TypeError:  # bf16 / fp8 on a safetensors build whose numpy side lacks ml_dtypes
        return _read_raw(path, [name])[name]


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as float32 numpy arrays.

    Raises:
      ValueError: the file is truncated or corrupt, or holds a dtype with no float32 reading.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return {name: _get_float32(f, path, name) for name in f.keys()}
    except SafetensorError as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt: "
            "download it again."
        ) from err


def _text_decoder(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A multimodal Gemma 3 file's tensors, less the vision ones, under the text model's names."""
    out = {}
    for name, value in tensors.items():
        if name.startswith(_VISION_PREFIXES):
            continue
        old = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
        out[name if old is None else _TEXT_PREFIXES[old] + name[len(old) :]] = value
    return out


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise ValueError(f"{index} lists shard {shard}, which is missing from {path}")
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise ValueError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json "
        "(PyTorch .bin weights are not read: re-save with safe_serialization=True)."
    )


def load_hf_dir(path: str | Path, *, tokenizer: bool = True) -> Checkpoint:
    """Read an HF model directory into a float32 `Checkpoint`.

    Args:
      path: directory with `config.json` and safetensors weights.
      tokenizer: also load `tokenizer.json` (None when the directory has none).

    A multimodal Gemma 3 directory loads as its text decoder (`"gemma3_text"`), with a warning;
    the vision tower and projector are dropped.

    Raises:
      FileNotFoundError: no such directory, or no `config.json` in it.
      ValueError: unsupported model, missing / misshapen tensors, truncated weights.

    >>> ckpt = load_hf_dir("SmolLM2-135M-Instruct/")  # doctest: +SKIP
    >>> ckpt.config["num_hidden_layers"]  # doctest: +SKIP
    30
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    raw = json.loads((path / "config.json").read_text())
    config = config_from_hf(raw, str(path))
    multimodal = raw.get("model_type") == "gemma3"  # accepted: it has a text_config
    if multimodal:
        warnings.warn(f"{path}: multimodal Gemma 3; only its text decoder is loaded, not the "
                      "vision tower.", stacklevel=2)  # fmt: skip
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        part = read_safetensors(file)
        tensors.update(_text_decoder(part) if multimodal else part)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    check_tensors(tensors, config, str(path))
    tok = tokenizer_from_hf_dir(path, config) if tokenizer else None
    return Checkpoint(config=config, tensors=tensors, tokenizer=tok, source=str(path))


def load_hub(repo_id: str, *, revision: str | None = None, tokenizer: bool = True) -> Checkpoint:
    """Download (or reuse the cached) hub snapshot of `repo_id` and read it as an HF directory.

    Raises:
      OSError: the hub could not be reached and nothing is cached.
    """
    import huggingface_hub

    try:
        local = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS)
        )
    except Exception as err:  # hub errors, offline mode, HTTP errors: all mean "not available"
        reason = " ".join(str(err).split())  # hub messages span several lines
        raise OSError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{reason}); check the id and the network, or pass a local directory or .gguf file."
        ) from err
    ckpt = load_hf_dir(local, tokenizer=tokenizer)
    return Checkpoint(
        config=ckpt.config, tensors=ckpt.tensors, tokenizer=ckpt.tokenizer, source=repo_id
    )
