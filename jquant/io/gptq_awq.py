"""GPTQ (GPTQModel / AutoGPTQ) and AWQ (GEMM) Hugging Face checkpoints: import and export.

`read_gptq_awq` reads such a directory as jquant tensors: every quantized linear becomes a
`jquant.qarray.QArray` of ``uint{bits}`` codes, its scales in their stored dtype and float zero
points, with the integer codes exactly the file's (no float detour); every other tensor is a
float32 array in HF layout, as `jquant.io.load_hf_dir` gives it. `write_gptq` writes a jquant
model whose quantized kernels are ``uint{2,3,4,8}`` or ``int{2,3,4,8}`` as a GPTQ directory
(v2 or v1 zero points). The layouts are described in `jquant.io._gptq_layout`.

>>> config, tensors, tok = read_gptq_awq("Llama-3.2-1B-GPTQ/")  # doctest: +SKIP
>>> cfg = LlamaConfig.from_hf(config)  # doctest: +SKIP
>>> model, params = jquant.models.params_from_hf(tensors, cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jquant import qtypes
from jquant.qarray import QArray, from_codes

from . import _gptq_layout as layout
from ._checkpoint import check_tensors, expected_shapes
from ._hf_export import config_json, refusal, refuse_rotated, staged, write_tokenizer
from ._lazy import LazyTensors, TensorEntry
from ._packed_writer import check_output_directory
from ._safetensors import write_file
from .hf import _DTYPES, _file_entries, _weight_files, config_from_hf
from .tokenizer import Tokenizer, tokenizer_from_hf_dir

__all__ = ["read_gptq_awq", "write_gptq"]

_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_FORMATS = {"gptq": 1, "gptq_v2": 2}


def _quant_config(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The quantization config: config.json's ``quantization_config``, else the
    ``quantize_config.json`` AutoGPTQ writes beside it."""
    found = raw.get("quantization_config")
    if found is None and (path / "quantize_config.json").is_file():
        found = json.loads((path / "quantize_config.json").read_text())
        found.setdefault("quant_method", "gptq")
    if not isinstance(found, dict):
        raise ValueError(
            f"{path}: config.json has no quantization_config (and there is no "
            "quantize_config.json); this is not a GPTQ or AWQ checkpoint"
        )
    return found


def _group_size(path: Path, qc: dict[str, Any], key: str) -> int | None:
    g = qc.get(key, 128)
    if g == -1 or g is None:
        return None
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"{path}: quantization_config {key}={g!r} is not -1 or a positive int")
    return g


def _scheme(path: Path, qc: dict[str, Any]) -> tuple[str, int, int | None, int]:
    """``(method, bits, group_size, gptq version)`` of a quantization config."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in _FORMATS:
            raise ValueError(f"{path}: GPTQ checkpoint_format {fmt!r} is not supported; jquant "
                             f"reads {', '.join(_FORMATS)}")  # fmt: skip
        return method, qc.get("bits", 4), _group_size(path, qc, "group_size"), _FORMATS[fmt]
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{path}: AWQ version {version!r} is not supported; jquant reads "
                             "'gemm'")  # fmt: skip
        if qc.get("zero_point", True) is not True:
            raise ValueError(f"{path}: AWQ without zero points is not supported")
        bits = qc.get("bits", qc.get("w_bit", 4))
        size = "group_size" if "group_size" in qc else "q_group_size"
        return method, bits, _group_size(path, qc, size), 2
    raise ValueError(f"{path}: quant_method {method!r} is neither 'gptq' nor 'awq'")


def _dynamic_rules(path: Path, qc: dict[str, Any]) -> list[tuple[bool, re.Pattern, dict]]:
    """GPTQModel's per-module overrides (``quantization_config["dynamic"]``) in their order:
    ``(excluded, pattern, overrides)``; a ``-:`` pattern excludes the modules it matches from
    quantization, a ``+:`` one (or a bare one) overrides the base scheme's keys for them."""
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"{path}: quantization_config 'dynamic' must map patterns to "
                         f"overrides, got {type(dynamic).__name__}")  # fmt: skip
    rules = []
    for pattern, overrides in dynamic.items():
        excluded = pattern.startswith("-:")
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            compiled = re.compile(raw)
        except re.error as e:
            raise ValueError(f"{path}: quantization_config 'dynamic' pattern {pattern!r} is not "
                             f"a regular expression ({e})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"{path}: quantization_config 'dynamic'[{pattern!r}] must be a "
                             f"dict of overrides, got {overrides!r}")  # fmt: skip
        rules.append((excluded, compiled, overrides))
    return rules


def _override(rules, module: str) -> dict | bool | None:
    """GPTQModel's choice for ``module``: the first rule whose pattern matches its start
    (``re.match``): False when it excludes it, its overrides otherwise; None: no rule."""
    for excluded, pattern, overrides in rules:
        if pattern.match(module):
            return False if excluded else overrides
    return None


def read_gptq_awq(
    directory: str | Path, *, tokenizer: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray | QArray], Tokenizer | None]:
    """Read a GPTQ or AWQ (GEMM) Hugging Face directory, dispatching on ``quant_method``.

    Args:
      directory: ``config.json`` (with a ``quantization_config``, or a
        ``quantize_config.json`` beside it) and safetensors weights.
      tokenizer: also read the tokenizer, as `jquant.io.load_hf_dir` does.

    Returns:
      ``(config, tensors, tokenizer)``: ``config`` is the `jquant.io.Checkpoint` config
      (`jquant.io.hf.config_from_hf`); ``tensors`` maps HF names to float32 arrays in HF layout
      or, for each quantized linear ``<module>.weight``, a `QArray` of logical shape
      ``(in, out)`` (``uint{bits}`` codes as stored, scales in their stored dtype (float16,
      bfloat16 or float32), float16 zero points: GPTQ
      v2 and AWQ as stored, GPTQ v1 stored + 1; ``group_size=None`` for per-channel; an
      act-order ``g_idx`` becomes the QArray's ``perm``, the codes sorted by group, and a
      trivial one none) that `jquant.models.params_from_hf` takes as it is.

    Raises:
      FileNotFoundError: no such directory or no ``config.json``.
      ValueError: an unsupported scheme (bits, AWQ GEMV, per-module overrides), or a tensor
        missing, misshapen or of the wrong length, or a ``g_idx`` whose groups are not
        ``group_size`` inputs each, named.
    """
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    raw = json.loads((path / "config.json").read_text())
    config = config_from_hf(raw, str(path))
    qc = _quant_config(path, raw)
    method, bits, group_size, version = _scheme(path, qc)
    rules = _dynamic_rules(path, qc) if method == "gptq" else []
    entries: dict[str, TensorEntry] = {}
    for file in _weight_files(path):
        entries.update(_file_entries(file, multimodal=False))
    if config["tie_word_embeddings"]:
        entries.pop("lm_head.weight", None)
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name in list(entries):
        prefix, _, part = name.rpartition(".")
        if part in _PARTS and (part != "g_idx" or method == "gptq"):
            entry = entries.pop(name)
            modules.setdefault(prefix, {})[part] = entry.load(np.dtype(_DTYPES[entry.stored_dtype]))
    expected = expected_shapes(config)
    tensors: dict[str, np.ndarray | QArray] = {}
    for prefix, parts in modules.items():
        perm, m_bits, m_group = None, bits, group_size
        override = _override(rules, prefix)
        if override is False:
            raise ValueError(f"{path}: {prefix} holds GPTQ tensors, but quantization_config "
                             "'dynamic' excludes it from quantization")  # fmt: skip
        if override:
            m_bits = override.get("bits", bits)
            if "group_size" in override:
                m_group = _group_size(path, override, "group_size")
            if m_bits not in layout.GPTQ_BITS:
                raise ValueError(f"{path}: quantization_config 'dynamic' gives {prefix} "
                                 f"bits={m_bits!r}; GPTQ packs {layout.GPTQ_BITS}")  # fmt: skip
        if method == "gptq":
            codes, scale, zero, perm = layout.gptq_to_codes(
                prefix, parts, bits=m_bits, group_size=m_group, version=version
            )
        else:
            codes, scale, zero = layout.awq_to_codes(prefix, parts, group_size=group_size,
                                                     bits=bits)  # fmt: skip
        tensors[f"{prefix}.weight"] = from_codes(
            codes if perm is None else codes[:, perm], scale, zero, qtype=f"uint{m_bits}",
            axis=-2, group_size=m_group, dtype=np.float32, perm=perm,
        )  # fmt: skip
        bias = f"{prefix}.bias"
        # AutoGPTQ saved a bias buffer for every module; an all-zero one the model lacks is none.
        if bias in entries and bias not in expected and not entries[bias].load(np.float32).any():
            entries.pop(bias)
    shapes = {n: TensorEntry(shape=tuple(q.shape[::-1]), stored_dtype="Q", load=None)
              for n, q in tensors.items()}  # fmt: skip
    check_tensors(LazyTensors({**entries, **shapes}, str(path)), config, str(path))
    for name, entry in entries.items():
        tensors[name] = entry.load(np.dtype(np.float32))
    tok = tokenizer_from_hf_dir(path, config) if tokenizer else None
    return config, tensors, tok


# ---- export -----------------------------------------------------------------------------


def _as_uint(q: QArray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray] | str:
    """``(bits, codes (out, in), scale, zero point)`` of a quantized kernel as unsigned codes
    in logical input order with integer zero points, or why it has no GPTQ form."""
    qt = qtypes.get(q.qtype)
    if qt.kind not in ("int", "uint") or qt.bits not in layout.GPTQ_BITS:
        return f"{qt.name} (GPTQ stores uint/int {', '.join(map(str, layout.GPTQ_BITS))}-bit)"
    if isinstance(q.scale, QArray):
        return f"{qt.name} with double-quantized scales"
    if q.axis != -2 or len(q.shape) != 2:
        return f"{qt.name} of shape {q.shape} contracted on axis {q.axis} (not a 2-D kernel)"
    if q.activation is not None:
        return f"{qt.name} with {q.activation} activations"
    codes = np.asarray(q.codes()).astype(np.int64)
    if q.perm is not None:  # stored position j is input perm[j]
        codes[:, np.asarray(q.perm)] = codes.copy()
    scale = np.asarray(q.scale)
    half = 1 << (qt.bits - 1)
    if qt.kind == "int":
        return qt.bits, codes + half, scale, np.full(scale.shape, float(half))
    zero = np.asarray(q.zero_point, np.float64)
    if not np.array_equal(zero, np.round(zero)):
        return f"{qt.name} with non-integer zero points"
    return qt.bits, codes, scale, zero


def write_gptq(
    tensors: Mapping[str, np.ndarray | QArray], config: dict[str, Any],
    tokenizer: Tokenizer | None, directory: str | Path, *,
    version: int = 2, overwrite: bool = False, round_scales: bool = False,
) -> Path:  # fmt: skip
    """Write a jquant model as a GPTQ checkpoint directory (``checkpoint_format`` "gptq_v2"
    for ``version=2``, "gptq" for ``version=1``).

    Every quantized linear ``<module>.weight`` becomes ``<module>.qweight``/``qzeros``/
    ``scales``/``g_idx`` (trivial ``g_idx``, or for a QArray with a ``perm`` its act-order
    ``g_idx`` and the codes in input order, and then ``desc_act: true``); every float tensor
    is written as it is (its own dtype). ``int{b}`` codes are written as ``uint{b}`` with zero
    point ``2^(b−1)``.

    Args:
      tensors: ``{hf_name: tensor}`` as `read_gptq_awq` returns them: float arrays in HF
        layout, QArrays (logical ``(in, out)``) at quantized linears; for a model's
        parameter State, ``jquant.models.params_to_hf(params)``.
      config: the `jquant.io.Checkpoint` config (HF keys), written as ``config.json``.
      tokenizer: written as ``tokenizer.json`` (+ template, special tokens), or None.
      directory: the output directory, written in a temporary sibling and renamed.
      version: 2 stores zero points as they are (in ``[0, 2^b − 1]``); 1 stores them minus
        one (so they must lie in ``[1, 2^b]``).
      overwrite: replace an existing non-empty ``directory``.
      round_scales: allow scales that float16 (GPTQ's scale dtype) does not hold exactly to be
        rounded to it; by default such scales are refused (bfloat16 scales above 2^-17 fit).

    Returns:
      The directory.

    Raises:
      ValueError: a bad ``version``, an existing directory without ``overwrite``, or
        parameters with no GPTQ form, each listed with its format: a format other than
        uint/int 2/3/4/8 (nf4, fp8, int5, ...), non-integer or out-of-range zero points,
        scales float16 cannot hold. A quantized embedding table is written dequantized, in
        float32 (GPTQ quantizes linear layers only).

    Kernels of other bit widths or group sizes than the most common (mixed-precision
    recipes) are written with GPTQModel's per-module ``dynamic`` overrides
    (``"+:^<module>$": {"bits": b, "group_size": g}``), and the float linears of the decoder
    layers as excluded (``"-:^<module>$": {}``).
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2 (GPTQ v1 or v2 zero points), got {version!r}")
    refuse_rotated(config, "write_gptq")
    target = check_output_directory(directory, overwrite=overwrite)
    out: list[tuple[str, np.ndarray]] = []
    problems: list[tuple[str, str]] = []
    schemes: dict[tuple[int, int | None], list[str]] = {}
    zero_ranges = {1: (1, 0), 2: (0, -1)}  # (low, offset from 2^b) per version
    low, top = zero_ranges[version]
    symmetric, act_order = True, False
    for name, value in tensors.items():
        if not isinstance(value, QArray):
            out.append((name, np.ascontiguousarray(np.asarray(value))))
            continue
        if name == "model.embed_tokens.weight":  # GPTQ quantizes linear layers only
            out.append((name, np.asarray(value.dequantize(np.float32))))
            continue
        got = _as_uint(value)
        if isinstance(got, str):
            problems.append((name, got))
            continue
        bits, codes, scale, zero = got
        if zero.min() < low or zero.max() > (1 << bits) + top:
            problems.append((name,
                f"{value.qtype} zero points in [{zero.min():g}, {zero.max():g}], outside "
                f"[{low}, {(1 << bits) + top}] (GPTQ v{version})"
                + (": write version=1" if version == 2 and zero.min() >= 1 else "")
                + (": write version=2" if version == 1 and zero.max() < (1 << bits) else "")
            ))  # fmt: skip
            continue
        half = scale.astype(np.float16)
        if not np.isfinite(half).all() or (
            not round_scales and not np.array_equal(half.astype(np.float32),
                                                    scale.astype(np.float32))
        ):  # fmt: skip
            problems.append((name, f"{value.qtype} scales ({scale.dtype}) that float16 does "
                                   "not hold exactly (pass round_scales=True to round them)"))
            continue
        schemes.setdefault((bits, value.group_size), []).append(name)
        symmetric = symmetric and bool(np.all(zero == 1 << (bits - 1)))
        perm = None if value.perm is None else np.asarray(value.perm)
        act_order = act_order or perm is not None
        parts = layout.codes_to_gptq(codes, half, zero, bits=bits, group_size=value.group_size,
                                     version=version, perm=perm)  # fmt: skip
        prefix = name.removesuffix(".weight")
        out.extend((f"{prefix}.{part}", parts[part]) for part in _PARTS)
    if problems:
        raise refusal("GPTQ", problems)
    if not schemes:
        raise ValueError("the model has no quantized kernels to write as GPTQ")
    # The scheme of the most kernels is the base; the others, and the float linears of the
    # decoder layers, are GPTQModel's per-module ``dynamic`` overrides (exact names).
    (bits, group_size), _ = max(schemes.items(), key=lambda item: len(item[1]))
    dynamic: dict[str, dict[str, int]] = {}
    for name, value in tensors.items():
        module = name.removesuffix(".weight")
        literal = f"^{re.escape(module)}$"
        if isinstance(value, QArray):
            b, g = value.format.bits, value.group_size
            if (b, g) != (bits, group_size):
                dynamic[f"+:{literal}"] = {"bits": b, "group_size": -1 if g is None else g}
        elif name.startswith("model.layers.") and name.endswith(".weight") and value.ndim == 2:
            dynamic[f"-:{literal}"] = {}
    quant = {
        "quant_method": "gptq", "bits": bits,
        "group_size": -1 if group_size is None else group_size,
        "desc_act": act_order, "sym": symmetric, "true_sequential": True,
        "lm_head": isinstance(tensors.get("lm_head.weight"), QArray),
        "checkpoint_format": "gptq_v2" if version == 2 else "gptq",
        "pack_dtype": "int32",
    }  # fmt: skip
    if dynamic:
        quant["dynamic"] = dynamic
    hf_config = config_json(config, torch_dtype="float16", quantization_config=quant)
    with staged(target, overwrite=overwrite) as tmp:
        write_file(tmp / "model.safetensors", out)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "quantize_config.json").write_text(json.dumps(quant, indent=2))
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
    return target
