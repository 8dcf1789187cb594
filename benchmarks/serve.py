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

``--llama-cpp Q8_0,Q4_K_M`` runs the same levels against llama.cpp's own OpenAI server
(``python -m llama_cpp.server``, from llama-cpp-python with its ``server`` extra: ``pip install
-e '.[bench]'``) on the same model, its weights requantized to each type by llama.cpp
(``llama_model_quantize``; cached beside jquant's model cache). The clients, prompts and
counting are the same; llama.cpp is asked for ``min_tokens`` instead of ``ignore_eos``. Both
servers get all the machine's cores. llama-cpp-python's server runs one completion at a time
(no batching); it is started with ``--interrupt_requests False``, as its own default would
abort the running stream whenever another request arrives.
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


def _llama_cpp_gguf(model: str, qtype: str) -> str:
    """``model``'s GGUF requantized by llama.cpp to ``qtype`` (a ``LLAMA_FTYPE_MOSTLY_*``
    name such as Q8_0 or Q4_K_M), written once into jquant's cache."""
    import llama_cpp

    from jquant.io import model_path
    from jquant.io.registry import cache_dir

    source = model_path(model)
    out = cache_dir() / "llama-cpp" / f"{pathlib.Path(source).stem}.{qtype}.gguf"
    if out.exists():
        return str(out)
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if ftype is None:
        raise ValueError(f"--llama-cpp: llama.cpp has no type {qtype!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = ftype, True
    partial = out.with_suffix(".partial")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params):
        raise RuntimeError(f"llama.cpp could not quantize {source} to {qtype}")
    partial.rename(out)
    return str(out)


def _start_llama_cpp(gguf: str, context: int) -> tuple:
    """llama.cpp's server on ``gguf``, started and polled until it answers."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "bench",
            "--n_ctx", str(context), "--n_threads", str(os.cpu_count()),
            "--n_threads_batch", str(os.cpu_count()), "--host", "127.0.0.1",
            "--port", str(port), "--verbose", "False",
            # Its default aborts the running stream whenever another request arrives.
            "--interrupt_requests", "False"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/v1"
    while time.perf_counter() - start < 300:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1).read()
            return proc, url, time.perf_counter() - start, f"llama.cpp at {url}"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama_cpp.server did not answer within 300 s")


async def _one(client, prompt: str, max_tokens: int, extra: dict) -> dict:
    sent = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.completions.create(
        model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if not tokens:  # a server that sends no usage chunk: one token per streamed piece
        tokens = len(stamps)
    return {"sent": sent, "stamps": stamps, "tokens": tokens}


async def _level(url: str, prompts: list[str], concurrency: int, rounds: int,
                 max_tokens: int, extra: dict) -> dict:  # fmt: skip
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)

    async def worker(w: int) -> list[dict]:
        return [await _one(client, prompts[(w * rounds + r) % len(prompts)], max_tokens, extra)
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


def _measure(name: str, started: tuple, prompts: list[str], levels: list[int], args,
             extra: dict) -> dict:  # fmt: skip
    """Runs every concurrency level against a started server, then stops it."""
    proc, url, startup, ready = started
    print(f"== {name}\n   {ready.strip()}", flush=True)
    try:
        asyncio.run(_level(url, prompts, 1, 1, 4, extra))  # warm-up
        rows = []
        for c in levels:
            row = asyncio.run(_level(url, prompts, c, args.rounds, args.max_tokens, extra))
            print(f"   c={c}: {row['tokens_per_second']:.1f} tok/s, "
                  f"TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms, "
                  f"ITL p50 {row['itl_p50'] * 1e3:.0f} ms", flush=True)  # fmt: skip
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"startup_seconds": startup, "levels": rows, "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
            "max_context": args.max_context}  # fmt: skip


def run(args) -> dict:
    prompts = _prompts(128, args.prompt_tokens)
    levels = [int(c) for c in args.concurrency.split(",")]
    out = {}
    pairs = [(w, kv) for w in args.weights.split(",") if w for kv in args.kv.split(",")]
    plan = [(w, kv, args.slots, levels) for w, kv in pairs]
    if args.single_slot and pairs:
        plan.append((pairs[0][0], pairs[0][1], 1, [1]))
    for weights, kv, slots, lv in plan:
        name = f"{pathlib.Path(weights).name}|kv={kv}|slots={slots}"
        started = _start(args.model, weights, kv, slots, args.max_context)
        out[name] = {"server": "jquant", "weights": weights, "kv_cache": kv, "slots": slots,
                     **_measure(name, started, prompts, lv, args, {"ignore_eos": True})}
    for qtype in filter(None, args.llama_cpp.split(",")):
        gguf = _llama_cpp_gguf(args.model, qtype)
        name = f"llama.cpp|{qtype}"
        started = _start_llama_cpp(gguf, args.max_context)
        size = f"{qtype} ({os.path.getsize(gguf) / 1e6:.1f} MB)"
        out[name] = {"server": "llama.cpp", "weights": size, "kv_cache": "f16", "slots": 1,
                     **_measure(name, started, prompts, levels, args,
                                {"min_tokens": args.max_tokens})}  # fmt: skip
    return out


def table(results: dict) -> str:
    """The markdown table of ``results`` (one row per configuration and concurrency)."""
    lines = ["| server | weights | KV cache | slots | concurrency | output tok/s "
             "| TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | start-up (s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in results.values():
        for row in r["levels"]:
            lines.append(
                f"| {r.get('server', 'jquant')} | {pathlib.Path(r['weights']).name} | "
                f"{r['kv_cache']} | {r['slots']} | "
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
    p.add_argument("--llama-cpp", default="",
                   help="llama.cpp types to serve with llama_cpp.server, e.g. Q8_0,Q4_K_M")
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
