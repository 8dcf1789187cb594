"""The decode benchmark's core on a tiny random model: it runs, and its rows add up.

No torch: the transformers column is skipped. Speed is never asserted.
"""

import importlib.util
import json
import math
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


@pytest.fixture(scope="module")
def kernels_bench():
    path = Path(__file__).parents[1] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("kernels_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_benchmark_writes_rows(kernels_bench, tmp_path, capsys):
    out = tmp_path / "k.json"
    kernels_bench.main(["--shapes", "small", "--kinds", "int4,nvfp4,w8a8_fp8", "--warmup", "0",
                        "--iters", "1", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert data["backend"] == "cpu" and data["shapes"] == "small"
    rows = data["rows"]
    # CPU: no kernel timing (interpret mode is not a speed); qdot runs the dispatched path
    keys = {(r["kind"], r["k"], r["n"], r["m"], r["method"]) for r in rows}
    want = {(kind, k, n, m, method) for kind in ("int4", "nvfp4", "w8a8_fp8")
            for k, n in kernels_bench.SMALL_SHAPES for m in kernels_bench.SMALL_MS
            for method in ("bf16_dot", "xla", "qdot")}  # fmt: skip
    assert keys == want and len(rows) == len(want)
    for r in rows:
        assert r["ms"] > 0 and r["gb_s"] > 0 and r["hbm_frac"] is None
        assert r["group_size"] == {"w8a8_fp8": None, "nvfp4": 16}.get(r["kind"], 128)
        if r["method"] == "bf16_dot":
            assert r["speedup_vs_bf16"] == 1.0
    assert "w8a8_fp8" in capsys.readouterr().out


def test_kernels_benchmark_rejects_unknown_kind(kernels_bench):
    with pytest.raises(SystemExit):
        kernels_bench.main(["--kinds", "int5"])


def _load(name):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_blocks_smoke_sweep(tmp_path, capsys):
    tune = _load("tune_blocks")
    out = tmp_path / "t.json"
    results = tune.main(["--smoke", "--out", str(out)])
    assert [m for m, *_ in results] == [1, 16]
    for _, best, seconds, timings in results:
        assert seconds == min(t for t, _ in timings) and best in [b for _, b in timings]
        # bf16 x on TPU: block_m 8 breaks the (16, 128) tile rule, so it is never a candidate
        assert all(b.block_m % 16 == 0 for _, b in timings) and len(timings) == 4
    printed = capsys.readouterr().out
    assert '"tpu": (' in printed and "(1 << 62, BlockSizes(" in printed
    data = json.loads(out.read_text())
    assert data["interpret"] is True and len(data["results"][0]["timings"]) == 4


def test_paged_attention_benchmark_rows_are_a_dispatch_table(tmp_path, capsys):
    from jquant.kernels import dispatch_table

    bench = _load("paged_attention")
    out = tmp_path / "a.json"
    bench.main(["--shapes", "small", "--warmup", "0", "--iters", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["rows"]
    # CPU: XLA only (the kernel would run interpreted); one row per (model, format, case)
    keys = {(r["kv_cache"], r["m"], r["rows"], r["context"], r["method"]) for r in rows}
    assert keys == {(f, s, n, c, "xla") for f in bench.SMALL_FORMATS
                    for s, n, c in bench.SMALL_CASES}  # fmt: skip
    assert all(r["kind"] == "paged_attention" and r["ms"] > 0 and r["gb_s"] > 0 for r in rows)
    # ... loadable as a dispatch table: no kernel timings, so no kernel at any S
    assert dispatch_table.table_from_benchmark(rows, "gpu") == {("gpu", "paged_attention"): 0}
    assert "tiny" in capsys.readouterr().out


def test_tune_blocks_needs_a_device_or_smoke():
    with pytest.raises(SystemExit):
        _load("tune_blocks").main([])


def test_qat_report_table_and_plot(tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "qat.py"
    spec = importlib.util.spec_from_file_location("qat_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = {"settings": {"recipe": "w4a16-rtn-g128", "steps": 3}, "tokens_per_step": 512,
           "train_seconds": 120.0, "float": 10.0, "rtn": 16.0, "qat": 12.0,
           "recovered": 2 / 3, "curve": [0.5, 0.4, 0.3]}  # fmt: skip
    (tmp_path / "qat.json").write_text(json.dumps({"qat-g128": run}))
    module.main(["--report-only", "--json", str(tmp_path / "qat.json"),
                 "--plot", str(tmp_path / "qat.png")])  # fmt: skip
    text = module.table({"qat-g128": run})
    assert "| 3 x 512 | 2 | 12.000 | +20.0% | 16.000 (+60.0%) | 67% |" in text
    assert (tmp_path / "qat.png").stat().st_size > 1000


def test_compile_time_benchmark_prints_every_path(tiny_model, capsys):
    """benchmarks/compile_time.py on a tiny GGUF: one row per path, and the decode speed."""
    path = Path(__file__).parents[1] / "benchmarks" / "compile_time.py"
    spec = importlib.util.spec_from_file_location("compile_time_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--model", tiny_model])
    out = capsys.readouterr().out
    for row in ("| generate (prefill + decode loop) |", "| eval perplexity", "| engine: "):
        assert row in out, out
    assert "generate decode:" in out and "tokens/s" in out


def test_synthetic_checkpoint_shapes_are_jquants():
    """Every shape's config.json is accepted, and its tensors are the ones jquant requires."""
    from jquant.io import expected_shapes
    from jquant.io.hf import config_from_hf

    synth = _load("synthetic_checkpoint")
    for shape in synth.SHAPES:
        raw = synth.config_for(shape)
        config = config_from_hf(raw, shape)
        assert synth.tensor_shapes(raw) == expected_shapes(config), shape
    llama, qwen = (config_from_hf(synth.config_for(s)) for s in ("llama3-8b", "qwen2.5-14b"))
    assert (llama["num_hidden_layers"], llama["intermediate_size"], llama["vocab_size"]) == (
        32, 14336, 128256)  # fmt: skip
    assert llama["rope_theta"] == 500000.0 and not llama["attention_bias"]
    assert (qwen["num_hidden_layers"], qwen["hidden_size"], qwen["num_key_value_heads"]) == (
        48, 5120, 8)  # fmt: skip
    assert qwen["attention_bias"] and qwen["sliding_window"] is None
    assert not llama["tie_word_embeddings"] and not qwen["tie_word_embeddings"]
    qwen_shapes = synth.tensor_shapes(synth.config_for("qwen2.5-14b"))
    qwen_bytes = 2 * sum(math.prod(s) for s in qwen_shapes.values())
    assert qwen_bytes > 29e9  # the point: more than the machine's 24 GiB
    assert synth.config_for("qwen2.5-14b", layers=2)["num_hidden_layers"] == 2


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen2"])
def test_synthetic_checkpoint_loads(tmp_path, shape):
    """A tiny synthetic directory, in several shards and chunks, reads back through jquant."""
    import ml_dtypes
    import numpy as np
    from safetensors import safe_open

    from jquant.io import load_checkpoint

    synth = _load("synthetic_checkpoint")
    out = tmp_path / shape
    done = synth.write_checkpoint(out, shape, seed=3, shard_bytes=1 << 20, chunk_elems=5000,
                                  log=None)  # fmt: skip
    assert done["shards"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == [shape]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shapes = synth.tensor_shapes(synth.config_for(shape))
    assert index["metadata"]["total_size"] == done["bytes"] == 2 * sum(
        math.prod(s) for s in shapes.values())  # fmt: skip
    up = "model.layers.1.mlp.up_proj.weight"
    with safe_open(out / index["weight_map"][up], framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert tuple(f.get_slice(up).get_shape()) == shapes[up]

    ckpt = load_checkpoint(out)
    assert ckpt.tokenizer is None and set(ckpt.tensors) == set(shapes)
    assert {k: v.shape for k, v in ckpt.tensors.items()} == shapes
    config = synth.config_for(shape)
    for name in (up, "model.embed_tokens.weight", "model.norm.weight"):
        want = synth.tensor_values(name, shapes[name], config, seed=3)
        want = want.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(ckpt.tensors[name], want, err_msg=name)
    w = ckpt.tensors["model.layers.0.self_attn.q_proj.weight"]
    cols = np.sqrt(np.mean(w * w, axis=0))
    assert cols.max() > 5 * np.median(cols)  # outlier input channels
    if shape == "tiny-qwen2":
        assert ckpt.tensors["model.layers.0.self_attn.k_proj.bias"].shape == (64,)


def test_synthetic_checkpoint_refuses_to_overwrite(tmp_path):
    synth = _load("synthetic_checkpoint")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        synth.write_checkpoint(tmp_path / "x", "tiny", log=None)
    with pytest.raises(ValueError, match="layers=0"):
        synth.write_checkpoint(tmp_path / "y", "tiny", layers=0, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


@pytest.mark.reference
@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen2"])
def test_synthetic_checkpoint_loads_in_transformers(tmp_path, shape):
    """transformers reads the directory as its own: no missing, unexpected or misshapen key."""
    torch = pytest.importorskip("torch")
    spec = importlib.util.find_spec("kernels")  # transformers imports the hub's `kernels`
    if spec and Path(spec.origin).parent == Path(__file__).parents[1] / "kernels":
        pytest.skip("PYTHONPATH puts this repo's kernels/ before the package transformers needs")
    import transformers

    synth = _load("synthetic_checkpoint")
    synth.write_checkpoint(tmp_path / shape, shape, shard_bytes=1 << 20, log=None)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / shape, dtype=torch.bfloat16, output_loading_info=True
    )
    assert type(model).__name__ == synth.SHAPES[shape]["architectures"][0]
    assert all(not v for v in info.values()), info


def test_lora_decode_benchmark_runs_its_three_runners():
    model = init_model(LlamaConfig(**TINY), seed=0)
    rows = _load("lora_decode").run(model, nnx.state(model), rows=3, count=2, rank=2, steps=2,
                                    position=20)  # fmt: skip
    assert [r[0] for r in rows] == ["no adapters", "2 loaded, all rows base",
                                    "2 loaded, rows spread"]  # fmt: skip
    assert all(median > 0 and p90 > 0 for _, median, p90 in rows)


def test_speculative_benchmark_table(tiny_model, capsys):
    """benchmarks/speculative.py on a tiny GGUF: a row per workload and k, the same greedy
    tokens with and without speculation."""
    _load("speculative").main(["--model", tiny_model, "--recipe", "float", "--k", "0,2",
                               "--max-tokens", "12", "--repeats", "1", "--max-context", "256",
                               "--passage-chars", "100"])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| copy |", "| fresh |"))]
    assert len(rows) == 4 and "differs" not in out, out
    assert all(row.endswith("1.00x |") for row in rows[::2]) and "| 12 |" in rows[1]


def test_moe_calibration_benchmark_rows():
    """The MoE calibration benchmark on one family, one calibration size and one method:
    float, RTN and GPTQ rows with finite perplexities, and its table."""
    bench = _load("moe_calib")
    rows = bench.run(["qwen2_moe"], [4], methods=("gptq",))
    assert [(r["method"], r["windows"]) for r in rows] == [("float", 0), ("rtn", 0), ("gptq", 4)]
    assert all(1.0 < r["perplexity"] < 96.0 for r in rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| qwen2_moe | gptq | 64 |" in table


def test_moe_memory_benchmark_counts_by_hand():
    """The MoE memory benchmark on a small Qwen3-MoE config against counts by hand: each
    stack (E, K, N) under int4 g128 is E·K·N·(4 + 16/128) bits (bf16 scales), k of E active."""
    bench = _load("moe_memory")
    e, k, d, f = 8, 2, 256, 128
    config = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                  vocab_size=512, hidden_size=d, intermediate_size=384, moe_intermediate_size=f,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, num_experts=e, num_experts_per_tok=k, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)  # fmt: skip
    float_row = bench.price(config, None)
    assert float_row["layer_gb"] * 1e9 == 3 * e * d * f * 2
    row = bench.price(config, "w4a16-gptq-g128")  # priced by its format: no calibration
    assert row["layer_gb"] * 1e9 == 3 * e * d * f * (4 + 16 / 128) / 8
    assert row["layer_active_gb"] * 1e9 == 3 * k * d * f * (4 + 16 / 128) / 8
    assert float_row["weights"] - float_row["active_weights"] == 2 * 3 * (e - k) * d * f
