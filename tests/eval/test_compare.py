"""`jquant.eval.compare` and its table, plot check and weight statistics (what `jquant
compare` and `jquant eval` print), called as library functions."""

from __future__ import annotations

import numpy as np
import pytest

import jquant
from jquant.eval import check_plot_path, compare, compare_recipes, format_table, weight_stats

ROWS = [
    {"recipe": "float", "bits_per_weight": 32.0, "quantized_bits_per_weight": None,
     "weight_bytes": 540_000_000, "perplexity": 13.4131, "delta_percent": 0.0,
     "decode_tokens_per_second": 151.26, "tokens": 1022},
    {"recipe": "nf4", "bits_per_weight": 4.5049, "quantized_bits_per_weight": 4.25,
     "weight_bytes": 76_000_000, "perplexity": 14.0, "delta_percent": 4.3758,
     "decode_tokens_per_second": None, "tokens": 1022},
]  # fmt: skip


def test_format_table_is_the_markdown_table_by_hand():
    want = """\
Perplexity: pydoc-eval, first 1024 tokens, seq_len 512. Decode: greedy, batch 1, 32 new tokens.

bits/w: all weights (float ones at their stored dtype); quantized: the quantized tensors alone, \
scales and zero points included.

| recipe | bits/w | quantized bits/w | weights MB | perplexity | Δ vs float | decode tokens/s |
|---|---:|---:|---:|---:|---:|---:|
| float | 32.00 | - | 540.0 | 13.413 | +0.0% | 151.3 |
| nf4 | 4.50 | 4.25 | 76.0 | 14.000 | +4.4% | - |"""
    assert format_table(ROWS, source="pydoc-eval", seq_len=512, decode_tokens=32) == want


def test_compare_recipes_puts_float_first_once_and_loads_each():
    recipes = compare_recipes(["nf4", "float", "w8a16", "nf4"])
    assert list(recipes) == ["float", "nf4", "w8a16"]
    assert recipes["float"] is None and recipes["nf4"].name == "nf4"
    with pytest.raises(ValueError, match="no-such-recipe"):
        compare_recipes(["no-such-recipe"])


def test_check_plot_path_names_the_path_and_the_problem(tmp_path):
    check_plot_path(str(tmp_path / "ok.png"))
    with pytest.raises(ValueError, match=r"^'/no/such/dir/p.png': no such directory"):
        check_plot_path("/no/such/dir/p.png")
    with pytest.raises(ValueError, match=r"unknown image type 'xyz'"):
        check_plot_path(str(tmp_path / "p.xyz"))


def test_weight_stats_counts_quantized_tensors_apart():
    params = {"dense": {"kernel": np.ones((256, 64), np.float32),
                        "bias": np.zeros(64, np.float32)}}
    assert weight_stats(params) == (256 * 64 * 4 + 64 * 4, 32.0, None)
    q = jquant.quantize(params, "w4a16-rtn-g128")
    nbytes, bits, q_bits = weight_stats(q)
    assert q_bits == pytest.approx(4.125)  # 4-bit codes + one bf16 scale per 128
    assert nbytes == 256 * 64 // 2 + 2 * 64 * 2 + 64 * 4
    assert bits == pytest.approx(8 * nbytes / (256 * 64 + 64))


def test_compare_rows_on_a_tiny_model(tiny_model):
    model, params, tok = jquant.models.load(tiny_model)
    text = jquant.eval.load_corpus("python-code")
    lines = []
    rows = compare(model, params, tok, ["w8a16"], text, seq_len=32, max_tokens=256,
                   decode_tokens=0, log=lines.append)  # fmt: skip
    assert [r["recipe"] for r in rows] == ["float", "w8a16"]
    assert rows[0]["quantize_seconds"] is None and rows[1]["quantize_seconds"] > 0
    assert rows[0]["delta_percent"] == 0.0
    assert rows[1]["delta_percent"] == pytest.approx(
        100 * (rows[1]["perplexity"] / rows[0]["perplexity"] - 1))
    assert all(r["decode_tokens_per_second"] is None for r in rows)
    assert rows[1]["weight_bytes"] < rows[0]["weight_bytes"]
    assert lines[0] == "[1/2] float: perplexity" and lines[1].startswith("[1/2] float: perplexity ")
    assert lines[2:4] == ["[2/2] w8a16: quantizing", "[2/2] w8a16: perplexity"]
