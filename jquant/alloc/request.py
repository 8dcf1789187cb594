"""The parts of an allocation request around `measure` / `allocate`: choosing the kernel
candidates by name, naming the recipe after its budget, and writing it out atomically
(what ``jquant allocate`` does with its ``--formats``, ``--name`` and ``-o``).

>>> [c.name for c in select_candidates("uint4-g64,int8")]
['uint4-g64', 'int8']
>>> default_name(target_bits=4.25)
'alloc-4.25bits'
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence


def select_candidates(names: str | Sequence[str] | None, *, gguf: bool = False):
    """The kernel candidates (`jquant.alloc.KERNEL_CANDIDATES` and the FP4 ones in
    `jquant.alloc.FP4_CANDIDATES`, or with ``gguf`` `jquant.alloc.GGUF_KERNEL_CANDIDATES`)
    named by ``names`` (a comma-separated string or a sequence), in that order, each once;
    None: all of `KERNEL_CANDIDATES` (or of the GGUF ones).

    Raises:
      ValueError: an unknown name, or none; the message starts with ``names`` (repr).
    """
    from jquant.alloc import FP4_CANDIDATES, GGUF_KERNEL_CANDIDATES, KERNEL_CANDIDATES

    pool = GGUF_KERNEL_CANDIDATES if gguf else KERNEL_CANDIDATES
    if names is None:
        return pool
    text = names if isinstance(names, str) else ",".join(names)
    known = {c.name: c for c in (pool if gguf else (*KERNEL_CANDIDATES, *FP4_CANDIDATES))}
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in wanted if n not in known]
    if bad or not wanted:
        raise ValueError(f"{text!r}: unknown {', '.join(bad) or 'empty'}; "
                         f"known{' with --gguf' if gguf else ''}: {', '.join(known)}")  # fmt: skip
    return tuple(known[n] for n in dict.fromkeys(wanted))


def default_name(*, target_bits: float | None = None, target_size: str | None = None,
                 fit: str | None = None, context: int | None = None,
                 batch: int | None = None) -> str:  # fmt: skip
    """A recipe name from the budget: ``alloc-4.25bits``, ``alloc-100MB``,
    ``alloc-fit-tpuv5e-4096x8`` (the first budget given, in that order).

    >>> default_name(fit="TPU v5e", context=4096, batch=8)
    'alloc-fit-tpuv5e-4096x8'
    """
    if target_bits is not None:
        return f"alloc-{target_bits:g}bits"
    if target_size is not None:
        return f"alloc-{re.sub(r'[^A-Za-z0-9.]', '', str(target_size))}"
    if fit is None:
        raise ValueError("no budget to name the recipe after: give target_bits, "
                         "target_size or fit")  # fmt: skip
    return f"alloc-fit-{re.sub(r'[^a-z0-9]', '', fit.lower())}-{context}x{batch}"


def write_recipe(recipe, path: str | os.PathLike) -> None:
    """Writes ``recipe`` (a `jquant.Recipe` or its YAML text) to ``path`` atomically: a
    reader sees the old file or the whole new one, never a part (``path.tmp``, then a
    rename); an existing file is replaced."""
    text = recipe if isinstance(recipe, str) else recipe.to_yaml()
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
