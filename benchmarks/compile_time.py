"""Compile time of every path that runs SmolLM2-135M: generate, eval, the serving engine.

Prints one table of seconds spent compiling (XLA's persistent cache is off, so each number is
a cold compile in a fresh process), and `generate`'s decode speed (greedy, batch 1, 64 new
tokens, compilation excluded), so a change to how layers run (scan or unrolled) shows what it
costs at run time too. CPU numbers are noisy on a shared machine: read ratios measured in one
run, not absolute times.

    python benchmarks/compile_time.py [--model smollm2-135m] [--recipe w4a16-rtn-g128]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import jquant
from jquant.eval.perplexity import perplexity
from jquant.models.generate import generate


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default=None, help="quantize first (a shipped name or YAML)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)

    model, params, tokenizer = jquant.models.load(args.model)
    if args.recipe:
        params = jquant.quantize(params, jquant.Recipe.load(args.recipe))
    rows = []

    prompt = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    out = generate(model, params, [prompt], max_new_tokens=64, stop_tokens=())
    rows.append(("generate (prefill + decode loop)", out.compile_seconds))
    speed = generate(model, params, [prompt], max_new_tokens=64, stop_tokens=())

    ids = np.arange(2 * 256) % model.config.vocab_size
    first = _timed(lambda: perplexity(model, params, ids, seq_len=256, batch_size=1))
    again = _timed(lambda: perplexity(model, params, ids, seq_len=256, batch_size=1))
    rows.append(("eval perplexity (first call - second call)", first - again))

    from jquant.serve.runner import Runner

    runner = Runner(model, params, rows=4, max_len=256, prefill_chunk=64)
    seconds = runner.compile()
    rows.append((f"engine: {len(runner.programs)} programs", seconds))

    print(f"| path ({args.model}, {args.recipe or 'float'}) | compile seconds |")
    print("|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    print(f"\ngenerate decode: {speed.decode_tokens_per_second:.1f} tokens/s (batch 1, 63 steps)")


if __name__ == "__main__":
    main()
