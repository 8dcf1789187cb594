"""Time one layer of paged attention, XLA against the Pallas kernel, as the serving step runs it.

    python benchmarks/paged_attention.py --out device-out/paged_attention.json   # GPU / TPU
    python benchmarks/paged_attention.py --shapes small                          # CPU smoke

What is timed: one `PagedView` layer step, jitted with the cache donated as the serving
programs donate it: write the new keys and values, then attention of the queries over the
pages their block tables list, with the attention path fixed to `xla` (gather the pages,
`jquant.models.attention.attend`) or `kernel` (`jquant.kernels.paged_attention`, the pages
read in place). Per (heads, kv heads, head_dim) of a model, KV-cache format, rows, context
and query tokens per row S (1: decode, 16 and 128: prefill chunks) it reports the median
time, the GB/s of the pages the queries may read (K and V, scales included, once each),
the fraction of HBM peak (the table in `benchmarks/kernels.py`) and the kernel's speedup
over XLA. On CPU the kernel would only run interpreted, which is not a speed, so only XLA
is timed there. The cache holds zeros: speed does not depend on values. It prints a table
and never asserts speed.

The JSON's rows (kind "paged_attention", m = S) are a dispatch table for the kernel: merged
into a `benchmarks/kernels.py` JSON (`benchmarks/device.sh` does it) or alone as
`JQUANT_DISPATCH_TABLE=...`, "auto" runs the kernel at each S up to the largest at which it
was at least as fast as XLA over every shape measured (`kernels/dispatch_table.py`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jquant import kernels
from jquant.models.cache import PagedView, init_paged_cache, kv_format
from jquant.models.config import LlamaConfig

# (name, heads, kv heads, head_dim) of the attention of real models.
FULL_MODELS = (("llama3-8b", 32, 8, 128), ("smollm2-135m", 9, 3, 64))
FULL_FORMATS = ("bfloat16", "int8", "fp8")
FULL_CASES = ((1, 32, 2048), (1, 32, 512), (16, 4, 2048), (128, 4, 2048))  # (S, rows, context)
SMALL_MODELS = (("tiny", 4, 2, 16),)
SMALL_FORMATS = ("bfloat16", "int8")
SMALL_CASES = ((1, 2, 64), (16, 2, 64))
PAGE_SIZE = 16


def _hbm_peak(device_kind: str) -> float | None:
    spec = importlib.util.spec_from_file_location(
        "jquant_kernels_benchmark", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hbm_peak(device_kind)


@functools.partial(jax.jit, static_argnames=("fmt", "path"), donate_argnames=("cache",))
def layer_step(cache, q, k, v, tables, positions, *, fmt, path):
    """Layer 0 of a `PagedView`: store ``k``, ``v`` and attend ``q``; (out, cache)."""
    view = PagedView(cache, tables, positions, fmt=fmt, attention=path)
    view, _, allowed, _ = view.begin(None, None, None)
    view, read = view.update(0, k, v)
    return read.attend(q, allowed, None, scale=None, softcap=None), view.cache


def bench_case(model, fmt_name, s, rows, context, path, warmup, iters):
    """Median seconds of one layer step, and the bytes of pages its queries may read."""
    _, heads, kv_heads, head_dim = model
    config = LlamaConfig(vocab_size=8, hidden_size=heads * head_dim, intermediate_size=8,
                         num_layers=1, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=head_dim)  # fmt: skip
    fmt, dtype = kv_format(fmt_name), jnp.bfloat16
    width = context // PAGE_SIZE
    cache = init_paged_cache(config, rows * width, PAGE_SIZE, fmt, dtype)
    tables = jnp.asarray(np.random.default_rng(0).permutation(rows * width).reshape(rows, width),
                         jnp.int32)
    positions = jnp.asarray(np.tile(np.arange(context - s, context, dtype=np.int32), (rows, 1)))
    key = jax.random.split(jax.random.key(s), 3)
    q = jax.random.normal(key[0], (rows, s, heads, head_dim), dtype)
    k = jax.random.normal(key[1], (rows, s, kv_heads, head_dim), dtype)
    v = jax.random.normal(key[2], (rows, s, kv_heads, head_dim), dtype)
    step = functools.partial(layer_step, fmt=fmt, path=path)
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        out, cache = step(cache, q, k, v, tables, positions)
        jax.block_until_ready((out, cache))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    per_token = fmt.bytes_per_token(kv_heads, head_dim, 1, dtype)
    return statistics.median(times), rows * context * per_token


HEADER = (f"{'model':>13} {'kv':>8} {'S':>4} {'rows':>4} {'context':>7} {'method':>6} "
          f"{'ms':>9} {'GB/s':>8} {'HBM%':>6} {'vs xla':>7}")


def format_row(r) -> str:
    frac = "-" if r["hbm_frac"] is None else f"{100 * r['hbm_frac']:.1f}"
    speedup = "-" if r["speedup_vs_xla"] is None else f"{r['speedup_vs_xla']:.2f}x"
    return (f"{r['model']:>13} {r['kv_cache']:>8} {r['m']:>4} {r['rows']:>4} "
            f"{r['context']:>7} {r['method']:>6} {r['ms']:>9.4f} {r['gb_s']:>8.1f} "
            f"{frac:>6} {speedup:>7}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=("full", "small"), default="full")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the rows and device info as JSON here")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    backend = kernels.normalize_backend(None)
    peak = _hbm_peak(device.device_kind)
    full = args.shapes == "full"
    models, formats = (FULL_MODELS, FULL_FORMATS) if full else (SMALL_MODELS, SMALL_FORMATS)
    cases = FULL_CASES if full else SMALL_CASES
    paths = ("xla", "kernel") if backend in ("tpu", "gpu") else ("xla",)
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, page_size "
          f"{PAGE_SIZE}")
    print(HEADER)
    rows = []
    for model in models:
        for fmt in formats:
            for s, n_rows, context in cases:
                base = None
                for path in paths:
                    try:
                        t, nbytes = bench_case(model, fmt, s, n_rows, context, path,
                                               args.warmup, args.iters)
                    except ValueError as e:  # e.g. a geometry the kernel does not take
                        print(f"{model[0]} {fmt} S={s} {path}: not run ({e})", flush=True)
                        continue
                    base = t if path == "xla" else base
                    rows.append(dict(
                        kind="paged_attention", m=s, method=path, ms=t * 1e3, model=model[0],
                        heads=model[1], kv_heads=model[2], head_dim=model[3], kv_cache=fmt,
                        rows=n_rows, context=context, page_size=PAGE_SIZE,
                        gb_s=nbytes / t / 1e9,
                        hbm_frac=None if peak is None else nbytes / t / peak,
                        speedup_vs_xla=None if base is None else base / t))
                    print(format_row(rows[-1]), flush=True)
    if args.out:
        info = dict(device_kind=device.device_kind, backend=backend, jax=jax.__version__,
                    hbm_peak_bytes_s=peak, shapes=args.shapes, rows=rows)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
