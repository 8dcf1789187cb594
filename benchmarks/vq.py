"""Vector codes (vq2 / vq3 by GPTVQ) against scalar GPTQ at 2 and 3 bits on SmolLM2-135M.

    python benchmarks/vq.py --out /tmp/vq.json                  # every row
    python benchmarks/vq.py --recipes vq2-gptvq,uint2-gptq-g64  # some rows

Each recipe quantizes every decoder kernel (the embedding, and so the tied head, in INT8 as
the shipped recipes do) with `jquant.calib.quantize_model` on ``--calib-windows`` windows of
512 tokens of `pydoc-calib`, in memory; then perplexity on the first ``--eval-tokens`` tokens
of `pydoc-eval` (windows of 512, docs/evaluation.md). Bits per weight count every stored byte
of the decoder kernels (codes or indices, scales and zero points, codebooks and their scales)
over their weights. Output error is the mean over kernels of ``ΔᵀHΔ / WᵀHW`` on each
kernel's calibration inputs. Rows already in ``--out`` are kept (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import jquant
from jquant.recipe import Recipe

EMBED = [{"pattern": "(?i)embed", "weight": "int8"},
         {"pattern": "(?i)lm_head/kernel$", "weight": "int8"}]  # fmt: skip


def recipe(name: str) -> Recipe | None:
    """The recipe of a row (None: the float model)."""
    kernels = {
        "uint2-gptq-g64": {"weight": "uint2", "group_size": 64, "algorithm": "gptq"},
        "uint3-gptq-g64": {"weight": "uint3", "group_size": 64, "algorithm": "gptq"},
        "vq2-gptvq": {"weight": "vq2", "algorithm": "gptvq"},
        "vq3-gptvq": {"weight": "vq3", "algorithm": "gptvq"},
    }
    if name == "float":
        return None
    return Recipe.from_dict({"name": name,
                             "rules": [*EMBED, {"pattern": "kernel$", **kernels[name]}]})


ROWS = ("float", "uint2-gptq-g64", "vq2-gptvq", "uint3-gptq-g64", "vq3-gptvq")


def measure(name, model, params, tokenizer, calib, text, eval_tokens) -> dict:
    row = {"recipe": name}
    r = recipe(name)
    if r is not None:
        start = time.perf_counter()
        params, report = jquant.calib.quantize_model(model, params, r, calib, progress=False)
        row["quantize_s"] = time.perf_counter() - start
        layers = [x for x in report.rows if x.path.startswith("layers/")]
        leaves = dict(jquant.tree.leaves(params))
        nbytes = sum(leaves[x.path].nbytes for x in layers)
        size = sum(int(np.prod(leaves[x.path].shape)) for x in layers)
        row["bits_per_weight"] = 8.0 * nbytes / size
        row["output_error"] = float(np.mean([x.output_error for x in layers]))
        row["worst_output_error"] = float(np.max([x.output_error for x in layers]))
    result = jquant.eval.perplexity(model, params, text, tokenizer=tokenizer,
                                    max_tokens=eval_tokens, progress=False)  # fmt: skip
    row["perplexity"] = result.perplexity
    return row


def table(rows: list[dict]) -> str:
    base = next((r["perplexity"] for r in rows if r["recipe"] == "float"), None)
    out = ["| recipe | bits/weight (kernels) | mean ΔᵀHΔ/WᵀHW | worst | perplexity | Δ vs float "
           "| quantize s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        delta = "" if base is None else f"{100 * (r['perplexity'] / base - 1):+.1f}%"
        out.append(f"| {r['recipe']} | {r.get('bits_per_weight', 32.0):.3f} | "
                   f"{r.get('output_error', 0.0):.4f} | {r.get('worst_output_error', 0.0):.4f} "
                   f"| {r['perplexity']:.3f} | {delta} | {r.get('quantize_s', 0.0):.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(ROWS))
    p.add_argument("--out", type=Path, default=None, help="JSON rows, kept between runs")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=16384)
    args = p.parse_args(argv)
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    done = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    model, params, tok = jquant.models.load("smollm2-135m")
    calib = jquant.calib.calibration_tokens(tok, "pydoc-calib", samples=args.calib_windows)
    text = jquant.eval.load_corpus("pydoc-eval")
    for name in names:
        if any(r["recipe"] == name for r in done):
            continue
        done.append(measure(name, model, params, tok, calib, text, args.eval_tokens))
        print(json.dumps(done[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(done, indent=1))
    print(f"SmolLM2-135M, {args.calib_windows} x 512 calibration tokens of pydoc-calib, "
          f"perplexity on the first {args.eval_tokens} tokens of pydoc-eval")
    print(table(sorted(done, key=lambda r: ROWS.index(r["recipe"]))))


if __name__ == "__main__":
    main()
