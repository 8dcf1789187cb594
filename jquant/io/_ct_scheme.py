"""compressed-tensors' ``quantization_config``: which scheme each linear module has.

A ``quantization_config`` (what llm-compressor writes into config.json and vLLM reads) lists
``config_groups``, each a scheme (``weights`` / ``input_activations`` QuantizationArgs and an
optional per-group ``format``) with ``targets``; ``ignore`` names modules left in float. A
target or ignore entry is a module name (exact), a ``re:`` regex (``re.match``, a prefix
match) or a module class name (``Linear``). Several groups can match one module: as
compressed-tensors' ``match_targets`` orders them, exact names win over regexes (sorted),
regexes over class names, and a target listed by two groups belongs to the later one.

This module reads the JSON itself (compressed_tensors needs torch); `Scheme` is one
module's weights and activations as jquant can hold them, and `scheme_dict` writes one back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jquant.qtypes import QTYPES

QUANT_METHOD = "compressed-tensors"
# Formats whose tensors jquant reads: int codes packed in int32 words, or one code a byte.
PACKED, INT, NAIVE, FLOAT = "pack-quantized", "int-quantized", "naive-quantized", "float-quantized"
# FP4 E2M1 codes two to a byte: NVFP4 (blocks of 16, E4M3 scales, a per-tensor global scale)
# and MXFP4 (blocks of 32, E8M0 scales), each with the strategy and group size it fixes.
NVFP4, MXFP4 = "nvfp4-pack-quantized", "mxfp4-pack-quantized"
FORMATS = (PACKED, INT, NAIVE, FLOAT, NVFP4, MXFP4)
FP4_FORMATS = {NVFP4: ("nvfp4", "tensor_group", 16), MXFP4: ("mxfp4", "group", 32)}
LINEAR = "Linear"  # the class every jquant Llama projection is (torch.nn.Linear's name)
# jquant's per-token dynamic activation formats by compressed-tensors (type, num_bits).
_ACTIVATIONS = {("int", 8): "int8", ("float", 8): "fp8_e4m3"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Scheme:
    """One module's quantization, as a compressed-tensors config group states it."""

    group: str  # the config group's name, for messages
    format: str  # compression format of its tensors (one of FORMATS)
    num_bits: int  # bits per weight code
    type: str  # "int" or "float"
    symmetric: bool  # no zero point when True
    strategy: str  # "tensor", "channel", "group" or "block"
    group_size: int | None  # elements per scale along the input dim ("group" only)
    block_structure: tuple[int, int] | None  # (rows, cols) per scale ("block" only)
    activation: str | None  # jquant activation format (dynamic per token), or None

    @property
    def qtype(self) -> str:
        """The jquant format of the weight codes (``int4``, ``uint8``, ``fp8_e4m3``)."""
        if self.format in FP4_FORMATS:
            return FP4_FORMATS[self.format][0]
        if self.type == "float":
            return "fp8_e4m3"
        return f"{'int' if self.symmetric else 'uint'}{self.num_bits}"


def _strategy(args: dict[str, Any]) -> str:
    """QuantizationArgs' strategy, inferred from ``group_size`` when absent as the library
    infers it (None: tensor, > 0: group, -1: channel)."""
    if args.get("strategy") is not None:
        return str(args["strategy"]).lower()
    size = args.get("group_size")
    return "tensor" if size is None else "channel" if size == -1 else "group"


def _activation(args: dict[str, Any] | None, where: str) -> str | None:
    if args is None:
        return None
    if (args.get("type"), args.get("num_bits")) == ("float", 4):
        raise ValueError(f"{where}: input_activations are FP4 ({args.get('strategy')}, "
                         f"dynamic {args.get('dynamic')!r}; W4A4, with input_global_scale): "
                         "jquant cannot quantize activations to FP4; FP4 weights load with "
                         "float activations only (a W4A16 scheme such as NVFP4A16)")  # fmt: skip
    fmt = _ACTIVATIONS.get((args.get("type", "int"), args.get("num_bits", 8)))
    dynamic = args.get("dynamic") in (True, "true", "True")
    if fmt is None or not dynamic or _strategy(args) != "token" or not args.get("symmetric", True):
        raise ValueError(
            f"{where}: input_activations {args} are not supported; jquant quantizes "
            "activations dynamically per token, symmetric int8 or float8 (strategy 'token', "
            "dynamic true)"
        )
    return fmt


def _scheme(name: str, raw: Any, default_format: str | None, source: str) -> Scheme:
    where = f"{source}: quantization_config config group {name!r}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: preset shorthand {raw!r} is not supported; expected a "
                         "scheme with 'targets' and 'weights'")  # fmt: skip
    weights = raw.get("weights")
    if raw.get("output_activations") is not None or weights is None:
        raise ValueError(f"{where}: only weight quantization (with optional input "
                         "activations) is supported; it has no 'weights' or has "
                         "'output_activations'")  # fmt: skip
    fmt = raw.get("format") or default_format
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported; jquant reads "
                         f"{', '.join(FORMATS)}")  # fmt: skip
    kind, bits = weights.get("type", "int"), weights.get("num_bits", 8)
    if fmt in FP4_FORMATS:
        _check_fp4(fmt, weights, where)
    elif not (kind == "int" and f"int{bits}" in QTYPES) and (kind, bits) != ("float", 8):
        raise ValueError(f"{where}: weights of type {kind!r} with num_bits={bits!r} have no "
                         "jquant format (int 2-6 or 8 bits, float 8 bits; float 4 bits as "
                         f"{NVFP4} or {MXFP4})")  # fmt: skip
    if fmt not in (NAIVE, *FP4_FORMATS) and (fmt == FLOAT) != (kind == "float"):
        raise ValueError(f"{where}: format {fmt!r} cannot hold {kind} weights of {bits} bits")
    block = weights.get("block_structure")
    return Scheme(
        group=name, format=fmt, num_bits=bits, type=kind,
        symmetric=bool(weights.get("symmetric", True)), strategy=_strategy(weights),
        group_size=weights.get("group_size"), block_structure=None if block is None else
        tuple(int(b) for b in block), activation=_activation(raw.get("input_activations"), where),
    )  # fmt: skip


def _check_fp4(fmt: str, weights: dict[str, Any], where: str) -> None:
    """An FP4 format's weights as jquant's ``nvfp4`` / ``mxfp4`` define them, or ValueError."""
    qtype, strategy, size = FP4_FORMATS[fmt]
    got = (weights.get("type", "int"), weights.get("num_bits", 8), _strategy(weights),
           weights.get("group_size"), bool(weights.get("symmetric", True)))  # fmt: skip
    if got != ("float", 4, strategy, size, True):
        raise ValueError(f"{where}: format {fmt!r} with weights (type, num_bits, strategy, "
                         f"group_size, symmetric) = {got} is not jquant's {qtype}, which is "
                         f"{('float', 4, strategy, size, True)}")  # fmt: skip


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


class Schemes:
    """The ``quantization_config`` of a config.json: `of` gives a module's `Scheme`."""

    def __init__(self, qc: dict[str, Any], source: str):
        if qc.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config has quant_method "
                             f"{qc.get('quant_method')!r}, not {QUANT_METHOD!r}")  # fmt: skip
        sparse = (qc.get("sparsity_config") or {}).get("format")
        if sparse not in (None, "dense") or qc.get("transform_config"):
            what = f"sparsity format {sparse!r}" if sparse not in (None, "dense") else (
                "a transform_config (online rotations)")  # fmt: skip
            raise ValueError(f"{source}: quantization_config has {what}, which jquant does "
                             "not apply")  # fmt: skip
        if qc.get("kv_cache_scheme") is not None:
            raise ValueError(f"{source}: a kv_cache_scheme (quantized KV cache scales) is not "
                             "supported")  # fmt: skip
        self.by_target: dict[str, Scheme] = {}  # later groups take over a shared target
        for name, raw in (qc.get("config_groups") or {}).items():
            scheme = _scheme(name, raw, qc.get("format"), source)
            for target in raw.get("targets") or []:
                self.by_target[target] = scheme
        self.ignore = list(qc.get("ignore") or [])

    def of(self, module: str, cls: str) -> Scheme | None:
        """The scheme of ``module`` (an instance of class ``cls``), None when in float."""
        if any(_matches(module, t) or t == cls for t in self.ignore):
            return None
        named = sorted((t for t in self.by_target if _matches(module, t)),
                       key=lambda t: (t.startswith("re:"), t))  # fmt: skip
        found = named or [t for t in self.by_target if t == cls]
        return self.by_target[found[0]] if found else None


def scheme_dict(s: Scheme, targets: list[str]) -> dict[str, Any]:
    """The config group (QuantizationScheme JSON) of ``s`` for ``targets``."""
    weights = {
        "num_bits": s.num_bits, "type": s.type, "symmetric": s.symmetric,
        "strategy": s.strategy, "group_size": s.group_size,
        "block_structure": None if s.block_structure is None else list(s.block_structure),
        "dynamic": False, "actorder": None,
    }  # fmt: skip
    if s.format in FP4_FORMATS:  # the dtype the library's compressor casts the scales to
        weights["scale_dtype"] = "torch.float8_e4m3fn" if s.format == NVFP4 else "torch.uint8"
    acts = None
    if s.activation is not None:
        kind = "int" if s.activation == "int8" else "float"
        acts = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": "token",
                "group_size": None, "block_structure": None, "dynamic": True,
                "actorder": None}  # fmt: skip
    return {"targets": targets, "weights": weights, "input_activations": acts,
            "output_activations": None, "format": s.format}  # fmt: skip
