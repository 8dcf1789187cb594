"""Prefix caching and paged memory in the serving engine, measured on a real model.

    python benchmarks/prefix_cache.py [--model smollm2-135m] [--recipe w8a16]
                                      [--requests 32] [--system-tokens 400]

Two measurements, each printed as a markdown table:

1. **Shared system prompt**: ``--requests`` requests, each a ``--system-tokens`` system
   prompt (the same for all) followed by its own ``--user-tokens`` of text, are queued at once
   (`Engine.submit_many`) and each asks for ``--max-tokens`` tokens. Time to first token
   (queued to the first streamed token) and the prompt tokens the engine prefilled, with
   prefix caching on and off; everything else equal.
2. **Short requests in the memory of a few whole contexts**: a KV cache of ``--contexts``
   whole contexts (``--max-context`` positions each) and up to 64 rows; ``--short`` requests
   of about ``--short-tokens`` prompt + completion tokens queued at once. The most requests
   decoded in one step, against the ``--contexts`` that reserving a whole context per
   request would hold.

The engine runs in this process (no HTTP), so the numbers are the engine's own. Text comes
from Python's pydoc topics; the machine's load moves absolute times, so compare the ratios
of one run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def _text_tokens(tokenizer, n: int, offset: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[offset:offset + 40 * n], add_special_tokens=False)
    return ids[:n]


def _run(engine, prompts, max_tokens: int) -> dict:
    from jquant.serve.engine import SamplingParams

    sent = time.perf_counter()
    first: dict[int, float] = {}
    done = threading.Semaphore(0)

    def on(out, i):
        if out.token_ids and i not in first:
            first[i] = time.perf_counter() - sent
        if out.finish_reason:
            done.release()

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = engine.metrics()
    engine.submit_many([(p, params, lambda out, i=i: on(out, i)) for i, p in enumerate(prompts)])
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - sent
    after = engine.metrics()
    ttft = sorted(first.values())
    return {
        "ttft_mean": statistics.mean(ttft), "ttft_p50": ttft[len(ttft) // 2],
        "ttft_max": ttft[-1], "wall": wall,
        "prefilled": after["prompt_tokens_total"] - before["prompt_tokens_total"],
        "hits": after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"],
    }


def shared_prompt(model, params, tokenizer, args) -> str:
    from jquant.serve.engine import Engine

    system = _text_tokens(tokenizer, args.system_tokens, 0)
    prompts = [system + _text_tokens(tokenizer, args.user_tokens, 5000 + 997 * i)
               for i in range(args.requests)]  # fmt: skip
    rows = []
    for caching in (False, True):
        with Engine(model, params, tokenizer, max_slots=args.requests,
                    max_context=args.max_context, prefix_caching=caching) as engine:  # fmt: skip
            _run(engine, [_text_tokens(tokenizer, 40, 90000)], 2)  # warm-up: shares nothing
            rows.append((caching, _run(engine, prompts, args.max_tokens)))
    off, on = rows[0][1], rows[1][1]
    lines = [f"{args.requests} requests queued at once, each a {args.system_tokens}-token "
             f"system prompt + {args.user_tokens} tokens of its own, {args.max_tokens} tokens "
             "out:", "",
             "| prefix caching | TTFT mean (s) | TTFT p50 (s) | TTFT max (s) | all done (s) "
             "| prompt tokens prefilled | found cached |", "|---|---:|---:|---:|---:|---:|---:|"]
    for caching, r in rows:
        lines.append(f"| {'on' if caching else 'off'} | {r['ttft_mean']:.2f} | "
                     f"{r['ttft_p50']:.2f} | {r['ttft_max']:.2f} | {r['wall']:.2f} | "
                     f"{r['prefilled']} | {r['hits']} |")
    lines.append(f"\nmean TTFT {off['ttft_mean'] / on['ttft_mean']:.1f}x lower with prefix "
                 f"caching; {off['prefilled'] / on['prefilled']:.1f}x fewer prompt tokens "
                 "prefilled")
    return "\n".join(lines)


def short_requests(model, params, tokenizer, args) -> str:
    from jquant.serve.engine import Engine

    prompts = [_text_tokens(tokenizer, args.short_tokens // 2, 20000 + 613 * i)
               for i in range(args.short)]  # fmt: skip
    with Engine(model, params, tokenizer, max_slots=min(args.short, 64),
                max_context=args.max_context, page_size=16,
                kv_cache_tokens=args.contexts * args.max_context,
                prefix_caching=False) as engine:  # fmt: skip
        rows = []
        decode = engine.runner.decode

        def counting(tables, tokens, positions, sampling):
            rows.append(len(tokens))
            return decode(tables, tokens, positions, sampling)

        engine.runner.decode = counting
        r = _run(engine, prompts, args.short_tokens - args.short_tokens // 2)
        pages = engine.pool.num_pages
    return (f"KV cache of {args.contexts} x {args.max_context} positions ({pages} pages of 16): "
            f"{args.short} requests of {args.short_tokens} tokens queued at once; at most "
            f"{max(rows)} decoded in one step (reserving a whole context each: "
            f"{args.contexts}), {max(rows) / args.contexts:.1f}x; all done in {r['wall']:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w8a16", help="recipe, or 'float'")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--system-tokens", type=int, default=400)
    p.add_argument("--user-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--short", type=int, default=32)
    p.add_argument("--short-tokens", type=int, default=64)
    p.add_argument("--skip", choices=("shared", "short"), help="leave one measurement out")
    args = p.parse_args(argv)

    from jquant import models
    from jquant.calib import quantize_loaded

    model, params, tokenizer = models.load(args.model)
    if args.recipe != "float":
        model, params = quantize_loaded(model, params, args.recipe)
    if args.skip != "shared":
        print(shared_prompt(model, params, tokenizer, args), flush=True)
    if args.skip != "short":
        print("\n" + short_requests(model, params, tokenizer, args), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
