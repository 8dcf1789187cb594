"""Writing a jquant model as a GGUF file that llama.cpp loads, quantized blocks as held.

`write_gguf` is the inverse of `jquant.io.load_gguf` for the jquant model types of
`ARCHITECTURES`: ``llama`` and ``mistral`` (GGUF architecture ``llama``), ``qwen2`` (q/k/v
biases), ``qwen3`` (q/k norms), ``gemma``, ``gemma2`` and ``gemma3_text`` (``gemma3``), and the
mixture-of-experts ``mixtral`` (``llama`` with experts), ``qwen2_moe`` (``qwen2moe``),
``qwen3_moe`` (``qwen3moe``) and ``olmoe`` (their routers, expert stacks, shared expert, keys
and what is refused: `jquant.io._gguf_export_moe`). Tensor names are llama.cpp's for the
architecture (`jquant.io.gguf.gguf_name`: Gemma 2/3's sandwich norms); Q and K rows are permuted
into llama.cpp's interleaved rotary order for ``llama`` only (what
`jquant.io.gguf.unpermute_rope_rows` undoes); Gemma's RMSNorm weights are stored as ``1 + w``
(float32), as llama.cpp's converter stores them and `load_gguf` takes off again. The
hyperparameters are the keys llama.cpp reads: Gemma 2's soft-caps, Gemma 2/3's sliding window
(with the per-layer flags where the layers differ from llama.cpp's default pattern), Gemma 3's
local RoPE base (``rope.freq_base_swa``) and final soft-cap. What llama.cpp would compute
otherwise is refused: it stores no query scale (Gemma 2/3 scale by ``head_dim ** -0.5``, by
``(hidden / heads) ** -0.5`` at 46/62 layers), caps Gemma 2 always and Gemma 1/3's attention
never, slides no Qwen layer and reuses the embedding as Gemma 1/2's head. The tokenizer is
written by `jquant.io._gguf_tokenizer_export.gguf_tokenizer_fields`: byte-level BPE, or
SentencePiece BPE with scores derived from its merges.

Every QArray is written from its own codes and scales, in the ggml type whose blocks hold the
same numbers (`jquant.io._gguf_types`: int8/int4/int5 in groups of 32 with float16 scales as
Q8_0/Q4_0/Q5_0, bit for bit; uint4/uint5 as Q4_1/Q5_1; what `load_gguf(packed=True)` reads from
Q6_K back as Q6_K, bit for bit; an expert stack ``(E, in, out)`` as one 3-D tensor, each
expert's blocks after the previous expert's). A ``uint`` group ``(q − z)·d`` is stored as
``d·q + m`` with ``m = −z·d``: the product is taken in float32 (exact for float16 ``d`` and
``z``) and rounded to the nearest float16 (round half to even), so each value moves by at most
half a float16 ulp of ``|z·d|``: ``2⁻¹¹·|z·d|``, or ``2⁻²⁵`` where ``m`` is subnormal. Nothing
is requantized: a model with a tensor no ggml type holds is refused, every such tensor listed,
before anything is written.

>>> load = jquant.models.load
>>> model, params, tok, config = load("smollm2-135m", with_config=True)  # doctest: +SKIP
>>> model, params = jquant.calib.quantize_loaded(model, params, "gguf-q4_0")  # doctest: +SKIP
>>> write_gguf(params, config, tok, "smollm2-q4_0.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from jquant._param_shapes import hf_name
from jquant.arch import LlamaConfig
from jquant.qarray import QArray

from . import _gguf_export_moe, _gguf_types
from ._gguf_tokenizer_export import gguf_tokenizer_fields
from ._hf_export import model_params
from ._packed_writer import _fsync_dir
from .gguf import gguf_name

__all__ = ["write_gguf"]

Q = gguf.GGMLQuantizationType
#: jquant model type -> the GGUF architecture it is written as.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
                 **_gguf_export_moe.ARCHITECTURES}  # fmt: skip
#: jquant model types written.
MODEL_TYPES = tuple(ARCHITECTURES)
_ROPE_KEYS = {"linear": {"rope_type", "type", "factor"},
              "yarn": {"rope_type", "type", "factor", "original_max_position_embeddings"}}
_GEMMA = ("gemma", "gemma2", "gemma3")
# llama.cpp's default sliding pattern (every n-th layer global) and the layer count of the 27B
# models, whose query scale it takes from hidden / heads rather than head_dim.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_BIG = {"gemma2": 46, "gemma3": 62}

def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order from HF's (the inverse of
    `jquant.io.gguf.unpermute_rope_rows`): per head, row ``j`` of the first half and row ``j``
    of the second half become rows ``2j`` and ``2j + 1``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(n, 32) codes 0..15 -> (n, 16) bytes: element j low, element j + 16 high."""
    return (u[:, :16] | (u[:, 16:] << 4)).astype(np.uint8)


def _high_bits(u: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes: bit j of a little-endian uint32 is code j's bit 4."""
    bits = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def _blocks(ggml: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """ggml blocks of 32 codes each: ``codes`` (n, 32) as the QArray holds them, ``d`` (n,)
    and ``m`` (n,) float16. Returns (n, type size) bytes."""
    c = codes.astype(np.int16)
    d = _f16_bytes(d)
    if ggml == "Q8_0":
        return np.concatenate([d, c.astype(np.int8).view(np.uint8)], axis=1)
    if ggml == "Q4_0":
        return np.concatenate([d, _nibbles((c + 8).astype(np.uint8))], axis=1)
    if ggml == "Q5_0":
        u = (c + 16).astype(np.uint8)
        return np.concatenate([d, _high_bits(u), _nibbles(u & 0xF)], axis=1)
    u = c.astype(np.uint8)
    if ggml == "Q4_1":
        return np.concatenate([d, _f16_bytes(m), _nibbles(u)], axis=1)
    assert ggml == "Q5_1", ggml
    return np.concatenate([d, _f16_bytes(m), _high_bits(u), _nibbles(u & 0xF)], axis=1)


def _q6_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks: ``codes`` (n, 256) int6, ``sc`` (n, 16) int8, ``d`` (n,) float16.
    ``ql`` holds the low nibbles in two runs of 128 (byte j: element j low, j + 64 high),
    ``qh`` the high two bits (byte j of run r: elements r·128 + 32·s + j at bits 2s)."""
    u = (codes.astype(np.int16) + 32).astype(np.uint8).reshape(-1, 2, 128)
    low = u & 0xF
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(-1, 128)
    high = (u >> 4).reshape(-1, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = np.bitwise_or.reduce(high, axis=2).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def _two_level(q: QArray, n_head: int | None) -> tuple[str, np.ndarray] | None:
    """A K-quant of `_gguf_types.TWO_LEVEL_TYPES` (``d·sc·q``), or None where ``q`` is not
    one: int8 sub-scales per group, one float16 super-scale per 256 elements."""
    ggml = _gguf_types.TWO_LEVEL_TYPES.get((q.qtype, q.group_size))
    s = q.scale
    per = _gguf_types.SUPER // (q.group_size or 1)
    if (ggml is None or not isinstance(s, QArray) or s.qtype != "int8" or s.zero_point is not None
            or s.group_size != per or q.k % _gguf_types.SUPER or q.zero_point is not None):
        return None  # fmt: skip
    d, _ = _scale_f16(s)
    if d is None:
        return None
    codes, sc = np.asarray(q.codes()), np.asarray(s.codes())
    if n_head is not None:
        codes, sc, d = (permute_rope_rows(x, n_head) for x in (codes, sc, d))
    rows = codes.shape[:-1]
    blocks = _q6_k(codes.reshape(-1, _gguf_types.SUPER), sc.reshape(-1, per), d.reshape(-1))
    return ggml, blocks.reshape(*rows, -1)


def _scale_f16(q: QArray) -> tuple[np.ndarray | None, str]:
    """The QArray's scales as float16 when they are float16 values, else (None, its dtype)."""
    s = np.asarray(q.scale)
    name = s.dtype.name
    if name == "float16":
        return s, name
    if name == "float32":
        f16 = s.astype(np.float16)
        if np.all(np.isfinite(f16)) and np.array_equal(f16.astype(np.float32), s):
            return f16, "float32 (float16 values)"
    return None, name


def _format(q: QArray) -> str:
    g = "channel" if q.group_size is None else f"g{q.group_size}"
    scale = (f"{q.scale.qtype}-quantized" if isinstance(q.scale, QArray)
             else np.asarray(q.scale).dtype.name)  # fmt: skip
    act = f" activation {q.activation}" if q.activation else ""
    return f"{q.qtype} {g} {scale} scales{act}"


def _quantized(q: QArray, leaf: str, n_head: int | None) -> tuple[str, np.ndarray] | str:
    """``(ggml type, (rows, bytes) uint8)`` of QArray ``q`` (rows permuted for `n_head`
    heads), or why no ggml type holds it."""
    if q.perm is not None:  # ggml blocks run along the inputs in their own order
        return f"{_format(q)} with an act-order input permutation"
    ggml = _gguf_types.QUANT_TYPES.get((q.qtype, q.group_size))
    want_axis = -1 if leaf == "embedding" else -2
    if ggml is None and q.axis == want_axis and q.ndim in (2, 3) and q.activation is None:
        return _two_level(q, n_head) or _format(q)
    if (ggml is None or isinstance(q.scale, QArray) or q.activation is not None
            or q.ndim not in (2, 3) or q.k % _gguf_types.GROUP):  # fmt: skip
        return _format(q)
    if q.axis != want_axis:
        return f"{_format(q)} along axis {q.axis} (GGUF blocks run along axis {want_axis})"
    d, dtype = _scale_f16(q)
    if d is None:
        return _format(q)
    codes = np.asarray(q.codes())
    zero = None if q.zero_point is None else np.asarray(q.zero_point, np.float32)
    if n_head is not None:
        codes, d = permute_rope_rows(codes, n_head), permute_rope_rows(d, n_head)
        zero = None if zero is None else permute_rope_rows(zero, n_head)
    m = None
    if ggml in ("Q4_1", "Q5_1"):
        with np.errstate(over="ignore"):
            m = (-(zero * d.astype(np.float32))).astype(np.float16)
        if not np.all(np.isfinite(m)):
            return f"{_format(q)}: a zero point times its scale exceeds float16"
    rows = codes.shape[:-1]
    blocks = _blocks(ggml, codes.reshape(-1, _gguf_types.GROUP), d.reshape(-1),
                     None if m is None else m.reshape(-1))  # fmt: skip
    return ggml, blocks.reshape(*rows, -1)


def _float(x: np.ndarray, n_head: int | None) -> tuple[str, np.ndarray] | str:
    """``(ggml type, array)`` of a float tensor in GGUF's row order (1-D as F32)."""
    if x.ndim == 1:
        return "F32", x.astype(np.float32)
    ggml = _gguf_types.FLOAT_TYPES.get(x.dtype.name)
    if ggml is None:
        return f"{x.dtype.name} array"
    if n_head is not None:
        x = permute_rope_rows(x, n_head)
    x = np.ascontiguousarray(x)
    return ggml, x.view(np.uint8) if ggml == "BF16" else x


def _check_config(config: dict[str, Any]) -> tuple[str, LlamaConfig]:
    """The GGUF architecture ``config`` is written as and its `LlamaConfig`, or one ValueError
    listing what llama.cpp's architecture would compute differently."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"write_gguf: the model has model_type {kind!r} (GGUF export writes "
                         f"{', '.join(MODEL_TYPES)})")  # fmt: skip
    arch, problems = ARCHITECTURES[kind], []
    if config.get("attention_bias") and arch not in ("qwen2", "qwen2moe"):
        problems.append("attention biases")
    if config.get("sliding_window") and arch not in _SWA_PATTERN:
        problems.append(f"sliding_window={config['sliding_window']} (llama.cpp's {arch} "
                        "architecture attends to every position)")  # fmt: skip
    rope = config.get("rope_scaling")
    if rope:
        rope_kind = rope.get("rope_type", rope.get("type"))
        if rope_kind not in _ROPE_KEYS or set(rope) - _ROPE_KEYS[rope_kind]:
            problems.append(f"rope_scaling {rope} (GGUF export writes linear and yarn with a "
                            "factor and original context)")  # fmt: skip
    if problems:  # before LlamaConfig, which refuses some of them with less to say
        raise ValueError("write_gguf: the model has " + "; ".join(problems))
    cfg = LlamaConfig.from_hf(config)
    act = ("gelu_pytorch_tanh", "gelu_new") if arch in _GEMMA else ("silu",)
    if cfg.hidden_act not in act:
        problems.append(f"hidden_act={cfg.hidden_act!r} (llama.cpp's {arch} uses {act[0]})")
    caps = {"attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap}  # fmt: skip
    for key, cap in caps.items():
        if arch == "gemma2" and cap is None:  # llama.cpp caps anyway, at 50 and 30
            problems.append(f"no {key} (llama.cpp's gemma2 always caps)")
        elif cap is not None and arch != "gemma2" and (arch, key) != ("gemma3",
                                                                      "final_logit_softcapping"):
            problems.append(f"{key}={cap} (llama.cpp's {arch} does not cap)")
    if arch in _BIG:  # llama.cpp does not store the query scale: it follows the layer count
        scalar = (cfg.hidden_size // cfg.num_heads if cfg.num_layers == _BIG[arch]
                  else cfg.head_dim)  # fmt: skip
        if cfg.query_pre_attn_scalar != scalar:
            problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar:g} (llama.cpp's "
                            f"{arch} scales queries by {scalar} ** -0.5 at {cfg.num_layers} "
                            "layers)")  # fmt: skip
    if arch in ("qwen2", "qwen2moe") and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        problems.append(f"{cfg.num_heads} heads of {cfg.head_dim} (llama.cpp's {arch} wants "
                        f"heads × head_dim = hidden_size {cfg.hidden_size})")  # fmt: skip
    if arch in ("gemma", "gemma2") and not cfg.tie_word_embeddings:
        problems.append(f"an untied lm_head (llama.cpp's {arch} reuses the embedding)")
    if kind in _gguf_export_moe.ARCHITECTURES:
        problems += _gguf_export_moe.problems(cfg, arch)
    if problems:
        raise ValueError("write_gguf: the model has " + "; ".join(problems))
    return arch, cfg


def _metadata(w: gguf.GGUFWriter, config: dict[str, Any], cfg: LlamaConfig, name: str,
              file_type: int) -> None:  # fmt: skip
    """The architecture's hyperparameters, as llama.cpp's converter writes them and
    `jquant.io.gguf.config_from_metadata` reads them back."""
    arch, hidden, heads, head_dim = w.arch, cfg.hidden_size, cfg.num_heads, cfg.head_dim
    w.add_name(name)
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    w.add_rope_freq_base(float(config["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if head_dim != hidden // heads or arch in _GEMMA:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = config.get("rope_scaling")
    if rope:
        kind = rope.get("rope_type", rope.get("type"))
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(float(rope["factor"]))
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcap)
    if cfg.final_logit_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_logit_softcap)
    if arch in _SWA_PATTERN:
        sliding = [cfg.is_sliding(i) for i in range(cfg.num_layers)]
        if cfg.has_sliding:
            w.add_sliding_window(cfg.sliding_window)
            if arch == "gemma3":  # gemma2's sliding layers rotate as the global ones
                w.add_rope_freq_base_swa(cfg.rope_local_theta)
        # llama.cpp's gemma2 slides (4096) unless told otherwise; gemma3 only with a window.
        n = _SWA_PATTERN[arch]
        if sliding != [(i + 1) % n != 0 for i in range(cfg.num_layers)] and (
                cfg.has_sliding or arch == "gemma2"):  # fmt: skip
            w.add_sliding_window_pattern(sliding)
    if cfg.num_experts:
        _gguf_export_moe.add_metadata(w, cfg)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _file_type(tensors: list[tuple[str, str, np.ndarray]]) -> int:
    """`general.file_type`: the ggml type of most matrix elements, as llama.cpp names it."""
    count: dict[str, int] = {}
    for _, ggml, data in tensors:
        if data.ndim >= 2:  # matrices and expert stacks
            n = gguf.quant_shape_from_byte_shape(data.shape, Q[ggml]) if data.dtype == np.uint8 \
                else data.shape  # fmt: skip
            count[ggml] = count.get(ggml, 0) + int(np.prod(n))
    top = max(count, key=count.get) if count else "F32"
    return gguf.LlamaFileType.ALL_F32 if top == "F32" else gguf.LlamaFileType[f"MOSTLY_{top}"]


def write_gguf(params, config: dict[str, Any], tokenizer, path, *, overwrite: bool = False,
               name: str | None = None) -> Path:  # fmt: skip
    """Write a jquant model (one of `MODEL_TYPES`) as one GGUF file llama.cpp loads.

    Args:
      params: the parameter tree (``nnx.State`` or a dict of jquant paths such as
        ``layers/0/mlp/up_proj/kernel``), float arrays or QArrays (see the module docstring
        for those written).
      config: its HF-style config dict (`Checkpoint.config`); ``tie_word_embeddings`` says
        whether ``output.weight`` is written (untied) or llama.cpp reuses the embedding.
      tokenizer: a byte-level BPE or SentencePiece BPE `jquant.io.Tokenizer` (written as
        ``tokenizer.ggml.*``), or None for a file without one (jquant reads it; llama.cpp wants
        a tokenizer).
      path: the ``.gguf`` file to write.
      overwrite: replace an existing file.
      name: ``general.name`` (default: the file's stem).

    Returns:
      The file written. It is written to a temporary file beside ``path`` and renamed at the
      end: an error or an interruption leaves no file at ``path`` (or the old one).

    Raises:
      ValueError: ``path`` exists (without ``overwrite``); a model type not written, or a
        feature llama.cpp's architecture computes otherwise (the module docstring); params
        that do not match ``config``; a tokenizer of another kind, or one llama.cpp would
        encode differently; or tensors no ggml type holds exactly, each listed with its
        format (group size, scale dtype), before anything is written.
    """
    target = Path(os.path.abspath(os.path.expanduser(path)))
    if target.exists() and (not overwrite or target.is_dir()):
        raise ValueError(f"{target} exists; pass overwrite=True (--overwrite) to replace it"
                         if target.is_file() else f"{target} is not a file")  # fmt: skip
    arch, cfg = _check_config(config)
    flat, shapes = model_params(params, config, "write_gguf")
    # llama.cpp's converter permutes the Q/K rows of its llama architecture only.
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads} if arch == "llama" else {}
    tensors, refused = [], []
    for p, value in flat.items():
        if tuple(value.shape) != shapes[p]:
            raise ValueError(f"write_gguf: {p} has shape {tuple(value.shape)}, the config "
                             f"implies {shapes[p]}")  # fmt: skip
        keys = tuple(p.split("/"))
        n_head = next((n for k, n in heads.items() if k in keys), None) if value.ndim == 2 else None
        if isinstance(value, QArray):
            written = _quantized(value, keys[-1], n_head)
        else:
            x = np.asarray(value)
            if arch in _GEMMA and keys[-1] == "scale":  # llama.cpp's Gemma norms hold 1 + w
                x = x.astype(np.float32) + np.float32(1.0)
            written = _float(np.swapaxes(x, -1, -2) if keys[-1] == "kernel" else x, n_head)
        if isinstance(written, str):
            refused.append((p, written))
        else:
            tensors.append((gguf_name(hf_name(keys), arch), *written))
    if refused:
        by_format: dict[str, list[str]] = {}
        for p, why in refused:
            by_format.setdefault(why, []).append(p)
        listed = "; ".join(f"{why}: {', '.join(ps)}" for why, ps in by_format.items())
        raise ValueError(f"write_gguf: {len(refused)} tensor(s) have no GGUF type (GGUF holds "
                         "int8, int4, int5, uint4 and uint5 in groups of 32 with float16 scales "
                         f"as Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1; use a gguf-* recipe): {listed}")
    fields = None if tokenizer is None else gguf_tokenizer_fields(tokenizer,
                                                                   int(config["vocab_size"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch=arch)
        _metadata(w, config, cfg, name or target.stem, _file_type(tensors))
        if fields is not None:
            fields.write(w)
        else:  # the config's special ids, which `load_gguf` reads from the tokenizer keys
            for key, add in (("bos_token_id", w.add_bos_token_id),
                             ("eos_token_id", w.add_eos_token_id)):  # fmt: skip
                if isinstance(config.get(key), int):
                    add(config[key])
        for tensor_name, ggml, data in tensors:
            w.add_tensor(tensor_name, data, raw_dtype=Q[ggml])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
