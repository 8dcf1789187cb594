"""Greedy decode speed of SmolLM2-135M: jquant (float and recipes) against HF transformers.

    python benchmarks/decode.py --out docs/decode.json     # the full table (minutes)
    python benchmarks/decode.py --quick                    # a short run

What is timed: the decode loop only, i.e. every generated token after the first, so prompt
processing (prefill) and compilation are excluded (both are reported separately). jquant's
`generate` times its compiled `while_loop`; transformers' `generate` is timed by a logits
processor that stamps the clock when each step's logits arrive, from the first step's to the
last's. Both decode greedily with stop tokens disabled, so every run produces exactly
``--new-tokens`` tokens per row. Each row of a batch gets the same prompt (a one-turn chat).

Fairness: transformers runs float32 (torch CPU, KV cache, SDPA attention) with
``torch.set_num_threads`` equal to the thread count of XLA's CPU pool (the CPUs this process
may run on); ``--hf-threads 2,1`` adds other thread counts (on a machine shared with other
work, fewer torch threads can be faster), and the ratio column compares with the fastest
transformers row of the same batch. Runs are interleaved (every configuration once per
repeat) and the median is reported, so a noisy, shared machine drifts all columns alike.
torch is imported here only, never by jquant. It prints a table and never asserts speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

import jquant
from jquant.models import chat_prompt, generate

RECIPES = "w8a16,w4a16-rtn-g128,nf4,mixed"
PROMPT = "Explain what a Python decorator is."


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed generation.

    Attributes:
      decode_s: seconds for the ``new_tokens - 1`` decode steps (all rows at once).
      prefill_s: seconds for the prompt and the first token.
      compile_s: compilation seconds (jquant's first call; 0 for transformers).
      tokens: ``(batch, new_tokens)`` generated ids.
    """

    decode_s: float
    prefill_s: float
    compile_s: float
    tokens: np.ndarray


def xla_cpu_threads() -> int:
    """Threads in XLA's CPU pool: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def time_jquant(model, params, prompts: list[list[int]], new_tokens: int) -> Run:
    out = generate(model, params, prompts, max_new_tokens=new_tokens, stop_tokens=())
    if out.decode_steps != new_tokens - 1:  # stop tokens are off, so this is a bug
        raise RuntimeError(f"decoded {out.decode_steps} steps, expected {new_tokens - 1}")
    return Run(out.decode_seconds, out.prefill_seconds, out.compile_seconds, out.tokens)


# ---- transformers (torch), imported lazily --------------------------------------------


def build_hf(checkpoint):
    """A float32 ``LlamaForCausalLM`` holding ``checkpoint``'s tensors (a jquant Checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**checkpoint.config)).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
             for k, v in checkpoint.tensors.items()}  # fmt: skip
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match LlamaForCausalLM: {result}")
    return model


def time_hf(model, prompts: list[list[int]], new_tokens: int) -> Run:
    """transformers' greedy ``generate``, its decode steps timed by a logits processor."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps = []

    class Stamp(LogitsProcessor):  # called once per step, right after that step's forward
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts, dtype=torch.long)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0,
        )  # fmt: skip
    tokens = out[:, ids.shape[1] :].numpy().astype(np.int32)
    if len(stamps) != new_tokens or tokens.shape[1] != new_tokens:
        raise RuntimeError(f"transformers made {tokens.shape[1]} tokens, expected {new_tokens}")
    # From the first step's logits to the last's: new_tokens - 1 forwards, each with the
    # preceding step's token selection, as jquant's loop times them.
    return Run(stamps[-1] - stamps[0], stamps[0] - start, 0.0, tokens)


# ---- the benchmark --------------------------------------------------------------------


def _weight_bytes(params) -> int:
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jquant.QArray))
    return int(sum(x.nbytes for x in leaves))


def _agreement(tokens: np.ndarray, reference: np.ndarray | None) -> int | None:
    """How many leading tokens of row 0 equal the reference's row 0."""
    if reference is None:
        return None
    same = np.asarray(tokens[0]) == np.asarray(reference[0])
    return int(np.argmin(same)) if not same.all() else int(same.size)


def run_benchmark(model, params, prompt: list[int], *, recipes, batches, new_tokens: int,
                  repeats: int, hf_model=None, hf_threads=(), log=print) -> list[dict]:  # fmt: skip
    """Times every (engine, recipe, batch), interleaved, and returns one row each.

    Args:
      model, params: the jquant model and its float parameters.
      prompt: token ids; every row of a batch gets this prompt.
      recipes: recipe names for `jquant.quantize` ("float" = the parameters as they are).
      batches: batch sizes.
      new_tokens: tokens generated per row (>= 2: the first comes from the prefill).
      repeats: timed runs per configuration; each row reports the median.
      hf_model: a transformers model of the same weights, or None to skip it.
      hf_threads: ``torch.set_num_threads`` values to run it with, each a row (default:
        XLA's CPU thread count).
      log: progress messages (``None`` for silence).

    Returns:
      Dicts with engine, recipe, batch, threads, new_tokens, tokens_per_s, ms_per_step, the
      per-repeat tokens/s, prefill_ms, compile_s, weight_mb, the prefix of row 0 that
      matches transformers' tokens, and ratio_vs_hf: tokens/s over the fastest transformers
      row of the same batch (None without transformers).
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens={new_tokens} must be >= 2 (the first token is prefill's)")
    log = log or (lambda *a, **k: None)
    variants = {r: params if r == "float" else jquant.quantize(params, r) for r in recipes}
    configs = [("jquant", r, b, xla_cpu_threads()) for r in recipes for b in batches]
    if hf_model is not None:
        configs += [("transformers", "float32", b, t)
                    for b in batches for t in (hf_threads or (xla_cpu_threads(),))]  # fmt: skip

    def once(engine, recipe, batch, threads) -> Run:
        prompts = [list(prompt)] * batch
        if engine == "jquant":
            return time_jquant(model, variants[recipe], prompts, new_tokens)
        import torch

        torch.set_num_threads(threads)
        return time_hf(hf_model, prompts, new_tokens)

    warm = {}
    for cfg in configs:  # compiles jquant's programs; warms torch's allocator and kernels
        t = time.perf_counter()
        warm[cfg] = once(*cfg)
        log(f"warm-up {cfg}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    runs = {cfg: [] for cfg in configs}
    for r in range(repeats):
        for cfg in configs:
            runs[cfg].append(once(*cfg))
        log(f"repeat {r + 1}/{repeats} done", file=sys.stderr)
    return _rows(configs, runs, warm, variants, new_tokens)


def _rows(configs, runs, warm, variants, new_tokens) -> list[dict]:
    hf_tokens = {c[2]: runs[c][0].tokens for c in configs if c[0] == "transformers"}
    rows = []
    for cfg in configs:
        engine, recipe, batch, threads = cfg
        rs = runs[cfg]
        speeds = [batch * (new_tokens - 1) / r.decode_s for r in rs]
        tps = statistics.median(speeds)
        rows.append({
            "engine": engine, "recipe": recipe, "batch": batch, "threads": threads,
            "new_tokens": new_tokens,
            "tokens_per_s": tps, "ms_per_step": 1e3 * batch / tps,
            "tokens_per_s_runs": speeds,
            "prefill_ms": 1e3 * statistics.median(r.prefill_s for r in rs),
            "compile_s": warm[cfg].compile_s,
            "weight_mb": _weight_bytes(variants.get(recipe, variants.get("float"))) / 1e6
            if engine == "jquant" else None,
            "agree_with_hf": _agreement(rs[0].tokens, hf_tokens.get(batch)),
        })  # fmt: skip
    for row in rows:
        hf = [r["tokens_per_s"] for r in rows
              if r["engine"] == "transformers" and r["batch"] == row["batch"]]  # fmt: skip
        row["ratio_vs_hf"] = row["tokens_per_s"] / max(hf) if hf else None
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| engine | recipe | batch | threads | tokens/s | ms/step | vs best HF f32 | "
        "prefill ms | compile s | weights MB | = HF tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], r["engine"] != "transformers")):
        ratio = "-" if r["ratio_vs_hf"] is None else f"{r['ratio_vs_hf']:.2f}x"
        mb = "-" if r["weight_mb"] is None else f"{r['weight_mb']:.0f}"
        agree = "-" if r["agree_with_hf"] is None else f"{r['agree_with_hf']}/{r['new_tokens']}"
        lines.append(
            f"| {r['engine']} | {r['recipe']} | {r['batch']} | {r['threads']} | "
            f"{r['tokens_per_s']:.1f} | "
            f"{r['ms_per_step']:.1f} | {ratio} | {r['prefill_ms']:.0f} | "
            f"{r['compile_s']:.1f} | {mb} | {agree} |"
        )
    return "\n".join(lines)


def _machine() -> dict:
    return {
        "platform": platform.platform(), "processor": platform.processor() or None,
        "cpus": os.cpu_count(), "xla_cpu_threads": xla_cpu_threads(),
        "jax": jax.__version__, "backend": jax.default_backend(),
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, HF dir, .gguf")
    p.add_argument("--recipes", default=RECIPES, help="comma-separated; float is always run")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (no torch needed)")
    p.add_argument("--hf-threads", help="comma-separated torch thread counts, one row each "
                   "(default: XLA's CPU thread count)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="batch 1, 32 new tokens, one repeat, recipes float and w8a16")  # fmt: skip
    p.add_argument("--out", help="write the rows and the machine as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.new_tokens, args.repeats, args.recipes = "1", 32, 1, "w8a16"
    from jquant.io import load_checkpoint

    ckpt = load_checkpoint(args.model)  # read once: both engines get the same tensors
    model, params, _ = jquant.models.load(ckpt)
    recipes = ["float"] + [r.strip() for r in args.recipes.split(",") if r.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    hf = None if args.no_hf else build_hf(ckpt)
    threads = [int(t) for t in args.hf_threads.split(",")] if args.hf_threads else []
    threads = threads or [xla_cpu_threads()]
    prompt = chat_prompt(ckpt.tokenizer, PROMPT)
    rows = run_benchmark(model, params, prompt, recipes=recipes, batches=batches,
                         new_tokens=args.new_tokens, repeats=args.repeats, hf_model=hf,
                         hf_threads=threads)  # fmt: skip
    print(f"Greedy decode, {args.model}, prompt {len(prompt)} tokens, {args.new_tokens} new "
          f"tokens, median of {args.repeats}; XLA CPU threads {xla_cpu_threads()}, torch "
          f"threads {','.join(map(str, threads))}")  # fmt: skip
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": _machine(), "args": vars(args), "prompt_tokens": len(prompt),
                       "torch_threads": threads, "rows": rows}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
