"""QAT and QLoRA on SmolLM2-135M: the runs behind docs/results.md's QAT section.

    python benchmarks/qat.py [--only qat-g128 ...] [--json docs/qat.json] [--report-only]

Each run is `examples/qat_smollm2.py` with the settings of configs/examples/qat_smollm2.yaml
and the overrides below; its numbers and loss curve go into the JSON file (runs already
there are kept). The table (markdown) is printed and the curves are drawn into
docs/qat.png. `--report-only` redraws from the JSON file without training.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = {
    "qat-g128": ["--recipe", "w4a16-rtn-g128"],
    "qat-g64": ["--recipe", "w4a16-rtn-g64"],
    "ste-g128": ["--recipe", "w4a16-rtn-g128", "--no-learn-scales"],
    "qlora-nf4": ["--mode", "qlora", "--recipe", "nf4", "--steps", "100"],
}
LABELS = {
    "qat-g128": "QAT + learned scales, int4 g128",
    "qat-g64": "QAT + learned scales, int4 g64",
    "ste-g128": "QAT (recomputed scales), int4 g128",
    "qlora-nf4": "QLoRA r16 on NF4 g64",
}


def _example():
    path = ROOT / "examples" / "qat_smollm2.py"
    spec = importlib.util.spec_from_file_location("qat_smollm2", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def table(results: dict) -> str:
    """The markdown table of the runs in ``results``."""
    lines = ["| run | recipe served | steps x tokens | minutes | pydoc-eval | vs float | "
             "PTQ (same format) | recovered |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in results.items():
        s, f = r["settings"], r["float"]
        lines.append(
            f"| {LABELS.get(name, name)} | {s['recipe']} | {s['steps']} x "
            f"{r['tokens_per_step']} | {r['train_seconds'] / 60:.0f} | {r['qat']:.3f} | "
            f"{100 * (r['qat'] / f - 1):+.1f}% | {r['rtn']:.3f} ({100 * (r['rtn'] / f - 1):+.1f}%) "
            f"| {100 * r['recovered']:.0f}% |")
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        curve = np.asarray(r["curve"])
        k = min(10, len(curve))
        smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(curve) + 1), smooth, label=LABELS.get(name, name))
    ax.set_xlabel("step (2 x 256 pydoc-calib tokens)")
    ax.set_ylabel("KL to the float model (10-step mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to do (default: all)")
    p.add_argument("--json", default=str(ROOT / "docs" / "qat.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "qat.png"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    path = pathlib.Path(args.json)
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.report_only:
        example = _example()
        for name in args.only or list(RUNS):
            results[name] = example.main(RUNS[name])
            path.write_text(json.dumps(results, indent=1))
    results = {k: results[k] for k in RUNS if k in results}
    print(table(results))
    plot(results, pathlib.Path(args.plot))
    return results


if __name__ == "__main__":
    main()
