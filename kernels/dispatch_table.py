"""When a fused kernel runs under "auto": the largest M (rows of x) at which it beats XLA.

A weight-only kernel dequantizes each weight tile once per block of M rows. At decode (M of
1..16) that is free, since the matmul is bound by reading the weight; at prefill (M in the
thousands) the repeated dequantization costs more than XLA's dequantize-once-then-GEMM, and
published int4 kernels drop to about half of bf16 speed there. So `jquant.ops` runs the
kernel only while M <= the table's limit for (backend, kind) and XLA above it.

`kind` is the weight qtype for weight-only matmuls ("int4", "nf4", "mxfp4", ...),
"w8a8_int8" / "w8a8_fp8" for the W8A8 kernels, "paged_attention" for the paged-attention
kernel, whose M is the query tokens per row (1 at decode, the chunk at prefill; rows come
from `benchmarks/paged_attention.py`), and "grouped_matmul" for the MoE grouped kernel,
whose M is the routed rows (tokens times top-k; rows from `benchmarks/moe_gmm.py`). A limit
of None means "the kernel at every M"; 0, or no entry, means "never under auto".

**No unmeasured kernel by default.** The kernels have run in interpret mode and through
`jax.export` only, so a backend gets kernels under "auto" only from a *measured* table: one
that ships with jquant (`kernels/measured/<backend>.json`, written on that device by
`benchmarks/device.sh` after the kernel tests passed there; none ships yet), or one the user
installs:

    bash benchmarks/device.sh                             # on the device: tests, then timings
    JQUANT_DISPATCH_TABLE=device-out/kernels.json python ...   # or set_dispatch_table(...)

Everywhere else "auto" is XLA (and `jquant.ops` says once per backend how to opt in);
`set_matmul_path("kernel")` still forces a kernel. `table_from_benchmark` turns the
benchmark's rows into limits: for each (backend, kind) the largest measured M such that at
it and at every smaller measured M the kernel was at least as fast as the XLA path
(geometric mean over the measured layer shapes).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping

from . import _env
from ._formats import QTYPES

WEIGHT_ONLY_KINDS = QTYPES  # every format the weight-only kernels decode
W8A8_KINDS = ("w8a8_int8", "w8a8_fp8")
ATTENTION_KINDS = ("paged_attention",)
GROUPED_KINDS = ("grouped_matmul",)
TRANSFORM_KINDS = ("hadamard",)  # `kernels.hadamard`; M: the rows transformed
KINDS = WEIGHT_ONLY_KINDS + W8A8_KINDS + ATTENTION_KINDS + GROUPED_KINDS + TRANSFORM_KINDS
BACKENDS = ("tpu", "gpu")
# Where the measured tables that ship with jquant live: <backend>.json, benchmark JSON.
MEASURED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured")

Table = Mapping[tuple[str, str], "int | None"]

_override: dict[tuple[str, str], int | None] | None = None
_env_cache: tuple[str, dict[tuple[str, str], int | None]] | None = None


def _check_table(table: Mapping) -> dict[tuple[str, str], int | None]:
    out = {}
    for key, limit in table.items():
        if (not isinstance(key, tuple) or len(key) != 2 or key[0] not in BACKENDS
                or key[1] not in KINDS):
            raise ValueError(f"dispatch table key {key!r} must be (backend, kind) with backend "
                             f"in {BACKENDS} and kind in {KINDS}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                  or limit < 0):
            raise ValueError(f"dispatch table limit for {key} must be an int >= 0 or None, "
                             f"got {limit!r}")
        out[key] = limit
    return out


def table_from_benchmark(rows: Iterable[Mapping], backend: str) -> dict[tuple[str, str], int]:
    """Limits from `benchmarks/kernels.py` rows (their "kind", "m", "method", "ms" fields).

    Kinds that lack "kernel" or "xla" rows are left out (no kernel for them under "auto").
    """
    times: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        try:
            kind, m, method, ms = r["kind"], int(r["m"]), r["method"], float(r["ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"benchmark row {dict(r)!r} lacks kind/m/method/ms: {e}") from None
        if method in ("kernel", "xla") and kind in KINDS and ms > 0:
            times[kind][m][method].append(ms)
    table = {}
    for kind, by_m in times.items():
        limit = 0
        for m in sorted(by_m):
            t = by_m[m]
            if not t["kernel"] or len(t["kernel"]) != len(t["xla"]):
                break
            log_ratio = sum(math.log(a / b) for a, b in zip(t["kernel"], t["xla"]))
            if log_ratio > 0:  # geometric mean of kernel/xla above 1: XLA wins here
                break
            limit = m
        table[(backend, kind)] = limit
    return table


def _read(path: str) -> tuple[str, list]:
    """(backend, rows) of a `benchmarks/kernels.py --out` JSON."""
    try:
        with open(path) as f:
            data = json.load(f)
        rows, backend = data["rows"], data["backend"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"dispatch table {path!r} is not a benchmarks/kernels.py --out JSON "
                         f"file: {e}") from None
    if backend not in BACKENDS:
        raise ValueError(f"dispatch table {path!r} was measured on {backend=}; it needs one "
                         f"of {BACKENDS}")
    return backend, rows


def load_table(path: str) -> dict[tuple[str, str], int]:
    """The limits measured in a `benchmarks/kernels.py --out` JSON, for its backend only."""
    backend, rows = _read(path)
    return table_from_benchmark(rows, backend)


@functools.cache
def _shipped(directory: str) -> dict[tuple[str, str], int]:
    table = {}
    for backend in BACKENDS:
        path = os.path.join(directory, f"{backend}.json")
        if not os.path.exists(path):
            continue
        measured_on, rows = _read(path)
        if measured_on != backend:
            raise ValueError(f"shipped dispatch table {path!r} was measured on "
                             f"{measured_on!r}, another backend than its name says")
        table.update(table_from_benchmark(rows, backend))
    return table


def shipped_table() -> dict[tuple[str, str], int]:
    """The measured tables that ship with jquant (`MEASURED_DIR`/<backend>.json), merged."""
    return _shipped(MEASURED_DIR)


def set_dispatch_table(table: Table | None) -> Table | None:
    """Use `table` ((backend, kind) -> max M, or None for every M) from now on, over the
    shipped measurements; None goes back to `$JQUANT_DISPATCH_TABLE` (a benchmark JSON),
    else the shipped tables alone. Returns the previous one.

    >>> old = set_dispatch_table({("gpu", "int4"): 64})  # unlisted kinds: shipped, else XLA
    >>> _ = set_dispatch_table(old)
    """
    global _override
    old = _override
    _override = None if table is None else _check_table(table)
    return old


def current_table() -> Mapping[tuple[str, str], int | None]:
    """The table in effect: the shipped measurements, updated by `set_dispatch_table`'s
    table, else by `$JQUANT_DISPATCH_TABLE`'s. Kinds it lacks run in XLA under "auto"."""
    global _env_cache
    user = _override
    path = _env.read(_env.DISPATCH_TABLE)
    if user is None and path:
        if _env_cache is None or _env_cache[0] != path:
            _env_cache = (path, load_table(path))
        user = _env_cache[1]
    return {**shipped_table(), **(user or {})}


def has_dispatch_table(backend: str) -> bool:
    """Whether a measured (or user-installed) table covers any kind on `backend`."""
    return any(b == backend for b, _ in current_table())


def kernel_max_m(backend: str, kind: str) -> int | None:
    """The largest M at which the kernel of (backend, kind) runs under "auto": None for every
    M, 0 (also for a kind no table covers) for none."""
    if backend not in BACKENDS or kind not in KINDS:
        raise ValueError(f"no dispatch entry for ({backend!r}, {kind!r}); backends "
                         f"{BACKENDS}, kinds {KINDS}")
    return current_table().get((backend, kind), 0)


def prefer_kernel(backend: str, kind: str, m: int) -> bool:
    """True when a measured table says the (backend, kind) kernel beats XLA at M rows."""
    limit = kernel_max_m(backend, kind)
    return limit is None or m <= limit
