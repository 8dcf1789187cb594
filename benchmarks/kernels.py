"""Time the quantized matmuls against bf16 `jnp.dot`: XLA path, Pallas kernel, dispatched.

    python benchmarks/kernels.py --out docs/kernels.json          # on a GPU or TPU
    python benchmarks/kernels.py --shapes small                   # CPU smoke run

Per (kind, K, N, M) and method it reports the median time after warmup, TFLOP/s, achieved
GB/s (weight + scale + zero point + activation + output bytes, once each), the fraction of
the device's HBM peak, and the speedup over a bf16 `jnp.dot` with a (K, N) bf16 weight on
the same device. A kind is a weight qtype (weight-only, bf16 activations) or `w8a8_int8` /
`w8a8_fp8` (activations quantized per token inside the timed call). Every method is
`jquant.ops.qdot` on a QArray, with the matmul path fixed: `xla` (the XLA fallback),
`kernel` (the backend's Pallas kernel) and `qdot` (`"auto"`: what users get, the kernel
or XLA as the dispatch table in `jquant.kernels.dispatch_table` picks by M). On CPU the
kernels only run in interpret mode, whose timings mean nothing, so `kernel` is not timed
there. Weights are random codes with random scales (mxfp4 and nvfp4 at their block sizes,
32 and 16, scales stored as those formats store them): speed does not depend on values.
It prints a table and never asserts speed. The JSON it writes is also a dispatch table:
`JQUANT_DISPATCH_TABLE=docs/kernels.json` makes `qdot` use the measured crossovers (without
one, "auto" runs no kernel: `kernels/dispatch_table.py`). Once the kernel tests pass on that
device too, it can ship as `kernels/measured/<backend>.json` (`benchmarks/device.sh`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jquant.kernels._formats import PACKED_QTYPES, STORAGE_DTYPES, num_groups, packed_k

from jquant import kernels, ops, qtypes
from jquant.qarray import QArray

KINDS = ("int4", "int8", "uint4", "nf4", "mxfp4", "nvfp4", "fp8_e4m3", "w8a8_int8", "w8a8_fp8")

FULL_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672))
FULL_MS = (1, 8, 16, 32, 64, 128, 512, 2048)
SMALL_SHAPES = ((512, 512), (1024, 2048))
SMALL_MS = (1, 8, 64)

# Peak HBM bandwidth in bytes/s by device_kind substring (first match wins).
HBM_PEAK = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    ("H200", 4.8e12),
    ("A100", 2.0e12),
    ("TPU v5 lite", 8.19e11),
    ("TPU v5e", 8.19e11),
    ("TPU v5p", 2.765e12),
    ("TPU v6", 1.64e12),
    ("TPU v4", 1.2e12),
)


def hbm_peak(device_kind: str) -> float | None:
    for key, peak in HBM_PEAK:
        if key in device_kind:
            return peak
    return None


def random_weight(key, qtype: str, k: int, n: int, group_size: int | None):
    """Random codes and scales in the storage layout, generated on the device."""
    kq, ks, kz = jax.random.split(key, 3)
    bits = jax.random.bits(kq, (n, packed_k(qtype, k, group_size)), jnp.uint8)
    storage = STORAGE_DTYPES[qtype]
    if qtype in PACKED_QTYPES:
        q = bits
    elif storage == jnp.int8:
        q = jax.lax.bitcast_convert_type(bits, jnp.int8)
    else:  # fp8: keep codes finite by drawing small floats instead of raw bits
        q = (jax.random.normal(kq, bits.shape, jnp.float32) * 4).astype(storage)
    g = num_groups(k, group_size)
    scale = (jax.random.uniform(ks, (n, g), jnp.float32, 1e-3, 2e-3)).astype(jnp.bfloat16)
    zp = (jax.random.uniform(kz, (n, g), jnp.float32, 0, 15).astype(jnp.bfloat16)
          if qtype == "uint4" else None)
    return q, scale, zp


def stored_scale(qtype: str, scale):
    """Float scales (N, G) as a QArray of `qtype` stores them: mxfp4 E8M0 (the nearest
    powers of two), nvfp4 E4M3 codes times a float32 per-tensor scale; others as given.
    (The kernels take float scales: `jquant.ops` passes `QArray.scales()` for FP4.)"""
    if qtype == "mxfp4":
        return scale.astype(jnp.float8_e8m0fnu)
    if qtype == "nvfp4":
        tensor = jnp.full((1, 1), 1e-5, jnp.float32)
        codes = (scale.astype(jnp.float32) / tensor).astype(jnp.float8_e4m3fn)
        return QArray(qvalue=codes, scale=tensor, zero_point=None, qtype="fp8_e4m3",
                      k=scale.shape[1], axis=-1, group_size=None)
    return scale


def time_fn(fn, args, warmup: int, iters: int) -> float:
    """Median seconds of `fn(*args)` after warmup, each call waited on."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nbytes(*arrays) -> int:
    return sum(a.size * a.dtype.itemsize for a in arrays if a is not None)


def _qdot_on_path(path: str):
    """`jquant.ops.qdot` jitted with the matmul path fixed while it traces."""
    def f(x, w):
        old = ops.set_matmul_path(path)
        try:
            return ops.qdot(x, w)
        finally:
            ops.set_matmul_path(old)
    return jax.jit(f)


def _methods(kind, k, n, group_size, backend):
    """name -> (jitted fn, QArray) for one kind: "xla", "kernel" (on a device), "qdot"."""
    w8a8 = kind.startswith("w8a8_")
    qtype = {"w8a8_int8": "int8", "w8a8_fp8": "fp8_e4m3"}.get(kind, kind)
    q, scale, zp = random_weight(jax.random.key(0), qtype, k, n, group_size)
    w = QArray(qvalue=q, scale=stored_scale(qtype, scale), zero_point=zp, qtype=qtype, k=k, axis=-2,
               group_size=group_size, dtype=jnp.dtype(jnp.bfloat16),
               activation=qtype if w8a8 else None)
    paths = ("xla", "kernel", "auto") if backend in ("tpu", "gpu") else ("xla", "auto")
    return {{"auto": "qdot"}.get(p, p): (_qdot_on_path(p), w) for p in paths}


def bench_shape(kind, k, n, ms, group_size, backend, peak, warmup, iters):
    """Rows for one kind (a weight qtype, or w8a8_int8 / w8a8_fp8) and one (K, N)."""
    w_bf16 = jax.random.normal(jax.random.key(0), (k, n), jnp.bfloat16)
    methods = _methods(kind, k, n, group_size, backend)
    rows = []
    for m in ms:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        out_bytes = m * n * 2
        timed = {"bf16_dot": (jax.jit(jnp.dot), w_bf16), **methods}
        base = None
        for name, (fn, w) in timed.items():
            try:
                t = time_fn(fn, (x, w), warmup, iters)
            except ValueError as e:  # e.g. path "kernel" where no kernel takes this shape
                print(f"{kind} K={k} N={n} M={m} {name}: not run ({e})", flush=True)
                continue
            base = t if name == "bf16_dot" else base
            gbs = (nbytes(x, *jax.tree.leaves(w)) + out_bytes) / t / 1e9
            rows.append(dict(kind=kind, group_size=group_size, k=k, n=n, m=m, method=name,
                             ms=t * 1e3, tflops=2 * m * k * n / t / 1e12, gb_s=gbs,
                             hbm_frac=None if peak is None else gbs * 1e9 / peak,
                             speedup_vs_bf16=base / t))
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'kind':>9} {'g':>5} {'K':>6} {'N':>6} {'M':>5} {'method':>9} {'ms':>9} "
          f"{'TFLOP/s':>8} {'GB/s':>8} {'HBM%':>6} {'vs bf16':>8}")


def format_row(r) -> str:
    frac = "-" if r["hbm_frac"] is None else f"{100 * r['hbm_frac']:.1f}"
    return (f"{r['kind']:>9} {str(r['group_size']):>5} {r['k']:>6} {r['n']:>6} {r['m']:>5} "
            f"{r['method']:>9} {r['ms']:>9.4f} {r['tflops']:>8.3f} {r['gb_s']:>8.1f} "
            f"{frac:>6} {r['speedup_vs_bf16']:>7.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", choices=("full", "small"), default="full")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="weight qtypes (weight-only) and w8a8_int8 / w8a8_fp8")
    p.add_argument("--group-size", type=int, default=128,
                   help="0 means per-channel; mxfp4 and nvfp4 always use their blocks (32, 16)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="write the rows and device info as JSON here")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    backend = kernels.normalize_backend(None)
    peak = hbm_peak(device.device_kind)
    shapes, ms = (FULL_SHAPES, FULL_MS) if args.shapes == "full" else (SMALL_SHAPES, SMALL_MS)
    group_size = args.group_size or None
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}, "
          f"HBM peak: {'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'}")
    if backend not in ("tpu", "gpu"):
        print("no TPU/GPU: timing only bf16_dot and the XLA path (kernels would run in "
              "interpret mode, which is not a speed)")
    print(HEADER)
    rows = []
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        p.error(f"unknown --kinds {unknown}; choose from {KINDS}")
    for kind in kinds:
        g = None if kind.startswith(("fp8", "w8a8")) else group_size  # per-channel formats
        if kind in qtypes.QTYPES and qtypes.get(kind).block_size:  # mxfp4 32, nvfp4 16
            g = qtypes.get(kind).block_size
        for k, n in shapes:
            rows += bench_shape(kind, k, n, ms, g, backend, peak, args.warmup, args.iters)
    if args.out:
        info = dict(device_kind=device.device_kind, backend=backend, jax=jax.__version__,
                    hbm_peak_bytes_s=peak, shapes=args.shapes, rows=rows)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
