"""What structured output (`response_format`, `jquant.serve.grammar`) costs per decode step.

    python benchmarks/structured.py [--model smollm2-135m] [--slots 8] [--max-tokens 64]

The engine runs in this process (no HTTP). ``--slots`` requests are queued at once
(`Engine.submit_many`), each a short prompt of its own and exactly ``--max-tokens`` tokens
out, in three batches: none constrained, half, all. A constrained request follows a JSON
schema with one string of at least 10000 characters, so it never completes early and every
batch decodes the same steps; the others run with ``ignore_eos``. The batches are run
``--repeats`` times, interleaved, and every decode step is timed in three parts: the step
program (`Runner.decode`, the bitmask's transfer included), the host filling the bitmask
(`Grammars.bitmask`: llguidance's ``fill_next_token_bitmask_par``) and the matchers consuming
the sampled tokens (`jquant.serve.grammar.advance`, all rows of the step, averaged per run).
Printed as a markdown table: the step program's least time (the least disturbed by the load
of a shared machine, which moves absolute times), the host's work per step (medians) and its
share of that step. Last, the least time of the bitmask's own work
(`jquant.models.sampling.allow` over one step's logits, jitted alone), against the
unconstrained step.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 10000}},
          "required": ["text"], "additionalProperties": False}  # fmt: skip


def _run(engine, prompts, params) -> None:
    """Queues ``prompts`` (with ``params[i]``) at once and waits for all to finish."""
    done = threading.Semaphore(0)
    ends: list = []

    def on(out):
        if out.finish_reason is not None:
            ends.append((out.finish_reason, out.completion_tokens, out.error))
            done.release()

    engine.submit_many([(p, s, on) for p, s in zip(prompts, params)])
    for _ in prompts:
        done.acquire()
    bad = [e for e in ends if e[0] != "length"]
    if bad:
        raise RuntimeError(f"a request ended early: {bad}")


def _timed(record: list, fn):
    """``fn``, each call's seconds appended to ``record``."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from jquant import models
    from jquant.serve import engine as engine_module
    from jquant.serve.engine import Engine, SamplingParams
    from jquant.serve.grammar import response_format_grammar

    model, params, tokenizer = models.load(args.model)
    engine = Engine(model, params, tokenizer, max_slots=args.slots, max_context=256)
    engine.start()
    step, fill, advance = [], [], []
    engine.runner.decode = _timed(step, engine.runner.decode)
    engine.grammars.bitmask = _timed(fill, engine.grammars.bitmask)
    engine_module.advance = _timed(advance, engine_module.advance)
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {
        "name": "long", "schema": SCHEMA}})  # fmt: skip
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0, grammar=grammar)
    prompts = [tokenizer.encode(f"Request {i}: write a long story about the number {i}.")
               for i in range(args.slots)]  # fmt: skip
    half = args.slots // 2
    batches = {"none": [free] * args.slots,
               f"{half} of {args.slots}": [constrained] * half + [free] * (args.slots - half),
               "all": [constrained] * args.slots}  # fmt: skip
    _run(engine, prompts, batches["all"])  # warm-up: llguidance's tokenizer, the programs
    times = {name: ([], [], []) for name in batches}
    for _ in range(args.repeats):  # interleaved, so that load drifts hit every batch
        for name, batch in batches.items():
            for record in (step, fill, advance):
                record.clear()
            _run(engine, prompts, batch)
            times[name][0].extend(step)
            times[name][1].extend(fill or [0.0])
            times[name][2].append(sum(advance) / len(step))  # all rows' calls, per step
    engine.close()
    mask_ms = _mask_ms(args.slots, model.config.vocab_size)
    base = min(times["none"][0])
    print(f"{args.model}, {args.slots} requests x {args.max_tokens} tokens, {args.repeats} "
          "runs of each batch\n")
    print("| constrained rows | step program ms (min) | bitmask fill ms (median) | "
          "matchers ms per step | host work vs step |")
    print("|---|---:|---:|---:|---:|")
    for name, (steps, fills, advances) in times.items():
        host = statistics.median(fills) + statistics.median(advances)
        print(f"| {name} | {1e3 * min(steps):.1f} | {1e3 * statistics.median(fills):.2f} | "
              f"{1e3 * statistics.median(advances):.2f} | {host / base:.1%} |")
    print(f"\nThe bitmask in the step program (unpack + select over ({args.slots}, "
          f"{model.config.vocab_size}) logits, alone): {mask_ms:.2f} ms, "
          f"{mask_ms / 1e3 / base:.1%} of the unconstrained step (minimums).")


def _mask_ms(rows: int, vocab: int) -> float:
    """The least milliseconds `jquant.models.sampling.allow` takes on ``(rows, vocab)``."""
    import jax
    import numpy as np

    from jquant.models.sampling import allow, bitmask_words

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bits = rng.integers(-(2**31), 2**31, (rows, bitmask_words(vocab))).astype(np.int32)
    fn = jax.jit(allow)
    fn(logits, bits).block_until_ready()
    best = float("inf")
    for _ in range(200):
        start = time.perf_counter()
        fn(logits, bits).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best

if __name__ == "__main__":
    main()
