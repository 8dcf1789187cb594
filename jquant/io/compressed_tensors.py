"""Hugging Face checkpoints in the compressed-tensors format (llm-compressor writes it, vLLM
and transformers load it), read into QArrays and written from them, integer codes as stored.

A quantized linear ``m`` is stored by its config group's format (see `jquant.io._ct_scheme`):

* ``pack-quantized`` (int, 1-8 bits): ``m.weight_packed`` int32 ``(out, ceil(in·b/32))``, the
  codes ``q + 2^(b−1)`` as a little-endian bit stream along ``in`` (`_int32_pack`);
  ``m.weight_shape`` ``[out, in]``; ``m.weight_scale`` ``(out, in/G)`` (group), ``(out, 1)``
  (channel) or one value (tensor); when asymmetric, ``m.weight_zero_point`` packed the same
  way along ``out`` (``(ceil(out·b/32), G)``); an old file's ``m.weight_g_idx``
  (``actorder: "group"``, which compressed-tensors 0.20 removed: the group of each input, all
  −1 for column order), read into the QArray's ``perm`` (`jquant._perm`).
* ``int-quantized`` (int), ``float-quantized`` (FP8 E4M3) and ``naive-quantized`` (either):
  the codes one per element as ``m.weight`` (int8 or F8_E4M3, ``(out, in)``),
  ``m.weight_scale`` and an asymmetric int's ``m.weight_zero_point`` (int8, the scale's shape).
* ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` (FP4 E2M1, jquant's ``nvfp4`` /
  ``mxfp4``): ``m.weight_packed`` uint8 ``(out, in/2)``, ``m.weight_scale`` (E4M3 per 16 /
  E8M0 exponents per 32) and NVFP4's ``m.weight_global_scale``, the reciprocal of jquant's
  per-tensor scale (`jquant.io._fp4_layout` has the layout and what the reciprocal keeps).

compressed-tensors dequantizes ``w = (q − zp)·s`` with ``q`` and ``zp`` signed
(``[−2^(b−1), 2^(b−1) − 1]``). jquant holds a symmetric weight as ``int{b}`` codes ``q``; an
asymmetric one as ``uint{b}`` codes ``q + 2^(b−1)`` with zero point ``zp + 2^(b−1)`` (the same
difference); FP8 as ``fp8_e4m3``. Scales keep their stored dtype and ``dequantize()`` returns
that dtype, as the library's decompression does; FP4 weights dequantize to bfloat16, the
dtype the library's FP4 decompression returns. A W8A8 group's dynamic per-token input
activations become the QArray's ``activation`` (``"int8"`` or ``"fp8_e4m3"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jquant import _perm
from jquant._param_shapes import hf_name
from jquant.qarray import QArray, from_codes

from . import _fp4_layout as fp4
from . import hf
from ._checkpoint import expected_shapes
from ._ct_scheme import (
    FLOAT,
    FP4_FORMATS,
    INT,
    LINEAR,
    MXFP4,
    NVFP4,
    PACKED,
    QUANT_METHOD,
    Scheme,
    Schemes,
    scheme_dict,
)
from ._hf_export import config_json, model_params, refusal, staged, write_tokenizer
from ._int32_pack import pack_int32, packed_words, unpack_int32
from ._packed_writer import check_output_directory
from ._safetensors import write_file
from .tokenizer import tokenizer_from_hf_dir

__all__ = ["read_compressed_tensors", "write_compressed_tensors"]

# jquant model_type -> the transformers class a written config.json names.


def read_compressed_tensors(directory: str | os.PathLike, *, tokenizer: bool = True):
    """Read a compressed-tensors HF directory, quantized linears as QArrays.

    Args:
      directory: ``config.json`` (with ``quantization_config``), safetensors weights and
        optionally a tokenizer, as llm-compressor's ``save_pretrained`` writes them.
      tokenizer: also read the tokenizer (as `jquant.io.load_hf_dir` does).

    Returns:
      ``(config, tensors, tokenizer)``: the `Checkpoint.config` dict, ``{HF name: array}``
      (float32 numpy arrays in HF layout for norms, embeddings and float linears; a `QArray`
      of logical shape ``(in, out)``, storage ``(out, in)``, for each quantized linear
      weight, as `jquant.models.params_from_hf` takes them), and a Tokenizer or None.

    Raises:
      ValueError: not compressed-tensors, a scheme or strategy jquant cannot hold (naming the
        module and the strategy), or a damaged file (a missing or misshapen tensor, codes out
        of range, activation-order group indices whose groups are not ``group_size`` inputs
        each), naming the tensor.

    >>> config, tensors, tok = read_compressed_tensors("Llama-W4A16-G128/")  # doctest: +SKIP
    >>> tensors["model.layers.0.mlp.up_proj.weight"]  # doctest: +SKIP
    QArray(int4, shape=(2048, 8192), axis=-2, g128, 4.250 bits/weight, dtype=bfloat16)
    """
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face directory?")
    raw = json.loads((path / "config.json").read_text())
    if "quantization_config" not in raw:
        raise ValueError(f"{path}/config.json has no quantization_config: not compressed-tensors")
    config = hf.config_from_hf(raw, str(path))
    schemes = Schemes(raw["quantization_config"], f"{path}/config.json")
    entries = {}
    for file in hf._weight_files(path):
        entries.update(hf._file_entries(file, multimodal=False))
    if config["tie_word_embeddings"]:
        entries.pop("lm_head.weight", None)
    tensors, used = {}, set()
    for name, shape in expected_shapes(config).items():
        module, _ = name.rsplit(".", 1)
        matrix = len(shape) == 2 and name.endswith(".weight")  # biases, norms stay float
        linear = matrix and "embed_tokens" not in name
        scheme = schemes.of(module, LINEAR if linear else "Embedding") if matrix else None
        if scheme is None:
            if name not in entries:
                raise ValueError(f"{path}: tensor {name} is missing (the config requires it)")
            if entries[name].shape != shape:
                raise ValueError(f"{path}: tensor {name} has shape {entries[name].shape}, the "
                                 f"config implies {shape}")  # fmt: skip
            tensors[name] = entries[name].load(np.dtype(np.float32))
            used.add(name)
        elif not linear:
            raise ValueError(f"{path}: {module} is quantized by config group {scheme.group!r}; "
                             "jquant reads quantized linear layers only")  # fmt: skip
        else:
            tensors[name] = _read_linear(entries, module, shape, scheme, used, str(path))
    extra = sorted(set(entries) - used)
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {', '.join(extra[:5])}: not part of "
                         "this model or of its quantization scheme")  # fmt: skip
    tok = tokenizer_from_hf_dir(path, config) if tokenizer else None
    return config, tensors, tok


def _read_linear(entries, module: str, shape: tuple[int, int], s: Scheme, used: set,
                 source: str) -> QArray:  # fmt: skip
    """The QArray of linear ``module`` (HF ``shape`` (out, in)) from its stored tensors."""
    out, k = shape
    where = f"{source}: {module} (config group {s.group!r}, strategy {s.strategy!r}"
    where += f"{'' if s.block_structure is None else f' {list(s.block_structure)}'})"

    def read(suffix: str, dtypes: tuple[str, ...]) -> np.ndarray:
        name = f"{module}.{suffix}"
        if name not in entries:
            raise ValueError(f"{source}: tensor {name} is missing ({s.format} {s.strategy} "
                             f"weights need it)")  # fmt: skip
        entry = entries[name]
        if entry.stored_dtype not in dtypes:
            raise ValueError(f"{source}: tensor {name} is {entry.stored_dtype}, expected "
                             f"{' or '.join(dtypes)}")  # fmt: skip
        used.add(name)
        return entry.load(np.dtype(hf._DTYPES[entry.stored_dtype]))

    if s.format in FP4_FORMATS:
        return _read_fp4(read, module, shape, s, source)
    group = _group_size(s, k, where)
    groups = 1 if group is None else -(-k // group)
    scale = read("weight_scale", ("F32", "BF16", "F16"))
    per_tensor = s.strategy == "tensor"
    want = (1,) if per_tensor else (out, groups)
    if (scale.size != 1) if per_tensor else (scale.shape != want):
        raise ValueError(f"{source}: tensor {module}.weight_scale has shape {scale.shape}, "
                         f"expected {want} for {where}")  # fmt: skip
    scale = scale.reshape((1, 1) if per_tensor else want)
    offset = 1 << (s.num_bits - 1)
    zp = None
    if s.format == PACKED:
        stored_shape = read("weight_shape", ("I64", "I32")).tolist()
        if stored_shape != list(shape):
            raise ValueError(f"{source}: tensor {module}.weight_shape is {stored_shape}, the "
                             f"config implies {list(shape)}")  # fmt: skip
        words = read("weight_packed", ("I32",))
        if words.shape != (out, packed_words(k, s.num_bits)):
            raise ValueError(f"{source}: tensor {module}.weight_packed has shape {words.shape}, "
                             f"expected {(out, packed_words(k, s.num_bits))} for {shape} "
                             f"{s.num_bits}-bit codes")  # fmt: skip
        codes = unpack_int32(words, s.num_bits, k).astype(np.int32) - offset
        if not s.symmetric:
            zp_words = read("weight_zero_point", ("I32", "I8"))
            # The library packs the zero points of group and channel schemes only.
            if zp_words.dtype == np.int32 and s.strategy in ("group", "channel"):
                if zp_words.shape != (packed_words(out, s.num_bits), groups):
                    raise ValueError(f"{source}: tensor {module}.weight_zero_point has shape "
                                     f"{zp_words.shape}, expected "
                                     f"{(packed_words(out, s.num_bits), groups)}")  # fmt: skip
                zp = unpack_int32(zp_words, s.num_bits, out, axis=0).astype(np.int32) - offset
            else:
                zp = zp_words.astype(np.int32)
    else:
        codes = read("weight", ("F8_E4M3",) if s.type == "float" else ("I8",))
        if codes.shape != shape:
            raise ValueError(f"{source}: tensor {module}.weight has shape {codes.shape}, the "
                             f"config implies {shape}")  # fmt: skip
        if not s.symmetric:
            zp = read("weight_zero_point", ("I8", "I32")).astype(np.int32)
    if zp is not None:
        if zp.size != scale.size:
            raise ValueError(f"{source}: tensor {module}.weight_zero_point has {zp.size} "
                             f"values, expected one per scale ({scale.size})")  # fmt: skip
        zp = zp.reshape(scale.shape)
    perm = None
    if f"{module}.weight_g_idx" in entries:
        g_idx = read("weight_g_idx", ("I32", "I64"))
        if not np.all(g_idx == -1):  # compressed-tensors' initial value: column order
            perm = _perm.from_g_idx(g_idx, k, group, f"{source}: tensor {module}.weight_g_idx")
    if s.type == "int":
        for name, x in (("weight", codes), ("weight_zero_point", zp)):
            if x is not None and x.size and (x.min() < -offset or x.max() >= offset):
                raise ValueError(f"{source}: tensor {module}.{name} holds codes in "
                                 f"[{x.min()}, {x.max()}], outside the {s.num_bits}-bit range "
                                 f"[{-offset}, {offset - 1}]")  # fmt: skip
        if not s.symmetric:
            codes, zp = codes + offset, (zp + offset).astype(scale.dtype)
        codes = codes.astype(np.uint8 if not s.symmetric else np.int8)
    if perm is not None:  # stored in input order: sort the inputs by group
        codes = codes[:, perm]
    q = from_codes(jnp.asarray(codes), jnp.asarray(scale),
                   None if zp is None else jnp.asarray(zp), qtype=s.qtype, axis=-2,
                   group_size=group, dtype=scale.dtype, perm=perm)  # fmt: skip
    return dataclasses.replace(q, activation=s.activation)


def _read_fp4(read, module: str, shape: tuple[int, int], s: Scheme, source: str) -> QArray:
    """The ``nvfp4`` / ``mxfp4`` QArray of an FP4 linear ``module`` (see `_fp4_layout`)."""
    out, k = shape
    block = FP4_FORMATS[s.format][2]
    if k % block:
        raise ValueError(f"{source}: {module} has in_features={k}, not a multiple of "
                         f"{s.format}'s block of {block}")  # fmt: skip
    packed = read("weight_packed", ("U8",))
    if packed.shape != (out, k // 2):
        raise ValueError(f"{source}: tensor {module}.weight_packed has shape {packed.shape}, "
                         f"expected {(out, k // 2)} for {shape} FP4 codes")  # fmt: skip
    codes = fp4.unpack_nibbles(packed)
    nvfp4 = s.format == NVFP4
    scale = read("weight_scale", ("F8_E4M3",) if nvfp4 else ("U8",))
    if scale.shape != (out, k // block):
        raise ValueError(f"{source}: tensor {module}.weight_scale has shape {scale.shape}, "
                         f"expected {(out, k // block)}")  # fmt: skip
    if nvfp4:
        g = fp4.tensor_scale_of(read("weight_global_scale", ("F32",)),
                                f"{source}: tensor {module}.weight_global_scale")  # fmt: skip
        scale = QArray(qvalue=jnp.asarray(scale), scale=jnp.full((1, 1), g), zero_point=None,
                       qtype="fp8_e4m3", k=k // block, axis=-1, group_size=None,
                       dtype=np.dtype(np.float32))  # fmt: skip
    else:
        scale = fp4.e8m0_of_exponents(scale, f"{source}: tensor {module}.weight_scale")
    return from_codes(jnp.asarray(codes), scale, qtype=s.qtype, axis=-2, group_size=block,
                      dtype=jnp.bfloat16)  # fmt: skip


def _group_size(s: Scheme, k: int, where: str) -> int | None:
    """jquant's group size for scheme ``s`` over ``k`` inputs; ValueError when it has none."""
    if s.strategy in ("tensor", "channel"):
        return None
    if s.strategy == "group" and s.group_size and k % s.group_size == 0:
        return s.group_size
    if s.strategy == "block" and s.block_structure and s.block_structure[0] == 1:
        return s.block_structure[1]  # a row of one block: one scale per bw inputs
    raise ValueError(
        f"{where} does not map onto jquant's QArray: it holds one scale per channel, per "
        f"tensor, per group of inputs dividing in_features={k}, or per [1, G] block"
    )


def write_compressed_tensors(params, config: dict[str, Any], tokenizer, directory, *,
                             overwrite: bool = False) -> Path:  # fmt: skip
    """Write a jquant model as a compressed-tensors HF directory, codes and scales as held.

    Args:
      params: the parameter tree (``nnx.State`` or a dict of jquant paths such as
        ``layers/0/mlp/up_proj/kernel``), float arrays or QArrays, e.g. what
        ``jquant.models.load`` returns for a packed checkpoint.
      config: its HF-style config dict (`Checkpoint.config`).
      tokenizer: a `jquant.io.Tokenizer` (written as tokenizer.json, tokenizer_config.json
        and chat_template.jinja), or None.
      directory: where to write; it must not exist or be empty unless ``overwrite``.
      overwrite: replace an existing non-empty ``directory``.

    Kernels of ``int2``-``int8`` become ``pack-quantized`` (``int8`` with ``activation="int8"``
    or ``"fp8_e4m3"``: ``int-quantized``), ``uint*`` with integer zero points asymmetric
    ``pack-quantized``, ``fp8_e4m3`` ``float-quantized``; per group (``in`` a multiple of the
    group size), per channel or per tensor; ``nvfp4`` (E4M3 block scales of one per-tensor
    scale, as jquant quantizes it) and ``mxfp4`` weight-only kernels ``nvfp4-pack-quantized`` /
    ``mxfp4-pack-quantized``. Float parameters keep their dtype; a quantized embedding table
    is written dequantized, in float32 (compressed-tensors quantizes linear layers). Everything is
    written into a temporary directory renamed into place at the end: an interrupted export
    leaves nothing that loads.

    Returns:
      The directory written.

    Raises:
      ValueError: parameters that do not match ``config``, or quantized ones compressed-tensors
        cannot hold (listed with their formats: nf4, fp8_e5m2, double-quantized scales,
        non-integer zero points, an act-order ``perm``, ...), before
        anything is written.
    """
    target = check_output_directory(directory, overwrite=overwrite)
    flat, shapes = model_params(params, config, "write_compressed_tensors")
    arrays, groups, refused, floats = [], {}, [], []
    for path, value in flat.items():
        name = hf_name(tuple(path.split("/")))
        if tuple(value.shape) != shapes[path]:
            raise ValueError(f"write_compressed_tensors: {path} has shape {tuple(value.shape)}, "
                             f"the config implies {shapes[path]}")  # fmt: skip
        if isinstance(value, QArray) and not path.endswith("kernel"):
            value = value.dequantize(np.float32)  # an embedding table: only linears quantize
        if not isinstance(value, QArray):
            value = np.asarray(value)
            arrays.append((name, value.T if path.endswith("kernel") else value))
            if path.endswith("kernel"):
                floats.append(name[: -len(".weight")])
            continue
        written = _compress(value, name[: -len(".weight")])
        if isinstance(written, str):
            refused.append((path, f"{value.qtype}: {written}"))
            continue
        scheme, tensors = written
        arrays.extend(tensors)
        groups.setdefault(scheme, []).append(name[: -len(".weight")])
    if refused:
        raise refusal("compressed-tensors", refused)
    raw = config_json(config, quantization_config=_quantization_config(groups, floats),
                      torch_dtype=str(np.dtype(dict(arrays)["model.embed_tokens.weight"].dtype)))
    with staged(target, overwrite=overwrite) as tmp:
        write_file(tmp / "model.safetensors", arrays)
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
    return target


def _compress(q: QArray, module: str):
    """``(Scheme, [(name, array), ...])`` of QArray kernel ``q`` as compressed-tensors stores
    it, or a string saying why it cannot."""
    qt, k = q.format, q.k
    if q.perm is not None:
        return ("act-order perm (compressed-tensors 0.20 removed actorder 'group' and its "
                "weight_g_idx; write_gptq writes it as g_idx)")  # fmt: skip
    if qt.kind == "fp4" and q.ndim == 2:
        return _compress_fp4(q, module)
    if isinstance(q.scale, QArray) or q.ndim != 2:
        return "double-quantized scale" if isinstance(q.scale, QArray) else "not 2-D"
    # A short last group: the library's "group" strategy refuses it, its [1, G] blocks pad it.
    short = q.group_size is not None and k % q.group_size != 0
    scale = np.asarray(q.scale)
    tensor = q.group_size is None and scale.size == 1
    strategy = ("tensor" if tensor else "channel" if q.group_size is None
                else "block" if short else "group")  # fmt: skip
    fmt = {"int": PACKED, "uint": PACKED}.get(qt.kind, FLOAT if qt.name == "fp8_e4m3" else None)
    if fmt is None or qt.bits > 8 or (q.activation is not None and qt.bits != 8):
        return "no compressed-tensors format"
    if q.activation is not None and qt.kind == "uint":
        return "asymmetric weights with quantized activations"
    codes = np.asarray(q.codes())
    offset = 1 << (qt.bits - 1)
    out: list[tuple[str, np.ndarray]] = []
    zp = None
    if qt.kind == "uint":
        z = np.asarray(q.zero_point, np.float64)
        if not np.array_equal(z, np.round(z)) or z.min() < 0 or z.max() > 2 * offset - 1:
            return f"zero points not integers in [0, {2 * offset - 1}]"
        zp = z.astype(np.int32) - offset
    if fmt == PACKED and q.activation is None:
        signed = codes.astype(np.int32) - (offset if qt.kind == "uint" else 0)
        out += [(f"{module}.weight_packed", pack_int32(signed + offset, qt.bits)),
                (f"{module}.weight_shape", np.array(codes.shape, np.int64))]  # fmt: skip
        if zp is not None:
            zp_t = zp.reshape(1) if tensor else zp
            out.append((f"{module}.weight_zero_point", zp_t.astype(np.int8) if tensor or short
                        else pack_int32(zp + offset, qt.bits, axis=0)))  # fmt: skip
    else:
        fmt = INT if fmt == PACKED else fmt
        out.append((f"{module}.weight", codes))
    out.insert(0, (f"{module}.weight_scale", scale.reshape(1) if tensor else scale))
    scheme = Scheme(group="", format=fmt, num_bits=qt.bits, type="float" if fmt == FLOAT
                    else "int", symmetric=zp is None, strategy=strategy,
                    group_size=None if short else q.group_size,
                    block_structure=(1, q.group_size) if short else None,
                    activation=q.activation)  # fmt: skip
    return scheme, out


def _compress_fp4(q: QArray, module: str):
    """`_compress` for an ``nvfp4`` / ``mxfp4`` kernel: ``*-pack-quantized`` FP4 tensors."""
    qt = q.format
    if q.activation is not None:
        return f"FP4 weights with {q.activation} activations (compressed-tensors' FP4 schemes " \
               "take FP4 activations or none)"
    if q.k % qt.block_size:
        return f"in_features={q.k} is not a multiple of {qt.name}'s block of {qt.block_size}"
    fmt = NVFP4 if qt.name == "nvfp4" else MXFP4
    _, strategy, block = FP4_FORMATS[fmt]
    out = [(f"{module}.weight_packed", fp4.pack_nibbles(np.asarray(q.codes())))]
    scale = q.scale
    if fmt == NVFP4:
        tensor = isinstance(scale, QArray) and scale.qtype == "fp8_e4m3" and scale.zero_point \
            is None and math.prod(scale.scale.shape) == 1 and not isinstance(scale.scale, QArray)
        if not tensor:
            return "scales not held as E4M3 codes times one per-tensor scale"
        out += [(f"{module}.weight_scale", np.asarray(scale.codes())),
                (f"{module}.weight_global_scale",
                 np.array([fp4.global_scale_of(np.asarray(scale.scale, np.float32))]))]
    else:
        e8m0 = np.asarray(scale)
        if e8m0.dtype != np.dtype(ml_dtypes.float8_e8m0fnu):
            return f"scales of {e8m0.dtype}, not float8_e8m0fnu"
        out.append((f"{module}.weight_scale", np.ascontiguousarray(
            np.broadcast_to(e8m0, (q.shape[-1], q.num_groups))).view(np.uint8)))
    scheme = Scheme(group="", format=fmt, num_bits=4, type="float", symmetric=True,
                    strategy=strategy, group_size=block, block_structure=None,
                    activation=None)  # fmt: skip
    return scheme, out


def _quantization_config(groups: dict[Scheme, list[str]], floats: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` describing ``groups`` (scheme -> module names) exactly:
    one scheme for every quantized linear targets ``Linear`` and ignores the float ones."""
    single = len(groups) == 1
    config_groups = {
        f"group_{i}": scheme_dict(s, [LINEAR] if single else modules)
        for i, (s, modules) in enumerate(groups.items())
    }
    formats = {s.format for s in groups}
    return {"quant_method": QUANT_METHOD, "config_groups": config_groups,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "ignore": sorted(floats) if single else [],
            "kv_cache_scheme": None}  # fmt: skip
