"""Reading llama.cpp GGUF files into float32, HF-layout checkpoints.

Three things differ from an HF checkpoint and are undone here:

- names: llama.cpp's `blk.N.attn_q.weight` is HF's `model.layers.N.self_attn.q_proj.weight`;
- shapes: GGUF lists dimensions fastest-first (ggml's `ne`), so a (out, in) matrix is listed as
  `[in, out]`; the numpy array `GGUFTensor.read()` gives is already (out, in);
- rotary layout: for `llama`/`mistral`, llama.cpp's converter permutes the rows of the Q and K
  projections so that rotary pairs are interleaved (GPT-J style) rather than split in halves
  (HF style). `unpermute_rope_rows` restores HF's order. Qwen and Gemma files are not permuted;
- Gemma norms: llama.cpp stores Gemma's RMSNorm weights as ``1 + w`` (every ``*norm.weight``);
  HF, and jquant, keep ``w``, so 1 is taken off again.

Architectures: `llama` (and `mistral`), `qwen2`, `qwen3`, `gemma`, `gemma2` and `gemma3` (the
text decoder; its model_type is `gemma3_text`), and the mixture-of-experts `llama` with experts
(Mixtral), `qwen2moe`, `qwen3moe` and `olmoe` (their expert tensors and metadata:
`jquant.io._gguf_moe`). Values a GGUF does not store are set as
llama.cpp sets them: Gemma 2/3's query scale is ``head_dim ** -0.5``, except for the 27B models
(46 and 62 layers), which use ``(hidden / heads) ** -0.5``; Gemma 3 alternates five sliding
layers with one global layer (unless the file lists its own pattern) and rotates the sliding
ones with base 10,000.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized with `gguf.quants.dequantize`; that float
copy is the checkpoint. With ``packed=True`` the matrices of the types in
`jquant.io._gguf_packed.PACKED_TYPES` stay packed instead, as `jquant.qarray.QArray` values in
jquant's layout (see that module for each type's mapping and which are exact).

Files are parsed by `jquant.io._gguf_reader` (struct and numpy over one mmap), not by
`gguf.GGUFReader`, which builds numpy views of every metadata value first (tens of seconds for a
128k-token vocabulary). `load_gguf` still reads `general.architecture` straight from the header
(`read_architecture`) and rejects an unsupported model before the full parse.

Each tensor is read with plain file reads and converted by one function (`_load_tensor`);
``load_gguf(path, lazy=True)`` returns a `LazyTensors` that calls it when a tensor is looked
up, and the eager load is that mapping read in full.
"""

from __future__ import annotations

import functools
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jquant.qarray import QArray

from . import _gguf_moe, _gguf_packed, _gguf_reader, _lazy
from ._checkpoint import Checkpoint, check_tensors
from ._lazy import LazyTensors, TensorEntry
from .tokenizer import tokenizer_from_gguf_fields

# llama.cpp tensor name -> HF name, per block ("{}" is the block index) and global.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_NAMES.update({"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                     **_gguf_moe.BLOCK_NAMES})  # fmt: skip
# Gemma 2/3 blocks: ffn_norm is the norm before the MLP; two more norms follow attention and MLP.
_SANDWICH_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# GGUF `general.architecture` -> HF model_type, for those whose names differ.
_MODEL_TYPES = {"gemma3": "gemma3_text"}
#: GGUF architectures `load_gguf` reads.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
                           *_gguf_moe.MODEL_TYPES)  # fmt: skip
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")
# Architectures whose converter permuted Q/K rows (convert_hf_to_gguf.py LlamaModel.permute).
_PERMUTED_ARCHS = ("llama", "mistral")
# Bytes of the fixed-size GGUF metadata value types (strings and arrays are sized inline).
_VALUE_SIZES = {
    gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
    gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2,
    gguf.GGUFValueType.UINT32: 4, gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4,
    gguf.GGUFValueType.UINT64: 8, gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8,
}  # fmt: skip


def _block_names(arch: str) -> dict[str, str]:
    return _SANDWICH_NAMES if arch in ("gemma2", "gemma3") else _BLOCK_NAMES


def hf_name(name: str, arch: str = "llama") -> str:
    """The HF state-dict name of a llama.cpp tensor name of architecture ``arch``; unknown
    names come back unchanged.

    >>> hf_name("blk.3.attn_output.weight")
    'model.layers.3.self_attn.o_proj.weight'
    >>> hf_name("blk.0.ffn_norm.weight", "gemma2")
    'model.layers.0.pre_feedforward_layernorm.weight'
    """
    if m := _BLOCK_RE.fullmatch(name):
        block, part, kind = m.groups()
        names = _block_names(arch)
        if part in names:
            return f"model.layers.{block}.{names[part]}.{kind}"
    elif (m := _GLOBAL_RE.fullmatch(name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return name


def gguf_name(hf: str, arch: str = "llama") -> str:
    """The llama.cpp name of an HF tensor name (inverse of `hf_name`), for messages.

    >>> gguf_name("model.layers.3.self_attn.o_proj.weight")
    'blk.3.attn_output.weight'
    """
    stem, kind = hf.rsplit(".", 1)
    if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
        part = {v: k for k, v in _block_names(arch).items()}.get(m.group(2))
        return f"blk.{m.group(1)}.{part}.{kind}" if part else hf
    part = {v: k for k, v in _GLOBAL_NAMES.items()}.get(stem)
    return f"{part}.{kind}" if part else hf


def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF's split halves).

    llama.cpp's converter applies, per head of `hd` rows, `reshape(n_head, 2, hd // 2, ...)
    .swapaxes(1, 2)`: row `j` of the first half and row `j` of the second half become rows
    `2j` and `2j + 1`. This is its inverse.

    Args:
      w: a Q or K weight (n_head * hd, in) or bias (n_head * hd,), rows in llama.cpp order.
      n_head: heads of this projection (the kv-head count for K).

    Returns:
      `w` with rows in HF order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads of even size")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open(path: Path) -> _gguf_reader.GGUFFile:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = _gguf_reader.read_gguf(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError, struct.error) as err:
        raise ValueError(
            f"{path} is not a readable GGUF file ({type(err).__name__}: {err}). It is not GGUF, "
            "or it is truncated or corrupt: download it again."
        ) from err
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def read_architecture(path: str | Path) -> str | None:
    """`general.architecture` of a GGUF file, read from the header alone, in milliseconds.

    Walks the metadata key/value pairs in file order, skipping values, and stops at the
    architecture (writers put it first). Returns None when the file is missing, not GGUF, cut
    short, or has no such key: `load_gguf`'s full parse then reports what is wrong.
    """
    try:
        with open(path, "rb") as f:
            return _header_architecture(f)
    except (OSError, ValueError, struct.error, EOFError, OverflowError, RecursionError):
        return None  # (UnicodeDecodeError is a ValueError)


def _header_architecture(f) -> str | None:
    size = os.fstat(f.fileno()).st_size

    def read(n: int) -> bytes:
        if n > size - f.tell():  # a corrupt length: not f.read's allocation of n bytes
            raise EOFError
        data = f.read(n)
        if len(data) != n:
            raise EOFError
        return data

    if read(4) != b"GGUF":  # the magic is written little-endian whatever the byte order
        return None
    order = "<"
    (version,) = struct.unpack(order + "I", read(4))
    if version & 0xFFFF == 0:  # a big-endian file (gguf.GGUFReader's test)
        order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    if version < 2:
        return None

    def unpack(fmt: str) -> int:
        return struct.unpack(order + fmt, read(struct.calcsize(fmt)))[0]

    def skip(vtype: int) -> None:
        if vtype in _VALUE_SIZES:
            f.seek(_VALUE_SIZES[vtype], 1)
        elif vtype == gguf.GGUFValueType.STRING:
            f.seek(unpack("Q"), 1)
        elif vtype == gguf.GGUFValueType.ARRAY:
            item, count = unpack("I"), unpack("Q")
            if item in _VALUE_SIZES:
                f.seek(count * _VALUE_SIZES[item], 1)
            else:
                for _ in range(count):
                    skip(item)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    _, n_kv = unpack("Q"), unpack("Q")
    for _ in range(n_kv):
        key, vtype = read(unpack("Q")), unpack("I")
        if key == b"general.architecture":
            return read(unpack("Q")).decode() if vtype == gguf.GGUFValueType.STRING else None
        skip(vtype)
    return None


def _check_architecture(arch: Any, source: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{source}: architecture {arch!r} is not supported; jquant imports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All GGUF metadata of `path` as plain Python values (str, int, float, bool, lists).

    Raises:
      ValueError: the file is not GGUF, or is truncated or corrupt.
    """
    return _open(Path(path)).metadata


def _f32(x: float) -> float:
    """A float32 metadata value written as its shortest decimal (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        return {
            "rope_type": "yarn",
            "factor": _f32(factor),
            "original_max_position_embeddings": original,
        }
    raise ValueError(f"rope scaling type {kind!r} is not supported (linear, yarn)")


def config_from_metadata(
    meta: dict[str, Any], tensor_names: set[str], source: str = "<gguf>"
) -> dict[str, Any]:
    """HF-style config (keys of `jquant.io.CONFIG_KEYS`, and `jquant.io.MOE_CONFIG_KEYS` for a
    mixture of experts) from GGUF metadata.

    Args:
      meta: `read_metadata` output.
      tensor_names: the file's tensor names (GGUF spelling); they decide tied embeddings
        (no `output.weight`), attention biases (`blk.0.attn_q.bias`) and an MoE model's
        sparse blocks (those with a router, `blk.N.ffn_gate_inp.weight`).
      source: the file, named in errors.

    Raises:
      ValueError: unsupported architecture, missing keys, or a feature jquant cannot represent.
    """
    arch = meta.get("general.architecture")
    _check_architecture(arch, source)

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ValueError(f"{source}: metadata key {arch}.{key} is missing; the file is damaged")
        if isinstance(value, list):
            raise ValueError(f"{source}: per-layer {arch}.{key} is not supported")
        return value

    layers = get("block_count")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{source}: rope frequency factors (rope_freqs.weight, Llama-3.1-style rope scaling) "
            "are not supported from GGUF; load the model's HF directory instead."
        )
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise ValueError(f"{source}: partial rotary ({rotary} of {head_dim} dims) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise ValueError(f"{source}: no vocabulary size ({arch}.vocab_size or token list)")
    gemma = arch in _GEMMA_ARCHS
    window = meta.get(f"{arch}.attention.sliding_window") if arch in ("gemma2", "gemma3") else None
    types = None
    if window:
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
        if isinstance(pattern, list):  # one flag per layer: True = sliding
            if len(pattern) != layers:
                raise ValueError(f"{source}: {arch}.attention.sliding_window_pattern lists "
                                 f"{len(pattern)} layers, the model has {layers}")  # fmt: skip
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            types = [
                "sliding_attention" if (i + 1) % int(pattern) else "full_attention"
                for i in range(layers)
            ]
    scalar = None
    if arch in ("gemma2", "gemma3"):  # llama.cpp's rule: the 27B models scale by hidden / heads
        big = layers == (46 if arch == "gemma2" else 62)
        scalar = hidden // heads if big else head_dim

    def softcap(key: str) -> float | None:
        value = meta.get(f"{arch}.{key}")
        return None if value is None else _f32(value)

    ffn = get("feed_forward_length")
    moe = _gguf_moe.config_keys(meta, arch, tensor_names, layers, ffn, source)
    return {
        **moe,
        "model_type": _gguf_moe.model_type(meta, arch) or _MODEL_TYPES.get(arch, arch),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "sliding_window": window or None,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "query_pre_attn_scalar": scalar,
        "attn_logit_softcapping": softcap("attn_logit_softcapping"),
        "final_logit_softcapping": softcap("final_logit_softcapping"),
        "layer_types": types,
        "rope_local_base_freq": (
            _f32(meta.get(f"{arch}.rope.freq_base_swa", 10000.0)) if arch == "gemma3" else None
        ),
    }


_PLAIN_TYPES = (gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
                gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
                gguf.GGMLQuantizationType.I64)  # fmt: skip


def _dequantize(t: _gguf_reader.GGUFTensor, source: Path) -> np.ndarray:
    """Tensor `t` read from the file and dequantized: a new float32 array, slowest-first."""
    data = t.read()
    if not data.dtype.isnative:  # F32/F16 of a big-endian file: dequantize views the bytes
        data = data.astype(data.dtype.newbyteorder("="))
    try:
        if t.tensor_type in _PLAIN_TYPES:  # plain numbers gguf reads but does not "dequantize"
            w = np.asarray(data, np.float32)
        else:
            w = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError as err:
        raise ValueError(
            f"{source}: tensor {t.name} has type {t.tensor_type.name}, which the installed gguf "
            "package cannot dequantize; upgrade gguf (pip install -U gguf)."
        ) from err
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return np.asarray(w, dtype=np.float32).reshape(shape)  # F32: `data` itself, already a copy


def _load_tensor(t: _gguf_reader.GGUFTensor, source: Path, n_head: int | None, gemma_norm: bool,
                 shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # fmt: skip
    """Tensor `t` in HF layout `shape`, as `dtype`: dequantized, ``1 + w`` stored Gemma norms
    back to ``w``, and Q/K rows of a permuted architecture back in HF order (`n_head`: its
    heads)."""
    w = _dequantize(t, source)
    if gemma_norm:
        w -= np.float32(1.0)  # llama.cpp stored 1 + w
    if n_head is not None:
        w = unpermute_rope_rows(w, n_head)
    return _lazy.cast(w.reshape(shape), dtype)


def _load_packed(t: _gguf_reader.GGUFTensor, source: Path, n_head: int | None, embedding: bool,
                 shape: tuple[int, ...], dtype: np.dtype) -> QArray:  # fmt: skip
    """Matrix or expert stack `t` (HF layout `shape`) as a QArray
    (`_gguf_packed.qarray_from_blocks`); `dtype` is ignored (the QArray's is float32)."""
    del dtype
    rows = None if n_head is None else functools.partial(unpermute_rope_rows, n_head=n_head)
    name = f"{source}: tensor {t.name}"
    return _gguf_packed.qarray_from_blocks(t.read(), t.tensor_type, shape, rows=rows,
                                           embedding=embedding, name=name)  # fmt: skip


def _entries(reader: _gguf_reader.GGUFFile, config: dict[str, Any], source: Path,
             packed: bool = False) -> dict[str, TensorEntry]:  # fmt: skip
    """The file's tensors by HF name, with their HF-layout shapes and how to read each;
    `packed`: matrices and expert stacks of `_gguf_packed.PACKED_TYPES` (not MoE routers)
    read as QArrays."""
    arch = reader.metadata["general.architecture"]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    entries: dict[str, TensorEntry] = {}
    for t in reader.tensors:
        name = hf_name(t.name, arch)
        if name in entries:
            raise ValueError(f"{source}: tensor {t.name} appears twice; the file is corrupt")
        n_head = None
        if arch in _PERMUTED_ARCHS:
            n_head = next((n for p, n in heads.items() if f".self_attn.{p}." in name), None)
        gemma_norm = arch in _GEMMA_ARCHS and name.endswith("norm.weight")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if name.endswith(".mlp.shared_expert_gate.weight") and len(shape) == 1:
            shape = (1, *shape)  # llama.cpp accepts the squeezed [D] too
        load = functools.partial(_load_tensor, t, source, n_head, gemma_norm, shape)
        packable = len(shape) in (2, 3) and not _gguf_moe.is_router(name)
        if packed and packable and t.tensor_type in _gguf_packed.PACKED_TYPES:
            embedding = name == "model.embed_tokens.weight"
            load = functools.partial(_load_packed, t, source, n_head, embedding, shape)
        entries[name] = TensorEntry(shape=shape, stored_dtype=t.tensor_type.name, load=load)
    return entries


def load_gguf(path: str | Path, *, tokenizer: bool = True, lazy: bool = False,
              packed: bool = False) -> Checkpoint:  # fmt: skip
    """Read a GGUF file into a float32 `Checkpoint` in HF layout (or, with `packed`, its
    quantized matrices as QArrays).

    Args:
      path: a `.gguf` file of one of `SUPPORTED_ARCHITECTURES`.
      tokenizer: build the tokenizer from the file's metadata (byte-level BPE only; other
        kinds warn and give None).
      lazy: parse only the header now; `tensors` is then a `LazyTensors` that reads and
        dequantizes each tensor when it is looked up (for models larger than memory). Its
        names, shapes and values are those the default eager load holds.
      packed: keep every 2-D tensor stored in one of `jquant.io._gguf_packed.PACKED_TYPES`
        (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K) packed: its value is a
        `jquant.qarray.QArray` in jquant's layout, logical ``(in, out)`` for a linear weight
        and ``(vocab, hidden)`` (quantized along hidden) for the token embedding, which
        `jquant.models.params_from_hf` keeps as it is. Other tensors load as without it.
        Not with `lazy`.

    Returns:
      The checkpoint; `tensors` are dequantized float32 (or QArrays, with `packed`), Q/K rows
      in HF order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not GGUF, truncated or corrupt; unsupported architecture; missing tensors or
        shapes that disagree with the metadata; `packed` with `lazy`.

    >>> ckpt = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> ckpt.tensors["model.layers.0.self_attn.q_proj.weight"].shape  # doctest: +SKIP
    (576, 576)
    """
    path = Path(path)
    if packed and lazy:
        raise ValueError(f"{path}: packed=True loads eagerly; it does not combine with lazy=True")
    arch = read_architecture(path)
    if arch is not None:
        _check_architecture(arch, str(path))  # before the slow full parse
    reader = _open(path)
    meta = reader.metadata
    config = config_from_metadata(meta, {t.name for t in reader.tensors}, str(path))
    arch = meta["general.architecture"]
    tensors = LazyTensors(_entries(reader, config, path, packed), str(path))
    check_tensors(tensors, config, str(path), file_name=lambda n: gguf_name(n, arch),
                  stacked_experts=True)  # fmt: skip
    tok = None
    if tokenizer and "tokenizer.ggml.model" in meta:
        try:
            tok = tokenizer_from_gguf_fields(meta, str(path))
        except ValueError as err:
            warnings.warn(f"no tokenizer: {err}", stacklevel=2)
    return Checkpoint(config=config, tensors=tensors if lazy else dict(tensors), tokenizer=tok,
                      source=str(path))  # fmt: skip
