"""Recipes against float on quality, size and speed: what ``jquant compare`` runs.

>>> recipes = compare_recipes(["w8a16", "nf4"])  # float first, each loaded  # doctest: +SKIP
>>> rows = compare(model, params, tok, recipes, load_corpus("pydoc-eval"))  # doctest: +SKIP
>>> print(format_table(rows, source="pydoc-eval", seq_len=512, decode_tokens=32))
...  # doctest: +SKIP
>>> plot(rows, "ppl.png", title="smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jquant.calib.data import DEFAULT_CORPUS
from jquant.recipe import Recipe


def compare_recipes(names: Iterable[str | Recipe]) -> dict[str, Recipe | None]:
    """``{name: Recipe}``, float (None) first and each name once, every recipe loaded (so a
    bad name fails before anything slow).

    >>> list(compare_recipes(["nf4", "float", "nf4"]))
    ['float', 'nf4']
    """
    out: dict[str, Recipe | None] = {"float": None}
    for r in names:
        if isinstance(r, Recipe):
            out.setdefault(r.name, r)
        elif r not in out:
            out[r] = Recipe.load(r)
    return out


def compare(
    model, params, tokenizer, recipes: Mapping[str, Recipe | None] | Iterable[str | Recipe],
    text: str, *, seq_len: int = 512, max_tokens: int | None = 16384, batch_size: int = 4,
    decode_tokens: int = 32, calib: str = DEFAULT_CORPUS, calib_samples: int = 128,
    calib_seq_len: int = 512, progress: bool = False, log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per recipe (float first): quantized (calibrated when the recipe asks, on one
    set of calibration windows shared by all), evaluated on ``text`` and decoded.

    Args:
      recipes: ``{name: Recipe or None}`` (`compare_recipes`), or names / Recipes.
      decode_tokens: new tokens for `decode_speed` (0: skip decoding).
      calib, calib_samples, calib_seq_len: the calibration text (`apply_recipe`).
      log: called with a line before each step (``[2/3] nf4: perplexity``).

    Returns:
      Rows of ``{"recipe", "quantize_seconds", **evaluate(...),
      "decode_tokens_per_second", "delta_percent"}``; float's quantize_seconds is None, and
      so is decode_tokens_per_second without decoding. ``delta_percent`` is the perplexity
      change against float in percent.
    """
    from jquant import calib as calib_
    from jquant.eval.measure import decode_speed, evaluate

    if not isinstance(recipes, Mapping):
        recipes = compare_recipes(recipes)
    say = log or (lambda message: None)
    rows, tokens, n = [], None, len(recipes)
    for i, (name, recipe) in enumerate(recipes.items(), 1):
        start = time.perf_counter()
        seconds = None
        if recipe is None:
            qmodel, qparams = model, params
        else:
            say(f"[{i}/{n}] {name}: quantizing")
            if tokens is None and tokenizer is not None and calib_.needs_calibration(recipe):
                tokens = calib_.calibration_tokens(tokenizer, calib, samples=calib_samples,
                                                   seq_len=calib_seq_len)  # fmt: skip
            qmodel, qparams, report = calib_.apply_recipe(
                model, params, recipe, tokenizer=tokenizer, calib=calib, tokens=tokens,
                progress=progress,
            )  # fmt: skip
            seconds = report["seconds"]
        say(f"[{i}/{n}] {name}: perplexity")
        row = {"recipe": name, "quantize_seconds": seconds,
               **evaluate(qmodel, qparams, tokenizer, text, seq_len=seq_len,
                          max_tokens=max_tokens, batch_size=batch_size,
                          progress=progress)}  # fmt: skip
        if decode_tokens > 0:
            say(f"[{i}/{n}] {name}: decoding {decode_tokens} tokens")
        row["decode_tokens_per_second"] = (
            decode_speed(qmodel, qparams, tokenizer, decode_tokens) if decode_tokens > 0 else None
        )
        rows.append(row)
        say(f"[{i}/{n}] {name}: perplexity {row['perplexity']:.3f} "
            f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    base = rows[0]["perplexity"]
    for row in rows:
        row["delta_percent"] = 100.0 * (row["perplexity"] / base - 1.0)
    return rows


def format_table(rows: list[dict[str, Any]], *, source: str, seq_len: int,
                 decode_tokens: int) -> str:  # fmt: skip
    """The `compare` rows as a Markdown table (it pastes into a README), after two lines on
    what was measured: ``source`` names the text, ``seq_len`` its windows and
    ``decode_tokens`` the decoding."""
    lines = [
        f"Perplexity: {source}, first "
        f"{rows[0]['tokens'] + rows[0]['tokens'] // (seq_len - 1)} tokens, "
        f"seq_len {seq_len}. Decode: greedy, batch 1, {decode_tokens} new tokens.",
        "",
        "bits/w: all weights (float ones at their stored dtype); quantized: the quantized "
        "tensors alone, scales and zero points included.",
        "",
        "| recipe | bits/w | quantized bits/w | weights MB | perplexity | Δ vs float "
        "| decode tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed, q_bits = r["decode_tokens_per_second"], r["quantized_bits_per_weight"]
        lines.append(
            f"| {r['recipe']} | {r['bits_per_weight']:.2f} | "
            f"{'-' if q_bits is None else f'{q_bits:.2f}'} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['perplexity']:.3f} | {r['delta_percent']:+.1f}% | "
            f"{'-' if speed is None else f'{speed:.1f}'} |"
        )
    return "\n".join(lines)


def check_plot_path(path: str) -> None:
    """Raises ValueError if `plot` could not write ``path`` (no such directory, or an image
    type matplotlib does not write); the message starts with ``path``."""
    import matplotlib.figure

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{path!r}: no such directory {folder!r}")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    supported = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if ext and ext not in supported:
        raise ValueError(
            f"{path!r}: unknown image type {ext!r}; use one of {', '.join(sorted(supported))}"
        )


def plot(rows: list[dict[str, Any]], path: str, *, title: str) -> None:
    """Writes perplexity against weight size (one labelled point per row) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["weight_bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["recipe"], (r["weight_bytes"] / 1e6, r["perplexity"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("weight storage (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
