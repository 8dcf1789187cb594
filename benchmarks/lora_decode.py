"""The cost of LoRA adapters in a decode step (`jquant.serve.adapters`), on a real model.

    python benchmarks/lora_decode.py [--model smollm2-135m] [--recipe w8a16] [--rows 8]
                                     [--adapters 4] [--rank 16] [--steps 30]

Times `Runner.decode` (one step of ``--rows`` sequences at position 200, the compiled
program already warm) in three runners of one model, their steps interleaved:

1. no adapters: the program without any adapter code;
2. ``--adapters`` adapters loaded, every row on the base (slot 0);
3. the same adapters, the rows spread over them and the base (row ``i``: slot
   ``i % (adapters + 1)``).

Each adapter has rank ``--rank`` on every projection of every layer (q, k, v, o, gate, up,
down). Every step computes all loaded adapters for every row (`jquant.serve.adapters`), so
(2) and (3) should cost the same; the ratio to (1) is the price of serving adapters. Prints a
markdown table of the median and p90 milliseconds per step over ``--steps`` steps; the
machine's load moves absolute times, so read the ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _adapters(params, count: int, rank: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jquant.qat import lora

    out = {}
    for i in range(count):
        ad = lora.init(params, r"_proj/kernel$", rank=rank, key=jax.random.key(i))
        rng = np.random.default_rng(i)
        for v in ad.values():
            v["b"] = jnp.asarray(rng.normal(0, 0.01, v["b"].shape), jnp.float32)
        out[f"a{i}"] = lora.LoRA(ad, alpha=2.0 * rank)
    return out


def _decoder(runner, rows: int, slots, position: int):
    """A function running one decode step of ``runner`` (``rows`` rows at ``position``)."""
    import numpy as np

    from jquant.models.sampling import Sampling

    width = runner.table_width
    tables = [list(range(i * width, (i + 1) * width)) for i in range(rows)]
    tokens = np.random.default_rng(0).integers(0, runner.config.vocab_size, rows).tolist()
    return lambda: runner.decode(tables, tokens, [position] * rows, Sampling.greedy(rows),
                                 adapters=slots)  # fmt: skip


def run(model, params, *, rows: int, count: int, rank: int, steps: int,
        position: int = 200) -> list[tuple]:  # fmt: skip
    """``(label, median s, p90 s)`` of the three runners, decoding at ``position``; their
    steps interleaved, so that a change of the machine's load falls on all three alike."""
    from jquant.serve.adapters import AdapterSet
    from jquant.serve.runner import Runner

    aset = AdapterSet(params, _adapters(params, count, rank), dtype=model.dtype)
    spread = [i % (count + 1) for i in range(rows)]
    cases = [("no adapters", None, None), (f"{count} loaded, all rows base", aset, None),
             (f"{count} loaded, rows spread", aset, spread)]  # fmt: skip
    steppers = []
    for _, adapters, slots in cases:
        runner = Runner(model, params, rows=rows, max_len=position + 1, page_size=16,
                        prefill_rows=1, adapters=adapters)  # fmt: skip
        steppers.append(_decoder(runner, rows, slots, position))
        for _ in range(3):  # the first compiles
            steppers[-1]()
    times = [[] for _ in cases]
    for _ in range(steps):
        for step, out in zip(steppers, times):
            start = time.perf_counter()
            step()  # returns NumPy arrays: the step has finished
            out.append(time.perf_counter() - start)
    return [(label, statistics.median(t), sorted(t)[int(0.9 * (len(t) - 1))])
            for (label, _, _), t in zip(cases, times)]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w8a16", help="recipe, or 'float'")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)

    import jax

    from jquant import models
    from jquant.calib import quantize_loaded

    model, params, _ = models.load(args.model)
    if args.recipe != "float":
        model, params = quantize_loaded(model, params, args.recipe)
    rows = run(model, params, rows=args.rows, count=args.adapters, rank=args.rank,
               steps=args.steps)  # fmt: skip
    base = rows[0][1]
    print(f"{args.model} ({args.recipe}), {args.rows} rows, decode at position 200, adapters "
          f"of rank {args.rank} on every projection; {jax.devices()[0].platform}, median of "
          f"{args.steps} steps\n")
    print("| runner | ms / step (median) | ms / step (p90) | vs no adapters |")
    print("|---|---:|---:|---:|")
    for label, median, p90 in rows:
        print(f"| {label} | {median * 1e3:.2f} | {p90 * 1e3:.2f} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
