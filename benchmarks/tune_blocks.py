"""Sweep the weight-only kernels' block sizes on a device; print rows for block_sizes.py.

    python benchmarks/tune_blocks.py                       # on a GPU or TPU
    python benchmarks/tune_blocks.py --out tune.json       # also keep every timing
    python benchmarks/tune_blocks.py --smoke               # CPU: interpret mode, tiny shape

For each M of `--ms` it times `jquant.kernels.quantized_matmul` with every candidate
`BlockSizes` that is legal on the backend (the planner's strict rules: TPU (8, 128) tiles
and whole groups per K step, GPU powers of two), summed over the `--shapes` (K, N) layer
shapes, and keeps the fastest. It prints the winners as `DEFAULT_BLOCK_SIZES` rows, one
bucket per measured M (a bucket covers the Ms up to and including it), to paste into
`kernels/block_sizes.py` with the device named (until then those rows are unmeasured).
It never asserts speed. `--smoke` runs the same sweep in Pallas interpret mode on a tiny
problem, so its timings mean nothing; it exists to check the sweep itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jquant.kernels import BlockSizes, _gpu, _mgpu, _tpu
from jquant.kernels.quantized_matmul import select_gpu_kernel

from jquant import kernels


def _load_kernels_benchmark():
    """benchmarks/kernels.py under its own name (not to be confused with jquant.kernels)."""
    spec = importlib.util.spec_from_file_location(
        "jquant_kernels_benchmark", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_bench = _load_kernels_benchmark()
random_weight, time_fn = _bench.random_weight, _bench.time_fn

DEVICE_MS = (1, 16, 128, 512, 2048)
DEVICE_SHAPES = ((4096, 4096), (4096, 14336))
BLOCK_M = (8, 16, 32, 64, 128, 256)
BLOCK_N = (64, 128, 256, 512)
BLOCK_K = (128, 256, 512, 1024)


def _plan(backend, qtype, k, group_size, m, n, bs, gpu_kernel=None):
    """The kernel's plan for these sizes (strict: raises ValueError when illegal)."""
    if backend == "tpu":
        return _tpu.plan_tpu(qtype, k, group_size, m, n, jnp.bfloat16, bs, strict=True)
    if gpu_kernel == "mosaic":
        return _mgpu.plan_mgpu(qtype, k, group_size, m, n, bs, strict=True)
    return _gpu.plan_gpu(qtype, k, group_size, m, n, bs, strict=True)


def candidates(backend, qtype, k, group_size, m, n, block_m=BLOCK_M, block_n=BLOCK_N,
               block_k=BLOCK_K, gpu_kernel=None) -> list[BlockSizes]:
    """Legal tiles for this problem, one per distinct plan (the planner shrinks a block
    larger than the problem, so many requests give the same kernel)."""
    seen, out = set(), []
    for a, b, c in itertools.product(block_m, block_n, block_k):
        bs = BlockSizes(block_m=a, block_n=b, block_k=c)
        try:
            plan = _plan(backend, qtype, k, group_size, m, n, bs, gpu_kernel)
        except ValueError:
            continue
        if plan not in seen:
            seen.add(plan)
            out.append(bs)
    return out


def sweep(backend, qtype, group_size, shapes, ms, *, block_m=BLOCK_M, block_n=BLOCK_N,
          block_k=BLOCK_K, interpret=False, warmup=2, iters=10, log=print):
    """[(m, best BlockSizes, best seconds summed over shapes, all timings)] per M."""
    weights = {(k, n): random_weight(jax.random.key(0), qtype, k, n, group_size)
               for k, n in shapes}
    gpu_kernel = None
    if backend == "gpu":  # the kernel users get: Mosaic GPU on Hopper where it applies
        (k0, n0), = shapes[:1]
        x0 = jax.ShapeDtypeStruct((1, k0), jnp.bfloat16)
        gpu_kernel = select_gpu_kernel(x0, weights[(k0, n0)][0], qtype=qtype, k=k0,
                                       group_size=group_size)
        log(f"GPU kernel: {gpu_kernel}")
    results = []
    for m in ms:
        timings = []
        k0, n0 = shapes[0]
        for bs in candidates(backend, qtype, k0, group_size, m, n0, block_m, block_n, block_k,
                             gpu_kernel):
            total = 0.0
            try:
                for k, n in shapes:
                    q, s, zp = weights[(k, n)]
                    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
                    fn = jax.jit(lambda x, q, s, zp, k=k, bs=bs: kernels.quantized_matmul(
                        x, q, s, zp, qtype=qtype, k=k, group_size=group_size, backend=backend,
                        interpret=interpret, block_sizes=bs, gpu_kernel=gpu_kernel))
                    total += time_fn(fn, (x, q, s, zp), warmup, iters)
            except ValueError:  # illegal on this backend for this problem: not a candidate
                continue
            timings.append((total, bs))
        if not timings:
            raise ValueError(f"no legal block sizes for M={m} on {backend}")
        best_t, best = min(timings, key=lambda t: t[0])
        log(f"M={m:>5}: best {best} {best_t * 1e3:.4f} ms over {len(shapes)} shape(s), "
            f"{len(timings)} candidates")
        results.append((m, best, best_t, timings))
    return results


def format_rows(backend: str, results, device: str) -> str:
    """The winners as DEFAULT_BLOCK_SIZES rows (the last bucket open-ended)."""
    lines = [f'    "{backend}": (  # measured on {device} by benchmarks/tune_blocks.py']
    for i, (m, bs, _, _) in enumerate(results):
        bound = "1 << 62" if i == len(results) - 1 else str(m)
        lines.append(f"        ({bound}, BlockSizes(block_m={bs.block_m}, "
                     f"block_n={bs.block_n}, block_k={bs.block_k})),")
    lines.append("    ),")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qtype", default="int4")
    p.add_argument("--group-size", type=int, default=128, help="0 means per-channel")
    p.add_argument("--ms", default=",".join(map(str, DEVICE_MS)))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the sweep: TPU kernel in interpret mode, tiny problem")
    p.add_argument("--out", help="write every timing as JSON here")
    args = p.parse_args(argv)
    group_size = args.group_size or None
    backend = kernels.normalize_backend(None)
    device = jax.devices()[0].device_kind
    if args.smoke:
        backend, shapes, ms = "tpu", ((512, 256),), (1, 16)
        grid = dict(block_m=(8, 16), block_n=(128, 256), block_k=(256, 512))
        interpret, warmup, iters = True, 0, 1
    elif backend in ("tpu", "gpu"):
        shapes, grid, interpret = DEVICE_SHAPES, {}, False
        ms, warmup, iters = tuple(int(v) for v in args.ms.split(",")), args.warmup, args.iters
    else:
        p.error(f"no TPU or GPU here (backend {backend!r}); use --smoke to check the sweep")
    print(f"device: {device}, backend {backend}, jax {jax.__version__}, {args.qtype} "
          f"g={group_size}, shapes {shapes}" + (" (interpret mode: timings mean nothing)"
                                               if interpret else ""))
    results = sweep(backend, args.qtype, group_size, shapes, ms, interpret=interpret,
                    warmup=warmup, iters=iters, **grid)
    print(format_rows(backend, results, device))
    if args.out:
        data = dict(device_kind=device, backend=backend, jax=jax.__version__, qtype=args.qtype,
                    group_size=group_size, shapes=shapes, interpret=interpret,
                    results=[dict(m=m, best=vars(bs), seconds=t,
                                  timings=[dict(seconds=s, **vars(b)) for s, b in timings])
                             for m, bs, t, timings in results])
        Path(args.out).write_text(json.dumps(data, indent=1))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
