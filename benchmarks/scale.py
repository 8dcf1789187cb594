"""Quantizing checkpoints larger than memory: peak resident memory, time and output size.

    python benchmarks/scale.py /work/synth/llama3-8b --recipe w4a16-rtn-g128 -o /work/scale/l8-rtn
    python benchmarks/scale.py /work/synth/llama3-8b --recipe w4a16-gptq-g128 \\
        --calib-samples 4 --calib-seq-len 512 -o /work/scale/l8-gptq

Runs `jquant.calib.stream.quantize_to_disk` on a checkpoint (any source jquant reads; the
synthetic ones of `benchmarks/synthetic_checkpoint.py` have the shapes of Llama-3-8B and
Qwen2.5-14B and no tokenizer) in a child process, and prints one Markdown row: the model's
shapes, the recipe, peak resident memory of the child (``ru_maxrss``, which counts every page
the process touched, file pages read included), wall time, the output's bytes on disk, and the
memory model's estimate (`jquant.calib.activations.estimate`). A calibrated recipe on a
checkpoint without a tokenizer is calibrated on random token windows (``--calib-samples`` x
``--calib-seq-len``, seeded): its time and memory are those of real calibration text, its
quality means nothing. ``--json`` also writes the row to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r"""
import json, sys
import numpy as np
import jax.numpy as jnp
from jquant.calib.stream import quantize_to_disk
from jquant.calib import needs_calibration
from jquant.io import load_checkpoint
args = json.loads(sys.argv[1])
tokens = None
if needs_calibration(args["recipe"]):
    ckpt = load_checkpoint(args["source"], lazy=True)
    if ckpt.tokenizer is None:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, ckpt.config["vocab_size"],
                              (args["samples"], args["seq_len"]))
path, report = quantize_to_disk(
    args["source"], args["recipe"], args["output"], tokens=tokens, samples=args["samples"],
    seq_len=args["seq_len"], param_dtype=jnp.dtype(args["param_dtype"]),
    max_memory=args["max_memory"], overwrite=True, progress=False)
report.pop("rows", None)
print("REPORT " + json.dumps(report))
"""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="checkpoint: HF directory, .gguf, registry name")
    p.add_argument("--recipe", required=True)
    p.add_argument("-o", "--output", required=True, help="packed checkpoint to write")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--max-memory", help="budget passed to quantize_to_disk")
    p.add_argument("--json", help="append the row as JSON to this file")
    args = p.parse_args(argv)
    child = {"source": args.source, "recipe": args.recipe, "output": args.output,
             "samples": args.calib_samples, "seq_len": args.calib_seq_len,
             "param_dtype": args.param_dtype, "max_memory": args.max_memory}  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(child)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        return proc.returncode
    report = json.loads(next(line[7:] for line in proc.stdout.splitlines()
                             if line.startswith("REPORT ")))  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    config = json.loads((Path(args.source) / "config.json").read_text()) \
        if Path(args.source).is_dir() else {}  # fmt: skip
    source_bytes = _dir_bytes(Path(args.source)) if Path(args.source).is_dir() else \
        os.path.getsize(args.source)  # fmt: skip
    row = {
        "model": Path(args.source).name, "layers": config.get("num_hidden_layers"),
        "hidden": config.get("hidden_size"), "intermediate": config.get("intermediate_size"),
        "source_gb": source_bytes / 1e9, "recipe": args.recipe,
        "calibration": f"{args.calib_samples}x{args.calib_seq_len}"
        if report.get("calibrated") else "none",
        "param_dtype": args.param_dtype, "peak_rss_gb": peak / 2**30,
        "estimate_gb": report["peak_estimate"] / 2**30, "seconds": seconds,
        "output_gb": _dir_bytes(Path(args.output)) / 1e9,
        "bits_per_weight": report["bits_per_weight"], "micro_batch": report["micro_batch"],
        "spilled": report["spilled"],
    }  # fmt: skip
    print("| model | source | recipe | calibration | peak RSS | estimate | time | output |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['model']} ({row['layers']} layers, {row['hidden']}/{row['intermediate']}) "
          f"| {row['source_gb']:.1f} GB | {row['recipe']} | {row['calibration']} "
          f"| {row['peak_rss_gb']:.2f} GiB | {row['estimate_gb']:.2f} GiB "
          f"| {row['seconds']:.0f} s | {row['output_gb']:.2f} GB |")  # fmt: skip
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
