"""When a fused kernel is worth running: the largest M (rows of x) at which it beats XLA.

A weight-only kernel dequantizes each weight tile once per block of M rows. At decode (M of
1..16) that is free, since the matmul is bound by reading the weight; at prefill (M in the
thousands) the repeated dequantization costs more than XLA's dequantize-once-then-GEMM, and
published int4 kernels drop to about half of bf16 speed there. So `jquant.ops` runs the
kernel only while M <= the table's limit for (backend, kind) and XLA above it.

`kind` is the weight qtype for weight-only matmuls ("int4", "nf4", ...) and "w8a8_int8" /
"w8a8_fp8" for the W8A8 kernels. A limit of None means "the kernel at every M".

The built-in table is **not a measurement**: no GPU or TPU was available when it was
written. Its limits follow the published shape of the curve (weight-only wins at small M,
loses at large M; 8-bit x 8-bit GEMMs win at large M). Replace it from a benchmark run:

    python benchmarks/kernels.py --out kernels.json       # on the device
    JQUANT_DISPATCH_TABLE=kernels.json python ...         # or set_dispatch_table(...)

`table_from_benchmark` turns the benchmark's rows into limits: for each (backend, kind) the
largest measured M such that at it and at every smaller measured M the kernel was at least
as fast as the XLA path (geometric mean over the measured layer shapes).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping

WEIGHT_ONLY_KINDS = ("int8", "int4", "uint4", "nf4", "fp8_e4m3", "fp8_e5m2")
W8A8_KINDS = ("w8a8_int8", "w8a8_fp8")
KINDS = WEIGHT_ONLY_KINDS + W8A8_KINDS
BACKENDS = ("tpu", "gpu")

Table = Mapping[tuple[str, str], "int | None"]

# Unmeasured defaults (see the module docstring): weight-only kernels up to M = 256, W8A8
# kernels at every M.
DEFAULT_TABLE: dict[tuple[str, str], int | None] = {
    **{(b, kind): 256 for b in BACKENDS for kind in WEIGHT_ONLY_KINDS},
    **{(b, kind): None for b in BACKENDS for kind in W8A8_KINDS},
}

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

    Kinds that lack "kernel" or "xla" rows are left out (the default applies to them).
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


def load_table(path: str) -> dict[tuple[str, str], int | None]:
    """The default table updated with the limits measured in a `benchmarks/kernels.py` JSON."""
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
    return {**DEFAULT_TABLE, **table_from_benchmark(rows, backend)}


def set_dispatch_table(table: Table | None) -> Table | None:
    """Use `table` ((backend, kind) -> max M or None) from now on; None goes back to
    `$JQUANT_DISPATCH_TABLE` (a benchmark JSON), else the defaults. Returns the old one.

    >>> old = set_dispatch_table({("gpu", "int4"): 64})  # unlisted keys keep their default
    >>> _ = set_dispatch_table(old)
    """
    global _override
    old = _override
    _override = None if table is None else {**DEFAULT_TABLE, **_check_table(table)}
    return old


def current_table() -> Mapping[tuple[str, str], int | None]:
    """The table in effect: `set_dispatch_table`'s, else `$JQUANT_DISPATCH_TABLE`'s, else
    `DEFAULT_TABLE`."""
    global _env_cache
    if _override is not None:
        return _override
    path = os.environ.get("JQUANT_DISPATCH_TABLE")
    if not path:
        return DEFAULT_TABLE
    if _env_cache is None or _env_cache[0] != path:
        _env_cache = (path, load_table(path))
    return _env_cache[1]


def kernel_max_m(backend: str, kind: str) -> int | None:
    """The largest M at which the kernel of (backend, kind) should run; None for no limit."""
    if backend not in BACKENDS or kind not in KINDS:
        raise ValueError(f"no dispatch entry for ({backend!r}, {kind!r}); backends "
                         f"{BACKENDS}, kinds {KINDS}")
    return current_table().get((backend, kind))


def prefer_kernel(backend: str, kind: str, m: int) -> bool:
    """True when the table says the (backend, kind) kernel beats XLA at M rows."""
    limit = kernel_max_m(backend, kind)
    return limit is None or m <= limit
