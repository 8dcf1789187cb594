"""Which jquant tensors a GGUF file holds, and as which ggml type: one table for the writer
(`jquant.io.gguf_export`) and for ``jquant allocate --gguf`` (`jquant.alloc.table`).

A QArray is written from its own codes and scales, never requantized, so only the formats
whose ggml block holds the same numbers map (the reading side, `jquant.io._gguf_packed`,
documents each block):

==========================  =====  ==================================================
QArray (group 32 along K)   ggml   scales and zero points
==========================  =====  ==================================================
int8                        Q8_0   float16 ``d``: values equal bit for bit
int4                        Q4_0   float16 ``d``; codes stored ``q + 8``: bit for bit
int5                        Q5_0   float16 ``d``; codes stored ``q + 16``: bit for bit
uint4                       Q4_1   float16 ``d``, ``m = −z·d`` rounded to float16
uint5                       Q5_1   likewise
int6 (group 16)             Q6_K   a two-level scale: a QArray of int8 sub-scales
                                   ``sc`` (one per 16) with one float16 ``d`` per 256,
                                   as `jquant.io.load_gguf(packed=True)` reads Q6_K;
                                   ``d·sc·q`` bit for bit
==========================  =====  ==================================================

"float16" is a property of the values: a float16 scale, or a float32 one every value of which
is a float16 (what `jquant.io.load_gguf(packed=True)` reads back); bfloat16 scales are refused
even where their values happen to fit, so that a recipe maps or does not by its settings alone.
The zero point of ``uint*`` may be any float. Float tensors are written as F32, F16 or BF16 by
their dtype (1-D ones, norms, always F32, as llama.cpp's converter writes them).
"""

from __future__ import annotations

from typing import Any

#: Block size of every ggml type below (elements per scale, along K).
GROUP = 32
#: The scale dtype the blocks hold.
SCALE_DTYPE = "float16"
#: (QArray qtype, group size) -> ggml type name (`gguf.GGMLQuantizationType`).
QUANT_TYPES: dict[tuple[str, int], str] = {
    ("int8", GROUP): "Q8_0",
    ("int4", GROUP): "Q4_0",
    ("int5", GROUP): "Q5_0",
    ("uint4", GROUP): "Q4_1",
    ("uint5", GROUP): "Q5_1",
}
#: (qtype, group size) -> ggml K-quant whose scale is a QArray: int8 sub-scales per group,
#: in runs of `SUPER` elements sharing one float16 super-scale.
TWO_LEVEL_TYPES: dict[tuple[str, int], str] = {("int6", 16): "Q6_K"}
SUPER = 256
#: Float dtype name -> ggml type name.
FLOAT_TYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
#: The ggml types whose values equal the QArray's bit for bit (the others move by the float16
#: rounding of ``m``).
EXACT = frozenset(("Q8_0", "Q4_0", "Q5_0", "Q6_K"))


def quant_type(qtype: str, group_size: int | None, scale_dtype: Any) -> str | None:
    """The ggml type of a QArray format, or None when none holds it.

    >>> quant_type("int4", 32, "float16")
    'Q4_0'
    >>> quant_type("int4", 64, "float16") is None
    True
    """
    if str(scale_dtype) != SCALE_DTYPE:
        return None
    return QUANT_TYPES.get((qtype, group_size))


def rule_type(settings: dict[str, Any]) -> str | None:
    """The ggml type a recipe rule's settings (a `jquant.recipe.Rule`'s fields, as
    `jquant.alloc.Candidate.settings` holds them) produce, or None: a quantizing rule needs
    the table's format, group 32 and float16 scales, with no double quantization or
    activation format; a skip rule gives its dtype's type (``"float"``: it keeps the
    tensor's float dtype, whichever of `FLOAT_TYPES`).

    >>> rule_type({"weight": "uint4", "group_size": 32, "scale_dtype": "float16"})
    'Q4_1'
    >>> rule_type({"skip": True, "dtype": "bfloat16"})
    'BF16'
    """
    if settings.get("skip"):
        dtype = settings.get("dtype")
        return "float" if dtype is None else FLOAT_TYPES.get(dtype)
    if settings.get("double_quant") or settings.get("activation") or settings.get("per_tensor"):
        return None
    return quant_type(settings.get("weight"), settings.get("group_size"),
                      settings.get("scale_dtype") or "bfloat16")  # fmt: skip
