"""The quality table of docs/results.md: every recipe quantized, saved, reloaded, evaluated.

    python benchmarks/results.py --out docs/results.json --plot docs/results.png

For each recipe (a name, or a YAML file such as the allocations that ``jquant allocate``
wrote into configs/examples/): ``jquant quantize smollm2-135m --recipe R -o DIR`` in a child
process (calibrating where the recipe asks on ``--calib``, 128 windows of 512 tokens: by
default `pydoc-calib`, the text the published table was calibrated on, not the command's
default `python-mix`; give another ``--out`` for another text), timed with its peak memory
(benchmarks/quantize_time.py); then ``jquant eval DIR`` (the packed
checkpoint, loaded without float weights) on each evaluation text: perplexity over the
first 16,384 tokens in windows of 512 (docs/evaluation.md). The float row evaluates the
model itself. Rows already in ``--out`` are kept and not run again, so an interrupted run
resumes. llama.cpp's points (its quantizations of the same float weights, measured on the
same text and windows) are drawn on the plot as given in docs/results.md. It prints the
Markdown table, then jquant's best model at each llama.cpp file size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
RECIPES = ("w8a16,fp8,w8a8-smoothquant,w4a16-rtn-g128,w4a16-rtn-g64,w4a16-gptq-g128,"
           "w4a16-gptq-g64,w4a16-awq-g128,w4a16-uint4-g64,w4a16-hqq-g64,w4a16-gptq-uint4-g64,"
           "w4a16-awq-gptq-uint4-g64,nf4,w4a16-mxfp4,w4a16-nvfp4,w3a16-gptq-g64,w8a16-emb8,"
           "w4a16-awq-gptq-uint4-g64-emb8,"
           "configs/examples/smollm2-alloc-105.5MB.yaml,configs/examples/smollm2-alloc-93.5MB.yaml,"
           "configs/examples/smollm2-alloc-88.2MB.yaml,"
           "configs/examples/smollm2-alloc-75MB.yaml")  # fmt: skip
TEXTS = ("pydoc-eval", "python-code")
# llama.cpp on SmolLM2-135M, same text and windows: (name, GGUF file MB, Δ perplexity %).
LLAMA_CPP = (("Q8_0", 144.8, 0.5), ("Q6_K", 138.4, 1.2), ("Q5_K_M", 112.1, 9.9),
             ("Q4_K_M", 105.5, 8.0), ("Q3_K_M", 93.5, 13.3), ("Q4_0", 91.7, 23.5),
             ("Q2_K", 88.2, 40.2))  # fmt: skip


def label(recipe: str) -> str:
    """A row's name: the recipe, or a recipe file's stem."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def is_allocated(recipe: str) -> bool:
    return "alloc" in label(recipe)


def _quantize_time():
    spec = importlib.util.spec_from_file_location("quantize_time", HERE / "quantize_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate(model: str, text: str, *, recipe: str | None = None) -> float:
    cmd = [sys.executable, "-m", "jquant.cli", "eval", model, "--corpus", text, "--json"]
    if recipe:
        cmd += ["--recipe", recipe]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)["perplexity"]


def run_row(model: str, recipe: str, texts, tmp: Path, calib: str) -> dict:
    if recipe == "float":
        row = {"recipe": "float", "quantize_seconds": None, "peak_rss_mib": None}
        target = model
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "jquant.cli", "eval", model, "--json", "--max-tokens", "512"],
            check=True, stdout=subprocess.PIPE, text=True).stdout)  # fmt: skip
        row.update(
            weight_bytes=info["weight_bytes"],
            bits_per_weight=info["bits_per_weight"],
            quantized_bits_per_weight=None,
        )
    else:
        target = tmp / "q"
        row = _quantize_time().run_quantize(model, recipe, target, extra=("--calib", calib))
    row["perplexity"] = {t: evaluate(str(target), t) for t in texts}
    return row


def format_table(rows: list[dict], texts) -> str:
    base = next(r for r in rows if r["recipe"] == "float")["perplexity"]
    head = "| recipe | bits/w quantized | bits/w all | model MB |"
    head += "".join(f" {t} | Δ |" for t in texts) + " quantize s | peak RSS MiB |"
    lines = [head, "|---" + "|---:" * (3 + 2 * len(texts) + 2) + "|"]
    for r in rows:
        q = r["quantized_bits_per_weight"]
        cells = [label(r["recipe"]), "-" if q is None else f"{q:.3f}",
                 f"{r['bits_per_weight']:.2f}", f"{r['weight_bytes'] / 1e6:.1f}"]  # fmt: skip
        for t in texts:
            ppl = r["perplexity"][t]
            cells += [f"{ppl:.3f}", f"{100 * (ppl / base[t] - 1):+.1f}%"]
        cells += [
            "-" if r["quantize_seconds"] is None else f"{r['quantize_seconds']:.0f}",
            "-" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_front(rows: list[dict], texts) -> str:
    """For each llama.cpp file: jquant's best row (on the first text) no larger than it."""
    base = next(r for r in rows if r["recipe"] == "float")["perplexity"]
    head = "| llama.cpp | MB | Δ | jquant's best at ≤ its size | MB |"
    head += "".join(f" Δ {t} |" for t in texts) + " no larger and no worse |"
    lines = [head, "|---|---:|---:|---|---:|" + "---:|" * len(texts) + "---|"]
    for name, mb, delta in LLAMA_CPP:
        fits = [r for r in rows if r["recipe"] != "float" and r["weight_bytes"] / 1e6 <= mb]
        if not fits:
            lines.append(f"| {name} | {mb} | +{delta}% | none | |" + " |" * len(texts) + " no |")
            continue
        best = min(fits, key=lambda r: r["perplexity"][texts[0]])
        d = {t: 100 * (best["perplexity"][t] / base[t] - 1) for t in texts}
        ok = "yes" if d[texts[0]] <= delta else f"no, by {d[texts[0]] - delta:.1f} points"
        lines.append(f"| {name} | {mb} | +{delta}% | {label(best['recipe'])} | "
                     f"{best['weight_bytes'] / 1e6:.1f} |"
                     + "".join(f" {d[t]:+.1f}% |" for t in texts) + f" {ok} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: str, texts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6.5 * len(texts), 4.8), squeeze=False)
    for ax, text in zip(axes[0], texts):
        base = next(r for r in rows if r["recipe"] == "float")["perplexity"][text]
        fixed = [r for r in rows if not is_allocated(r["recipe"]) and r["recipe"] != "float"]
        alloc = sorted((r for r in rows if is_allocated(r["recipe"])),
                       key=lambda r: r["weight_bytes"])  # fmt: skip
        for r in fixed:
            mb, ppl = r["weight_bytes"] / 1e6, r["perplexity"][text]
            ax.scatter(mb, ppl, color="tab:blue", s=16)
            ax.annotate(label(r["recipe"]), (mb, ppl), textcoords="offset points",
                        xytext=(4, 3), fontsize=6)  # fmt: skip
        if alloc:
            ax.plot([r["weight_bytes"] / 1e6 for r in alloc],
                    [r["perplexity"][text] for r in alloc], "o-", color="tab:green",
                    label="jquant allocate (one budget per point)")  # fmt: skip
        ax.axhline(base, color="gray", lw=0.8, ls="--", label=f"float ({base:.3f})")
        if text == "pydoc-eval":
            for name, mb, delta in LLAMA_CPP:
                ppl = base * (1 + delta / 100)
                ax.scatter(mb, ppl, color="tab:red", marker="x")
                above = name in ("Q8_0", "Q5_K_M")  # next to Q6_K, Q4_K_M
                ax.annotate(f"llama.cpp {name}", (mb, ppl), textcoords="offset points",
                            xytext=(4, 5 if above else -9), fontsize=7, color="tab:red")
        ax.set_xscale("log")
        ax.set_xlabel("model bytes (MB, log scale; all weights, embeddings included)")
        ax.set_ylabel(f"perplexity on {text} (lower is better)")
        ax.set_title(f"SmolLM2-135M on {text}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default=RECIPES, help="comma-separated (float is added)")
    p.add_argument("--texts", default=",".join(TEXTS))
    p.add_argument("--calib", default="pydoc-calib", help="calibration text (jquant --calib)")
    p.add_argument("--out", default="docs/results.json", help="rows (JSON); resumed from")
    p.add_argument("--plot", help="write perplexity vs model bytes here (PNG)")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="print the table (and plot) of the rows in --out; run nothing",
    )
    args = p.parse_args(argv)
    texts = [t for t in args.texts.split(",") if t]
    names = ["float"] + [r for r in args.recipes.split(",") if r and r != "float"]
    out = Path(args.out)
    done = {r["recipe"]: r for r in json.loads(out.read_text())} if out.exists() else {}
    if args.report_only:
        rows = [done[n] for n in names if n in done]
        print(format_table(rows, texts) + "\n\n" + format_front(rows, texts))
        if args.plot:
            plot(rows, args.plot, texts)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = done.get(name)
            if row is None or set(row["perplexity"]) != set(texts):
                print(f"== {name}", file=sys.stderr, flush=True)
                row = run_row(args.model, name, texts, Path(tmp), args.calib)
            rows.append(row)
            out.write_text(json.dumps(rows + [r for n, r in done.items() if n not in names],
                                      indent=2) + "\n")  # fmt: skip
    print(format_table(rows, texts) + "\n\n" + format_front(rows, texts))
    if args.plot:
        plot(rows, args.plot, texts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
