"""Serving benchmark: `jquant serve` under concurrent streaming clients.

    python benchmarks/serve.py [--weights float,w8a16,DIR] [--kv none,int8]
                               [--concurrency 1,8,32] [--json docs/serve.json] [--report-only]

For every (weights, KV cache) pair it starts ``jquant serve MODEL`` in its own process
(``--max-slots 32``), waits until it listens (start-up = load + quantize + compile), sends one
warm-up request, then for each concurrency ``c`` runs ``c`` clients of the official
``openai.AsyncOpenAI``, each streaming ``--rounds`` completions one after the other. Every
completion asks for exactly ``--max-tokens`` tokens (``ignore_eos``) after a prompt cut from
pydoc-eval (so prompts differ). Reported per level:

* output tokens/s: all completion tokens over the level's wall time (first request sent to
  last token received), i.e. the aggregate throughput;
* TTFT: request sent to its first streamed token (p50, p99);
* ITL: time between consecutive streamed tokens of one request (p50, p99).

A weights entry is a recipe name (quantized at start-up) or a directory written by
``jquant quantize`` (served packed). ``--single-slot`` adds one run of the first pair with
``--max-slots 1`` at concurrency 1: the best single-stream case, without 31 idle rows in each
decode step. Results are merged into the JSON file; the markdown table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start(model: str, weights: str, kv: str, slots: int, context: int) -> tuple:
    served = weights if os.path.isdir(weights) else model
    args = [sys.executable, "-m", "jquant.cli", "serve", served, "--kv-cache", kv,
            "--max-slots", str(slots), "--max-context", str(context), "--port", "0",
            "--served-model-name", "bench"]  # fmt: skip
    if not os.path.isdir(weights) and weights != "float":
        args += ["--recipe", weights]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stdout.readline()
    match = re.search(r"at (http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"jquant serve {' '.join(args[4:])} did not start: {line!r}")
    return proc, match.group(1), time.perf_counter() - start, line


async def _one(client, prompt: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.completions.create(
        model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"sent": sent, "stamps": stamps, "tokens": tokens}


async def _level(url: str, prompts: list[str], concurrency: int, rounds: int,
                 max_tokens: int) -> dict:  # fmt: skip
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)

    async def worker(w: int) -> list[dict]:
        return [await _one(client, prompts[(w * rounds + r) % len(prompts)], max_tokens)
                for r in range(rounds)]  # fmt: skip

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency)))
               for r in rs]  # fmt: skip
    wall = max(r["stamps"][-1] for r in results) - start
    await client.close()
    ttft = [r["stamps"][0] - r["sent"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completion_tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
        "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99),
    }  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _prompts(count: int, tokens: int) -> list[str]:
    """``count`` different slices of pydoc-eval of about ``tokens`` tokens (4 chars each)."""
    from jquant.eval import load_corpus

    text = load_corpus("pydoc-eval")
    width = 4 * tokens
    return [text[i * width : (i + 1) * width] for i in range(count)]


def run(args) -> dict:
    prompts = _prompts(128, args.prompt_tokens)
    out = {}
    pairs = [(w, kv) for w in args.weights.split(",") for kv in args.kv.split(",")]
    plan = [(w, kv, args.slots, [int(c) for c in args.concurrency.split(",")])
            for w, kv in pairs]  # fmt: skip
    if args.single_slot:
        plan.append((pairs[0][0], pairs[0][1], 1, [1]))
    for weights, kv, slots, levels in plan:
        name = f"{pathlib.Path(weights).name}|kv={kv}|slots={slots}"
        print(f"== {name}", flush=True)
        proc, url, startup, ready = _start(args.model, weights, kv, slots, args.max_context)
        print(f"   {ready.strip()}", flush=True)
        try:
            asyncio.run(_level(url, prompts, 1, 1, 4))  # warm-up
            rows = []
            for c in levels:
                row = asyncio.run(_level(url, prompts, c, args.rounds, args.max_tokens))
                print(f"   c={c}: {row['tokens_per_second']:.1f} tok/s, "
                      f"TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms, "
                      f"ITL p50 {row['itl_p50'] * 1e3:.0f} ms", flush=True)  # fmt: skip
                rows.append(row)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        out[name] = {"weights": weights, "kv_cache": kv, "slots": slots,
                     "startup_seconds": startup, "levels": rows,
                     "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                     "rounds": args.rounds, "max_context": args.max_context}  # fmt: skip
    return out


def table(results: dict) -> str:
    """The markdown table of ``results`` (one row per configuration and concurrency)."""
    lines = ["| weights | KV cache | slots | concurrency | output tok/s | TTFT p50 / p99 (ms) "
             "| ITL p50 / p99 (ms) | start-up (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results.values():
        for row in r["levels"]:
            lines.append(
                f"| {pathlib.Path(r['weights']).name} | {r['kv_cache']} | {r['slots']} | "
                f"{row['concurrency']} | {row['tokens_per_second']:.1f} | "
                f"{row['ttft_p50'] * 1e3:.0f} / {row['ttft_p99'] * 1e3:.0f} | "
                f"{row['itl_p50'] * 1e3:.0f} / {row['itl_p99'] * 1e3:.0f} | "
                f"{r['startup_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--weights", default="float,w8a16",
                   help="recipes or `jquant quantize` directories, comma-separated")
    p.add_argument("--kv", default="none,int8", help="KV cache formats, comma-separated")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=2, help="completions per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=96)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--single-slot", action="store_true")
    p.add_argument("--json", default=str(ROOT / "docs" / "serve.json"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = pathlib.Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        results.update(run(args))
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
