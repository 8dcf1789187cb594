"""How much a calibrated quantization depends on the CPU: one run per XLA:CPU ISA level.

    python benchmarks/isa_spread.py                                  # the shipped defaults
    python benchmarks/isa_spread.py --samples 8 --seq-len 256 --eval-tokens 4096   # quick

XLA:CPU's numerics differ by CPU (FMA contraction, vector width), and a calibrated recipe
(GPTQ's sequential rounding, the clip-ratio search) turns last-bit differences into other
integer codes. Each ``--isa`` level runs in its own process with
``XLA_FLAGS=--xla_cpu_max_isa=LEVEL`` (a level above the CPU's own runs as the CPU's own):
calibration as ``jquant quantize`` does it (`jquant.calib.apply_recipe`, its default corpus,
``python-mix``), then perplexity as ``jquant eval`` computes it (`jquant.eval.evaluate`, windows of
512 tokens of ``pydoc-eval``). It prints one row per level: perplexity, and the fraction of
integer codes of all quantized weights that differ from the first level's. It never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np


def child(args) -> None:
    """One level (this process): quantize, evaluate, save every QArray's codes."""
    from jquant import tree
    from jquant.calib import apply_recipe
    from jquant.eval import evaluate, load_corpus
    from jquant.models import load
    from jquant.qarray import QArray

    model, params, tok = load(args.model)
    model, qparams, report = apply_recipe(model, params, args.recipe, tokenizer=tok,
                                          samples=args.samples, seq_len=args.seq_len)  # fmt: skip
    codes = {p: np.asarray(v.codes()) for p, v in tree.leaves(qparams) if isinstance(v, QArray)}
    np.savez(args.codes, **{p.replace("/", "|"): c for p, c in codes.items()})
    out = evaluate(model, qparams, tok, load_corpus(args.corpus), seq_len=512,
                   max_tokens=args.eval_tokens)  # fmt: skip
    print(json.dumps({"perplexity": out["perplexity"], "tokens": out["tokens"],
                      "seconds": report.get("seconds")}))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="w4a16-awq-gptq-uint4-g64")
    p.add_argument("--isa", default="AVX2,AVX,SSE4_2", help="levels; the first is the baseline")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--corpus", default="pydoc-eval", help="perplexity text (jquant eval's)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="jquant eval's --max-tokens")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--codes", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for level in args.isa.split(","):
            codes = os.path.join(tmp, f"{level}.npz")
            cmd = [sys.executable, __file__, "--child", "--codes", codes, "--model", args.model,
                   "--recipe", args.recipe, "--samples", str(args.samples), "--seq-len",
                   str(args.seq_len), "--corpus", args.corpus, "--eval-tokens",
                   str(args.eval_tokens)]  # fmt: skip
            env = {**os.environ, "XLA_FLAGS": f"--xla_cpu_max_isa={level}"}
            out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            got = dict(np.load(codes))
            first = first or got
            differ = sum(int(np.sum(got[k] != first[k])) for k in first)
            total = sum(first[k].size for k in first)
            rows.append((level, result["perplexity"], differ / total, result["seconds"]))
            print(f"{level:8s} perplexity {result['perplexity']:.4f}  codes differing from "
                  f"{args.isa.split(',')[0]}: {differ / total:.4%}", file=sys.stderr)
    print(f"{args.model} {args.recipe}, calibration {args.samples}x{args.seq_len}, "
          f"perplexity over {result['tokens']} tokens of {args.corpus}")
    print(f"{'ISA':8s} {'perplexity':>10s} {'codes differing':>16s} {'calib s':>8s}")
    for level, ppl, frac, secs in rows:
        print(f"{level:8s} {ppl:10.4f} {frac:16.4%} {secs or 0:8.1f}")


if __name__ == "__main__":
    main()
