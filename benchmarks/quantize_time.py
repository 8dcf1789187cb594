"""Wall time and peak host memory of `jquant quantize` for every algorithm's recipe.

    python benchmarks/quantize_time.py                        # the shipped calibrated recipes
    python benchmarks/quantize_time.py --recipes w4a16-gptq-g128 --out docs/quantize_time.json

Each recipe runs as its own process (``python -m jquant.cli quantize MODEL --recipe R -o
DIR``), exactly as a user runs it: model loading, calibration (128 windows of 512 tokens of
`python-mix` by default), quantization and writing the packed checkpoint. Wall time is the
child's; peak memory is the child's maximum resident set size (``os.wait4``). Quantization
time alone (what the report JSON of the checkpoint records) is shown beside it. It prints a
table and never asserts speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = ("w4a16-rtn-g128,w4a16-hqq-g64,w4a16-gptq-g128,w4a16-gptq-g64,w4a16-gptq-uint4-g64,"
           "w4a16-awq-g128,w4a16-awq-gptq-uint4-g64,w3a16-gptq-g64,w8a8-smoothquant")  # fmt: skip


def run_quantize(model: str, recipe: str, output: str | os.PathLike, *,
                 extra: tuple[str, ...] = (), log=sys.stderr) -> dict:  # fmt: skip
    """Runs ``jquant quantize`` in a child process; returns its report plus wall time and
    peak memory."""
    cmd = [sys.executable, "-m", "jquant.cli", "quantize", model, "--recipe", recipe, "-o",
           os.fspath(output), "--overwrite", "--json", *extra]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None if log else
                             subprocess.DEVNULL, text=True)  # fmt: skip
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {child.returncode}")
    report = json.loads(out)
    # ru_maxrss is KiB on Linux.
    return {"recipe": recipe, "wall_seconds": wall, "quantize_seconds": report["seconds"],
            "peak_rss_mib": usage.ru_maxrss / 1024, **{k: report[k] for k in (
                "weight_bytes", "bits_per_weight", "quantized_bits_per_weight")}}  # fmt: skip


def format_table(rows: list[dict]) -> str:
    lines = ["| recipe | quantize s | process wall s | peak RSS MiB | bits/w (quantized) |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        q = r["quantized_bits_per_weight"]
        lines.append(f"| {r['recipe']} | {r['quantize_seconds']:.0f} | {r['wall_seconds']:.0f} "
                     f"| {r['peak_rss_mib']:.0f} | {q:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=RECIPES, help="comma-separated recipe names or paths")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            row = run_quantize(
                args.model,
                recipe,
                Path(tmp) / "q",
                extra=("--calib-samples", str(args.calib_samples)),
            )
            rows.append(row)
            print(f"{recipe}: {row['quantize_seconds']:.0f} s, peak {row['peak_rss_mib']:.0f} "
                  "MiB", file=sys.stderr, flush=True)  # fmt: skip
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
