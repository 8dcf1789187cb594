"""Reading Hugging Face model directories (config.json + safetensors) without torch.

A directory holds `config.json`, the weights as `model.safetensors` or as shards listed by
`model.safetensors.index.json`, and optionally `tokenizer.json` / `tokenizer_config.json`.
Tensors are already in HF layout; they are only cast to float32 (bf16 and f16 included).

The safetensors headers are parsed here (a u64 length, then JSON: each tensor's dtype, shape and
byte range) and each tensor is read with plain file reads, not `safetensors.safe_open`'s memory
map, so that ``load_hf_dir(path, lazy=True)`` can hand out a `LazyTensors` whose reads leave no
mapping behind; the eager load is that mapping read in full.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import warnings
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from . import _lazy
from ._checkpoint import SUPPORTED_MODEL_TYPES, Checkpoint, check_tensors, normalize_rope
from ._lazy import LazyTensors, TensorEntry
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
# safetensors dtype codes -> numpy dtypes (the format is little-endian, as is every host jquant
# runs on). Integer and bool tensors are read as float32 like the rest.
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


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
    moe = {}
    if cfg.num_experts:  # MOE_CONFIG_KEYS
        moe = dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size,
                   norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
                   shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                   mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe(i)])
    return {
        **moe,
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


def _not_readable(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path} is not a readable safetensors file ({reason}); it is truncated or corrupt: "
        "download it again."
    )


def _header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensor records of a safetensors file (a u64 length, then that many bytes of JSON) and
    where its data starts, each record checked against its dtype, shape and the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_readable(path, f"{size} bytes is too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise _not_readable(path, f"a header of {n} bytes runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise _not_readable(path, f"the header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise _not_readable(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise _not_readable(path, f"tensor {name} has a malformed record {info!r}") from None
        if not 0 <= start <= end <= data_size:
            raise _not_readable(
                path, f"tensor {name}'s bytes {start}..{end} run past the end of the data "
                f"({data_size} bytes)"
            )  # fmt: skip
        if dtype in _DTYPES and end - start != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
            raise _not_readable(
                path, f"tensor {name} of {dtype} {shape} has {end - start} bytes of data"
            )  # fmt: skip
    return header, 8 + n


def _hf_name(name: str, multimodal: bool) -> str | None:
    """A file's tensor name as the text model names it, or None for a tensor not loaded (buffers
    without weights; a multimodal Gemma 3 file's vision tower and projector)."""
    if multimodal:
        if name.startswith(_VISION_PREFIXES):
            return None
        old = next((p for p in _TEXT_PREFIXES if name.startswith(p)), None)
        name = name if old is None else _TEXT_PREFIXES[old] + name[len(old) :]
    return None if name.endswith(_IGNORED_SUFFIXES) else name


def _file_entries(path: Path, multimodal: bool) -> dict[str, TensorEntry]:
    """`TensorEntry`s of the tensors of one safetensors file that are loaded, by HF name."""
    header, data_start = _header(path)
    path = path.absolute()  # read later, from whatever directory is current then
    entries = {}
    for name in sorted(header):
        hf = _hf_name(name, multimodal)
        if hf is None:
            continue
        info = header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        load = functools.partial(_load_tensor, path, name, data_start + start, end - start,
                                 np.dtype(_DTYPES[info["dtype"]]), shape)  # fmt: skip
        entries[hf] = TensorEntry(shape=shape, stored_dtype=info["dtype"], load=load)
    return entries


def _load_tensor(path: Path, name: str, offset: int, nbytes: int, stored: np.dtype,
                 shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # fmt: skip
    """One safetensors tensor read from disk, as `dtype` (no copy when it is stored so)."""
    raw = _lazy.read_bytes(path, offset, nbytes, tensor=name)
    return _lazy.cast(raw.view(stored).reshape(shape), dtype)


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


def load_hf_dir(path: str | Path, *, tokenizer: bool = True, lazy: bool = False) -> Checkpoint:
    """Read an HF model directory into a float32 `Checkpoint`; a GPTQ, AWQ or
    compressed-tensors one (`quant_method`) into a `Checkpoint` whose quantized linear weights
    are QArrays, codes as stored (`jquant.io.gptq_awq`, `jquant.io.compressed_tensors`).

    Args:
      path: directory with `config.json` and safetensors weights.
      tokenizer: also load `tokenizer.json` (None when the directory has none).
      lazy: read only the safetensors headers now; `tensors` is then a `LazyTensors` that
        reads each tensor from its shard when it is looked up (for models larger than memory).
        Its names, shapes and values are those the default eager load holds.

    A multimodal Gemma 3 directory loads as its text decoder (`"gemma3_text"`), with a warning;
    the vision tower and projector are dropped.

    Raises:
      FileNotFoundError: no such directory, or no `config.json` in it.
      ValueError: unsupported model, missing / misshapen tensors, truncated weights (with
        ``lazy=True``, a shard cut short after loading fails when a tensor past the cut is read).

    >>> ckpt = load_hf_dir("SmolLM2-135M-Instruct/")  # doctest: +SKIP
    >>> ckpt.config["num_hidden_layers"]  # doctest: +SKIP
    30
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    raw = json.loads((path / "config.json").read_text())
    method = quant_method(path, raw)
    if method is not None:
        return _load_quantized(path, method, tokenizer=tokenizer, lazy=lazy)
    config = config_from_hf(raw, str(path))
    multimodal = raw.get("model_type") == "gemma3"  # accepted: it has a text_config
    if multimodal:
        warnings.warn(f"{path}: multimodal Gemma 3; only its text decoder is loaded, not the "
                      "vision tower.", stacklevel=2)  # fmt: skip
    entries: dict[str, TensorEntry] = {}
    for file in _weight_files(path):  # a name in two shards: the later shard's, as it always was
        entries.update(_file_entries(file, multimodal))
    if config["tie_word_embeddings"]:
        entries.pop("lm_head.weight", None)
    tensors = LazyTensors(entries, str(path))
    check_tensors(tensors, config, str(path))
    tok = tokenizer_from_hf_dir(path, config) if tokenizer else None
    return Checkpoint(config=config, tensors=tensors if lazy else dict(tensors), tokenizer=tok,
                      source=str(path))  # fmt: skip


#: ``quant_method`` of the quantized HF checkpoints jquant reads, and the module reading each.
QUANT_METHODS = {"compressed-tensors": "compressed_tensors", "gptq": "gptq_awq",
                 "awq": "gptq_awq"}  # fmt: skip


def quant_method(path: Path, raw: dict[str, Any]) -> str | None:
    """The ``quant_method`` of an HF directory's ``quantization_config`` (or of AutoGPTQ's
    ``quantize_config.json`` beside it); None for a float checkpoint.

    Raises:
      ValueError: a quantization method jquant does not read, named with those it does.
    """
    qc = raw.get("quantization_config")
    if qc is None and (path / "quantize_config.json").is_file():
        qc = json.loads((path / "quantize_config.json").read_text())
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method not in QUANT_METHODS:
        raise ValueError(
            f"{path}: quantization_config quant_method {method!r} is not one jquant reads "
            f"({', '.join(QUANT_METHODS)}); load the float model instead"
        )
    return method


def _load_quantized(path: Path, method: str, *, tokenizer: bool, lazy: bool) -> Checkpoint:
    """A GPTQ, AWQ or compressed-tensors directory as a `Checkpoint` holding QArrays."""
    import importlib

    if lazy:
        raise ValueError(f"{path}: a {method} checkpoint is read whole; lazy=True reads float "
                         "checkpoints only")  # fmt: skip
    module = importlib.import_module(f"jquant.io.{QUANT_METHODS[method]}")
    read = module.read_compressed_tensors if method == "compressed-tensors" else \
        module.read_gptq_awq  # fmt: skip
    config, tensors, tok = read(path, tokenizer=tokenizer)
    return Checkpoint(config=config, tensors=tensors, tokenizer=tok, source=str(path))


def load_hub(
    repo_id: str, *, revision: str | None = None, tokenizer: bool = True, lazy: bool = False
) -> Checkpoint:
    """Download (or reuse the cached) hub snapshot of `repo_id` and read it as an HF directory
    (`load_hf_dir`; ``lazy=True`` reads the downloaded shards tensor by tensor).

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
    ckpt = load_hf_dir(local, tokenizer=tokenizer, lazy=lazy)
    return Checkpoint(
        config=ckpt.config, tensors=ckpt.tensors, tokenizer=ckpt.tokenizer, source=repo_id
    )
