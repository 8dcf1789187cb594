"""Speculative decoding by n-gram prompt lookup in the serving engine, on a real model.

    python benchmarks/speculative.py [--model smollm2-135m] [--recipe w8a16]
                                     [--k 0,2,4,8] [--max-tokens 160] [--repeats 2]

Two chat requests, one at a time (concurrency 1), greedy, ``--max-tokens`` tokens each
(``ignore_eos``), each run ``--repeats`` times per setting through engines in this process
(no HTTP), the settings' runs interleaved:

- **copy**: a passage of Python's pydoc topics (the ``with`` statement, prose and code) and
  the instruction to repeat it word for word: a copy-from-context workload (editing,
  quoting, code rewriting), where the n-gram drafts come from the prompt;
- **fresh**: a request for a short story, whose answer shares little with its prompt.

For each ``--k`` (0: no speculation) the table gives the completion tokens, the acceptance
rate (accepted / proposed drafts), the mean tokens a request gets per verify step (vLLM's
mean acceptance length, ``1 + accepted / steps with drafts``), the decode tokens/s (first
token to last, the best of the repeats) and its ratio to ``k = 0``. Greedy outputs are the
same with and without speculation; the script checks it. Absolute speeds move with the
machine's load: read the ratios of one run.
"""

from __future__ import annotations

import argparse
import threading
import time

WORKLOADS = {
    "copy": "Here is a passage from the Python documentation:\n\n{passage}\n\nRepeat the "
            "passage above word for word, without any change.",
    "fresh": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}  # fmt: skip


def _passage(chars: int) -> str:
    from pydoc_data.topics import topics

    return topics["with"][:chars].rsplit("\n", 1)[0]


def _decode_run(engine, prompt, max_tokens: int) -> tuple[list[int], float]:
    """One greedy request: its tokens and seconds from its first token to its last."""
    from jquant.serve.engine import SamplingParams

    stamps, tokens, done = [], [], threading.Event()

    def on(out):
        if out.token_ids:
            stamps.append(time.perf_counter())
            tokens.extend(out.token_ids)
        if out.finish_reason:
            done.set()

    engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                  on)  # fmt: skip
    done.wait()
    return tokens, stamps[-1] - stamps[0]


def measure(model, params, tokenizer, prompts: dict, ks: list[int], args) -> dict:
    """``{k: {workload: tokens, acceptance, tokens per step, best decode tokens/s}}``: one
    engine per ``k``, all compiled first; the runs interleave (each repeat runs every
    workload on every engine in turn), so a change in the machine's load hits all alike."""
    from contextlib import ExitStack

    from jquant.serve.engine import Engine
    from jquant.serve.speculative import Ngram

    keys = ("spec_decode_draft_tokens_total", "spec_decode_accepted_tokens_total",
            "spec_decode_drafts_total")  # fmt: skip
    with ExitStack() as stack:
        engines = {k: stack.enter_context(Engine(
            model, params, tokenizer, max_slots=1, max_context=args.max_context,
            speculative=Ngram(num_tokens=k, min_n=args.ngram_min, max_n=args.ngram_max)
            if k else None)) for k in ks}  # fmt: skip
        out = {k: {name: dict(tok_s=0.0, counts=[0, 0, 0]) for name in prompts} for k in ks}
        for _ in range(args.repeats):
            for name, prompt in prompts.items():
                for k, engine in engines.items():
                    r, before = out[k][name], engine.metrics()
                    r["tokens"], seconds = _decode_run(engine, prompt, args.max_tokens)
                    r["tok_s"] = max(r["tok_s"], (len(r["tokens"]) - 1) / seconds)
                    after = engine.metrics()
                    r["counts"] = [c + after[key] - before[key]
                                   for c, key in zip(r["counts"], keys)]  # fmt: skip
    for by_name in out.values():
        for r in by_name.values():
            drafted, taken, steps = r.pop("counts")
            r["rate"] = taken / drafted if drafted else None
            r["per_step"] = 1 + taken / steps if steps else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w8a16", help="recipe, or 'float'")
    p.add_argument("--k", default="0,2,4,8", help="draft tokens per step to compare; 0 = off")
    p.add_argument("--ngram-min", type=int, default=2)
    p.add_argument("--ngram-max", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--max-context", type=int, default=768)
    p.add_argument("--passage-chars", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    ks = [int(k) for k in args.k.split(",")]
    if ks[0] != 0:
        raise ValueError(f"--k {args.k}: the first value must be 0 (the baseline)")

    from jquant import models
    from jquant.calib import quantize_loaded

    model, params, tokenizer = models.load(args.model)
    if args.recipe != "float":
        model, params = quantize_loaded(model, params, args.recipe)
    prompts = {name: models.chat_prompt(tokenizer, text.format(passage=_passage(
        args.passage_chars))) for name, text in WORKLOADS.items()}  # fmt: skip
    results = measure(model, params, tokenizer, prompts, ks, args)
    print(f"{args.model} {args.recipe}, concurrency 1, greedy, n-gram n {args.ngram_min}.."
          f"{args.ngram_max}; prompts {', '.join(f'{n} {len(p)}' for n, p in prompts.items())} "
          "tokens\n")
    print("| workload | k | tokens | acceptance | tokens per step | decode tok/s | vs k=0 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in prompts:
        base = results[0][name]
        for k in ks:
            r = results[k][name]
            same = "" if r["tokens"] == base["tokens"] else " (output differs!)"
            rate = "-" if r["rate"] is None else f"{100 * r['rate']:.1f}%"
            per = "-" if r["per_step"] is None else f"{r['per_step']:.2f}"
            print(f"| {name} | {k} | {len(r['tokens'])}{same} | {rate} | {per} | "
                  f"{r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
