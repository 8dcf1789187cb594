"""A model quantized from a GGUF file stores its embedding table and LM head in no more bytes
than the file did.

A GGUF file holds its table already quantized (llama.cpp writes Q8_0 for SmolLM2's, Q4_0 or
K-quants for others). A recipe's rule for the table (INT8 per row, bfloat16, float) can take
more bytes than that without carrying more information, and a large vocabulary makes the
table most of a small model. So where the recipe's rule would store the table or the head in
more bytes than the file, the file's own format is kept: Q8_0, Q4_0, Q5_0 and Q6_K as the
file's blocks (`jquant.io._gguf_packed`: exact, in the file's bytes), Q4_1 and Q5_1 likewise
with the zero point ``-m/d`` rounded to float16 (the file's bytes; the values move by at most
a few thousandths of a step), a float type in its dtype. For any other type
(Q4_K and the other K-quants, the I-quants) the recipe's format is kept and a warning names
the tensor, both sizes and a smaller rule to add: refusing would stop every common Q4_K_M
file, whose table is Q4_K. The other matrices follow the recipe as written: a recipe asking
for 8 bits from a 4-bit file gets them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jquant import algorithms, tree
from jquant.io import _gguf_types
from jquant.qarray import QArray
from jquant.recipe import SCALE_DTYPES, Recipe, Rule

# jquant path -> the GGUF tensor it is read from.
TENSORS = {"embed_tokens/embedding": "token_embd.weight", "lm_head/kernel": "output.weight"}
# Kept as the file's blocks in the file's bytes: the types a QArray holds exactly, and the
# affine Q4_1 / Q5_1 once their float32 scale and zero point are stored as float16.
_AFFINE = ("Q4_1", "Q5_1")
_AS_FILE = frozenset(_gguf_types.EXACT | set(_AFFINE))


def _file_rule(ggml: str) -> dict | None:
    """Skip-rule settings storing a tensor in the float ggml type ``ggml``'s dtype, or None."""
    for dtype, name in _gguf_types.FLOAT_TYPES.items():
        if name == ggml:
            return {"skip": True, "dtype": dtype}
    return None


def _packed(record, leaf, path: str) -> Callable[[], QArray]:
    """A function reading the file's tensor ``record`` as the QArray of ``leaf`` at ``path``,
    in the file's bytes."""
    from jquant.io._gguf_packed import qarray_from_blocks

    embedding = path == "embed_tokens/embedding"
    shape = tuple(leaf.shape) if embedding else tuple(leaf.shape)[::-1]  # the file's (rows, cols)

    def read() -> QArray:
        q = qarray_from_blocks(record.read(), record.tensor_type, shape, embedding=embedding,
                               name=record.name)  # fmt: skip
        if record.tensor_type.name not in _AFFINE:
            return q
        # The file's float16 d, and z = -m/d rounded to float16. Where that moves some z by
        # more than 1/64 of a step (a block far from 0: |z| past 64), both stay float32, a
        # fifth more than the file's bytes.
        z = np.asarray(q.zero_point, np.float32)
        z16 = z.astype(np.float16)
        if not np.all(np.abs(z16.astype(np.float32) - z) <= 2.0**-6):
            return q
        return dataclasses.replace(q, scale=q.scale.astype(np.float16), zero_point=z16)

    return read


def stored_bytes(rule: Rule | None, path: str, leaf) -> int:
    """Bytes the leaf ``leaf`` (an array or shape placeholder) at ``path`` takes under
    ``rule`` (a recipe's match, or None), computed from shapes alone: every algorithm of a
    format stores the same codes, scales and zero points, so round-to-nearest's count is
    theirs."""
    elements = math.prod(leaf.shape)
    probe = Recipe(name="probe", rules=(rule,)) if rule is not None and not rule.skip else None
    resolved = None if probe is None else tree.rule_for(probe, path, leaf)
    if resolved is None:
        keep = rule is not None and rule.skip and rule.dtype is not None
        return elements * np.dtype(SCALE_DTYPES[rule.dtype] if keep else leaf.dtype).itemsize
    q = jax.eval_shape(lambda w: algorithms.run("rtn", w, resolved, path=path), leaf)
    return q.nbytes


def within_gguf(recipe: Recipe, source: str, leaves: dict, *, allow_larger: bool = False
                ) -> tuple[Recipe, dict[str, Callable[[], Any]]]:  # fmt: skip
    """``(recipe, kept)`` for the table and head that ``recipe`` would store in more bytes than
    the GGUF file ``source``: the recipe with a rule put first for those the file stores in a
    float type, and ``kept``, path -> a function reading the QArray of the file's blocks, for
    the others.

    Args:
      recipe: the recipe to run.
      source: the checkpoint's path; anything but a ``.gguf`` file returns ``(recipe, {})``.
      leaves: the model's parameters by path (shape placeholders), as the recipe sees them.
      allow_larger: return ``(recipe, {})``: the table and head as the recipe says.

    Warns where the recipe stores the table or head in more bytes than the file, in a ggml
    type jquant holds in no fewer bytes than the recipe (they stay as the recipe says).
    """
    if allow_larger or not str(source).lower().endswith(".gguf"):
        return recipe, {}
    from jquant.io._gguf_reader import read_gguf

    in_file = {t.name: t for t in read_gguf(source).tensors}
    kept: dict[str, Callable[[], Any]] = {}
    by_rule: dict[str, list[str]] = {}
    for path, name in TENSORS.items():
        if path not in leaves or name not in in_file:
            continue
        record, leaf = in_file[name], leaves[path]
        want = stored_bytes(recipe.match(path), path, leaf)
        if want <= record.n_bytes:
            continue
        ggml = record.tensor_type.name
        if ggml in _AS_FILE:
            kept[path] = _packed(record, leaf, path)
        elif _file_rule(ggml) is not None:
            by_rule.setdefault(ggml, []).append(path)
        else:
            warnings.warn(
                f"{source}: recipe {recipe.name!r} stores {path} in {want / 1e6:.2f} MB, "
                f"more than the file's {ggml} {name} ({record.n_bytes / 1e6:.2f} MB), and "
                f"jquant holds {ggml} in no fewer bytes, so it is stored as the recipe says. "
                f"For a smaller model put a smaller rule for it first in the recipe (e.g. "
                f"weight: int4, group_size: 32, scale_dtype: float16 takes "
                f"{0.5625 * math.prod(leaf.shape) / 1e6:.2f} MB)", stacklevel=2)  # fmt: skip
    if not by_rule:
        return recipe, kept
    tied = "lm_head/kernel" not in leaves
    first = []
    for ggml, paths in by_rule.items():
        if tied:  # the head is the table: the same rule, or the model would be untied
            paths = [*paths, "lm_head/kernel"]
        first.append({"pattern": "(^|/)(" + "|".join(paths) + ")$", **_file_rule(ggml)})
    recipe = Recipe(name=recipe.name, description=recipe.description,
                    rules=(*first, *recipe.rules), require_match=recipe.require_match)  # fmt: skip
    return recipe, kept
