"""The environment variables jquant reads, each through one function here.

Everything in ``jquant/`` reads the environment through this module (a test holds it to
that). The ``kernels`` package never imports jquant, so its two variables are read through
``kernels/_env.py`` instead; they are listed here too, so this table is the whole list.

==========================  =====================  ========================================
Variable                    Read by                Meaning
==========================  =====================  ========================================
``JQUANT_CACHE``            `cache_dir`            Cache root, ``~`` expanded; default
                                                   ``~/.cache/jquant``. Downloaded models
                                                   live in it (`jquant.io.cache_dir`), priced
                                                   sensitivity tables under ``sensitivity/``.
``JQUANT_MATMUL``           `matmul_path`          ``auto`` (default), ``xla`` or ``kernel``:
                                                   the quantized matmul path when
                                                   `jquant.ops.set_matmul_path` sets none;
                                                   read at trace time.
``JQUANT_ATTENTION``        `attention_path`       ``auto`` (default), ``xla`` or ``kernel``:
                                                   paged attention's path when
                                                   `jquant.ops.set_attention_path` sets
                                                   none; read at trace time.
``JQUANT_GPU_KERNEL``       ``kernels._env``       Forces one GPU kernel by name
                                                   (``kernels.quantized_matmul.GPU_KERNELS``)
                                                   when a call names none.
``JQUANT_DISPATCH_TABLE``   ``kernels._env``       A dispatch-table JSON (a
                                                   ``benchmarks/kernels.py --out`` run) that
                                                   updates the shipped table.
``JQUANT_NOTEBOOK``         examples only          ``short``: the QAT notebook runs on a tiny
                                                   model (CI).
==========================  =====================  ========================================
"""

from __future__ import annotations

import os
from pathlib import Path


def _read(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    return os.environ.get(name) or None


def cache_dir() -> Path:
    """``$JQUANT_CACHE`` with ``~`` expanded, else ``~/.cache/jquant`` (not created here)."""
    return Path(_read("JQUANT_CACHE") or Path("~") / ".cache" / "jquant").expanduser()


def matmul_path() -> str | None:
    """``$JQUANT_MATMUL`` as set (None when unset); `jquant.ops` checks the value."""
    return _read("JQUANT_MATMUL")


def attention_path() -> str | None:
    """``$JQUANT_ATTENTION`` as set (None when unset); `jquant.ops` checks the value."""
    return _read("JQUANT_ATTENTION")
