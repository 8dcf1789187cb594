"""The decode benchmark's core on a tiny random model: it runs, and its rows add up.

No torch: the transformers column is skipped. Speed is never asserted.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
from flax import nnx

from jquant.models import LlamaConfig, init_model

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128)  # fmt: skip


@pytest.fixture(scope="module")
def decode_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_decode_benchmark_rows(decode_bench):
    model = init_model(LlamaConfig(**TINY), seed=0)
    rows = decode_bench.run_benchmark(
        model, nnx.state(model), [5, 9, 17, 3], recipes=["float", "w8a16"], batches=[1, 2],
        new_tokens=4, repeats=1, log=None,
    )  # fmt: skip
    want = [("float", 1), ("float", 2), ("w8a16", 1), ("w8a16", 2)]
    assert [(r["recipe"], r["batch"]) for r in rows] == want
    for r in rows:
        assert r["engine"] == "jquant" and r["tokens_per_s"] > 0 and r["ratio_vs_hf"] is None
        assert r["ms_per_step"] == pytest.approx(1e3 * r["batch"] / r["tokens_per_s"])
    assert rows[2]["weight_mb"] < rows[0]["weight_mb"]  # int8 kernels, float embeddings
    table = decode_bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| jquant | w8a16 | 2 |" in table


def test_decode_benchmark_rejects_one_token(decode_bench):
    model = init_model(LlamaConfig(**TINY), seed=0)
    with pytest.raises(ValueError, match="new_tokens=1"):
        decode_bench.run_benchmark(model, nnx.state(model), [5], recipes=["float"], batches=[1],
                                   new_tokens=1, repeats=1, log=None)  # fmt: skip
