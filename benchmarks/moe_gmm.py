"""Time the MoE grouped matmul of one expert projection at real shapes, and the memory of a layer.

    python benchmarks/moe_gmm.py                       # CPU: XLA paths and a dense matmul
    python benchmarks/moe_gmm.py --out device-out/moe_gmm.json   # GPU / TPU: the kernel too

What is timed: ``gate_proj`` of one MoE layer, ``x (T * top_k, d) -> (T * top_k, F)`` with the
rows sorted by expert (the experts of each token drawn at random, without repeats, so every
expert count is a real routing's), the weights an ``(E, d, F)`` stack in float32, int8
(per-channel) or uint4 (groups of 64), x float32. Methods:

* ``xla``: `jquant._grouped.grouped_matmul_xla` (tiles of one expert's rows, each expert
  dequantized as its tiles need it);
* ``ragged_dot``: the previous path, the whole stack dequantized, then
  ``jax.lax.ragged_dot`` (which XLA:CPU and XLA:GPU lower to every row times every expert);
  left out ("-") where that is over ``--ragged-gflop`` GFLOP of dense work;
* ``kernel`` (GPU / TPU only): `jquant.kernels.grouped_matmul`;
* ``dense``: a plain matmul of the same active size, ``x (T, d) @ W (d, top_k * F)`` in the
  same format (`jquant.ops.qdot`): the same FLOPs and, at decode, the same weight bytes.

The memory table is the nbytes of one layer's three expert stacks (gate, up, down) as
QArrays of the real shapes (abstract arrays: nothing is allocated). A layer that does not fit
this machine's memory in float32 is timed with F reduced (``--mixtral-f``; said in the
table). It prints tables and never asserts speed. The JSON rows with kind
"grouped_matmul" (quantized formats; m = T * top_k routed rows, methods ``xla`` and
``kernel``) are a dispatch table for the kernel, as `benchmarks/device.sh` merges them.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jquant import kernels, ops
from jquant._grouped import grouped_matmul_xla
from jquant.qarray import QArray, quantize_array

# (name, experts, top_k, d, F) of real models' MoE layers.
MODELS = (("qwen3-30b-a3b", 128, 8, 2048, 768), ("mixtral-8x7b", 8, 2, 4096, 14336))
FORMATS = (("float32", None, None), ("int8", "int8", None), ("uint4-g64", "uint4", 64))
TOKENS = (1, 16, 256)


def _quantize(w, qtype, group_size, axis):
    return w if qtype is None else quantize_array(w, qtype, axis=axis, group_size=group_size)


def _dense(w):
    return w.dequantize(jnp.float32) if isinstance(w, QArray) else w


def _routing(rng, t, experts, top_k):
    choice = np.argsort(rng.random((t, experts)), axis=1)[:, :top_k].reshape(-1)
    return np.bincount(choice, minlength=experts).astype(np.int32)


def _time(fn, args, warmup, iters):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernel_fn(w: QArray):
    def run(x, w, sizes):
        return kernels.grouped_matmul(x, w.qvalue, w.scale, w.zero_point, sizes, qtype=w.qtype,
                                      k=w.k, group_size=w.group_size)
    return run


def layer_memory(model) -> list[tuple[str, int]]:
    """(format, bytes) of one layer's gate, up and down stacks at the model's real shapes."""
    _, e, _, d, f = model
    out = []
    for name, qtype, group_size in FORMATS:
        total = 0
        for shape in ((e, d, f), (e, d, f), (e, f, d)):
            spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16 if qtype is None else jnp.float32)
            if qtype is None:
                total += 2 * int(np.prod(shape))
                continue
            make = functools.partial(quantize_array, qtype=qtype, axis=1, group_size=group_size)
            total += jax.eval_shape(make, spec).nbytes
        out.append(("bfloat16" if qtype is None else name, total))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--mixtral-f", type=int, default=3584,
                   help="Mixtral's F for timing (14336 is 1.9 GB a float32 stack)")
    p.add_argument("--ragged-gflop", type=float, default=60.0)
    p.add_argument("--out", help="write the rows and device info as JSON here")
    args = p.parse_args(argv)

    device = jax.devices()[0]
    backend = kernels.normalize_backend(None)
    methods = ["xla", "ragged_dot", "dense"] + (["kernel"] if backend in ("tpu", "gpu") else [])
    print(f"device: {device.device_kind} ({backend}), jax {jax.__version__}; median of "
          f"{args.iters} after {args.warmup} warmup; ms per gate_proj")
    print(f"{'model':>22} {'format':>10} {'T':>4} {'rows':>5} "
          + " ".join(f"{m:>10}" for m in methods))
    rng = np.random.default_rng(0)
    rows = []
    for model in MODELS:
        name, e, top_k, d, f = model
        if name.startswith("mixtral") and args.mixtral_f != f:
            f, name = args.mixtral_f, f"{name} (F={args.mixtral_f})"
        w = jax.random.normal(jax.random.key(0), (e, d, f), jnp.float32) * 0.02
        wd = jax.random.normal(jax.random.key(1), (d, top_k * f), jnp.float32) * 0.02
        for fmt, qtype, group_size in FORMATS:
            wq = jax.block_until_ready(_quantize(w, qtype, group_size, 1))
            wdq = jax.block_until_ready(_quantize(wd, qtype, group_size, 0))
            fns = {
                "xla": jax.jit(grouped_matmul_xla),
                "ragged_dot": jax.jit(lambda x, w, s: jax.lax.ragged_dot(x, _dense(w), s)),
                "kernel": jax.jit(_kernel_fn(wq)) if qtype else None,
            }
            for t in TOKENS:
                m = t * top_k
                sizes = jnp.asarray(_routing(rng, t, e, top_k))
                x = jax.random.normal(jax.random.key(t), (m, d), jnp.float32)
                xt = x[:t]
                cells = []
                for method in methods:
                    if method == "ragged_dot" and 2 * e * m * d * f / 1e9 > args.ragged_gflop:
                        cells.append("-")
                        continue
                    if method == "dense":
                        fn, fargs = jax.jit(ops.qdot), (xt, wdq)
                    elif fns[method] is None:
                        cells.append("-")
                        continue
                    else:
                        fn, fargs = fns[method], (x, wq, sizes)
                    try:
                        sec = _time(fn, fargs, args.warmup, args.iters)
                    except ValueError as err:  # a shape the kernel does not take
                        print(f"  {method}: not run ({err})")
                        cells.append("-")
                        continue
                    cells.append(f"{sec * 1e3:.2f}")
                    kind = "grouped_matmul" if qtype else "grouped_matmul_float"
                    rows.append(dict(kind=kind, m=m, method=method, ms=sec * 1e3, model=name,
                                     format=fmt, tokens=t, experts=e, top_k=top_k, d=d, f=f))
                print(f"{name:>22} {fmt:>10} {t:>4} {m:>5} "
                      + " ".join(f"{c:>10}" for c in cells), flush=True)
            del wq, wdq
    print("\nweights of one MoE layer (gate, up and down expert stacks), real shapes:")
    for model in MODELS:
        mem = "  ".join(f"{fmt} {b / 2**30:.3f} GiB" for fmt, b in layer_memory(model))
        print(f"{model[0]:>22}: {mem}")
    if args.out:
        info = dict(device_kind=device.device_kind, backend=backend, jax=jax.__version__,
                    rows=rows)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(info, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
