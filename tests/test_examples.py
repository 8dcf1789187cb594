"""Smoke tests: every example runs in its tiny setting and prints the right numbers."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

import jquant

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    """Imports examples/<name>.py as a module (registered first: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(f"jquant_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _dequantized(tree):
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, jquant.QArray) else x, tree,
                        is_leaf=lambda x: isinstance(x, jquant.QArray))  # fmt: skip


def _int4_bits(k: int, group_size: int | None, scale_bytes: int = 2) -> float:
    """Storage bits per weight of an int4 row of length k: codes + one scale per group."""
    groups = 1 if group_size is None else -(-k // group_size)
    return (k * 4 + groups * scale_bytes * 8) / k


def _check_flax_rows(rows):
    """The w4a16-flax recipe: int4 g128 kernels, out kernels per channel along head_dim."""
    by_path = {r.path: r for r in rows}
    kernels = [r for r in rows if r.path.endswith("kernel")]
    assert kernels and all(r.qtype == "int4" and r.algorithm == "rtn" for r in kernels)
    for r in kernels:
        if "/out/" in r.path:  # (heads, head_dim, D) along head_dim = 32
            assert r.group_size is None and r.bits_per_weight == _int4_bits(32, None) == 4.5
        else:  # K = 128 or 512: whole groups of 128
            assert r.group_size == 128 and r.bits_per_weight == 4.125
        assert 0.05 < r.rel_error < 0.12  # int4 absmax on Gaussian-like weights
    embedding = next(r for p, r in by_path.items() if p.endswith("embedding"))
    assert embedding.qtype == "skip" and embedding.bits_per_weight == 32.0
    assert all(r.qtype in ("float", "skip") for r in rows if not r.path.endswith("kernel"))


@pytest.fixture(scope="module")
def linen_run():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        out = _load("quantize_linen").main(["--tiny"])
    return out, printed.getvalue()


def test_quantize_linen(linen_run):
    out, printed = linen_run
    assert "params/Block_0/Dense_0/kernel" in printed and "4.125" in printed
    assert f"max |Δ logits| vs float = {out['max_delta']:.3e}" in printed
    _check_flax_rows(out["rows"])
    # jquant.apply on QArrays == Flax on the dequantized weights (the only difference is
    # where dequantization happens), and int4 stays within a sane distance of float.
    reference = out["model"].apply(_dequantized(out["qparams"]), out["ids"])
    np.testing.assert_allclose(out["logits"], reference, atol=1e-4, rtol=1e-4)
    assert 0 < out["rel_delta"] < 0.35


def test_quantize_linen_int8_is_close(linen_run):
    out, _ = linen_run
    qparams = jquant.quantize(out["params"], "w8a16")
    y_float = out["model"].apply(out["params"], out["ids"])
    y_int8 = jquant.apply(out["model"], qparams, out["ids"])
    rel = float(jnp.linalg.norm(y_int8 - y_float) / jnp.linalg.norm(y_float))
    assert 0 < rel < 0.03 < out["rel_delta"]  # int8 is much closer to float than int4


def test_quantize_nnx(capsys):
    stock_call = nnx.Linear.__dict__["__call__"]
    out = _load("quantize_nnx").main(["--tiny"])
    printed = capsys.readouterr().out
    assert "blocks/0/up/kernel" in printed and "w4a16-flax" in printed
    _check_flax_rows(out["rows"])
    reference = nnx.merge(out["graphdef"], _dequantized(out["qstate"]))(out["ids"])
    np.testing.assert_allclose(out["logits"], reference, atol=1e-4, rtol=1e-4)
    assert 0 < out["rel_delta"] < 0.35
    assert nnx.Linear.__dict__["__call__"] is stock_call  # nnx_quantized() restored it


def test_smollm2_ptq_tiny(capsys):
    module = _load("smollm2_ptq")
    out = module.main(["--tiny"])
    printed = capsys.readouterr().out
    ppl = out["perplexity"]
    # The random byte-level model is near uniform over 256 symbols, so its perplexity
    # hardly moves whatever the weights (all-zero ones included): the logits carry the
    # check. Their error relative to float's spread: int4 measures 0.21; zeroed codes
    # give 1.01 and doubled scales 0.72.
    assert 150 < ppl["float"] < 400
    model, params, tokenizer = module.tiny_model()
    qparams = jquant.quantize(params, "w4a16-rtn-g128")
    text = jquant.eval.load_corpus("pydoc-eval")[:1024]
    ids = jnp.asarray([tokenizer.encode(text[:128])], jnp.int32)
    want = np.asarray(jquant.models.forward(model, params, ids)[0])
    got = np.asarray(jquant.models.forward(model, qparams, ids)[0])
    spread = np.linalg.norm(want - want.mean(-1, keepdims=True))
    assert 0.1 < np.linalg.norm(got - want) / spread < 0.3
    # The example scored exactly these quantized weights (the same pipeline, bit for bit).
    again = jquant.eval.perplexity(model, qparams, text, tokenizer=tokenizer, seq_len=128,
                                   max_tokens=1024, progress=False)  # fmt: skip
    assert ppl["w4a16-rtn-g128"] == again.perplexity != ppl["float"]
    assert "perplexity [float] on pydoc-eval" in printed and "fits on:" in printed
    assert out["generation"].lengths.tolist() == [8]  # no stop tokens: the full budget
    mem = out["memory"]
    # 14 projections (K = 128 or 256) at int4 g128 with bf16 scales; norms and the tied
    # embedding stay float32.
    assert mem.by_format["int4"].tensors == 14 and mem.by_format["int4"].bits_per_weight == 4.125
    assert mem.layers == 2 and mem.kv_width == 2 * 32
    assert mem.kv_cache_bytes == 2 * 2 * 1 * 2048 * 64 * 2  # K+V, layers, batch, ctx, width, bf16
    assert mem.weight_bytes < out["float_bytes"] / 2


def test_memory_math_tiny_matches_concrete(capsys):
    """The abstract (eval_shape) weights equal those of really quantized parameters."""
    module = _load("memory_math")
    rows = module.main(["--tiny"])
    printed = capsys.readouterr().out
    assert "tiny" in printed and "H100 80G" in printed
    settings = yaml.safe_load(module.SETTINGS.read_text())
    hf = settings["models"]["tiny"]
    model = jquant.models.init_model(jquant.models.LlamaConfig.from_hf(hf), dtype=jnp.float32)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param))
    assert len(rows) == len(settings["precisions"]) * len(settings["kv_caches"])
    # int4 g128 has a short last group (K = 576); nf4 double-quantizes its scales.
    concrete = {p: jquant.quantize(params, p) for p in ("w4a16-rtn-g128", "nf4")}
    concrete["bfloat16"] = params
    for row in (r for r in rows if r["precision"] in concrete):
        expected = jquant.memory_report(concrete[row["precision"]], batch=8, context=8192,
                                        kv_cache=row["kv_cache"], config=hf)  # fmt: skip
        assert row["report"].by_format == expected.by_format, row["precision"]
        assert row["report"].kv_cache_bytes == expected.kv_cache_bytes
    kv = {r["kv_cache"]: r["report"].kv_cache_bytes for r in rows}
    elems = 2 * 2 * 8 * 8192 * (2 * 64)  # K+V, layers, batch, context, kv_heads * head_dim
    assert kv == {"bfloat16": elems * 2, "int8": elems + math.ceil(elems / 64) * 2}


def test_memory_math_llama3_8b(tmp_path):
    """Llama-3-8B's known parameter count, and int4 g128 at exactly 4.125 bits (K divides)."""
    module = _load("memory_math")
    settings = yaml.safe_load(module.SETTINGS.read_text())
    settings.update(precisions=["bfloat16", "w4a16-rtn-g128"], kv_caches=["bfloat16"])
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    rows = module.main(["--settings", str(path), "--models", "llama-3-8b", "--batch", "1"])
    bf16, int4 = (r["report"] for r in rows)
    assert bf16.weight_elements == 8_030_261_248 and bf16.bits_per_weight == 16.0
    assert int4.by_format["int4"].elements == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024
                                                    + 3 * 4096 * 14336)  # fmt: skip
    assert int4.by_format["int4"].bits_per_weight == 4.125
    assert int4.kv_cache_bytes == 2 * 32 * 1 * 8192 * 1024 * 2  # 8 kv heads x 128
    assert int4.fits_on["L4 24GB"] and not bf16.fits_on["TPU v5e (16GB/chip)"]


@pytest.mark.parametrize("mode", ["qat", "qlora"])
def test_qat_smollm2_tiny(mode, capsys):
    args = ["--tiny", "--mode", mode] + (["--recipe", "nf4"] if mode == "qlora" else [])
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 step counts and floats
        out = _load("qat_smollm2").main(args)
    printed = capsys.readouterr().out
    assert len(out["curve"]) == out["settings"]["steps"] == 4
    assert all(math.isfinite(v) for v in out["curve"])
    assert math.isfinite(out["qat"]) and out["qat"] > 1
    assert f"{mode} " in printed and "RTN's loss recovered" in printed
    if mode == "qat":  # the packed model computes what was trained
        assert out["convert_max_logit_diff"] < 1e-4
    else:
        # rank 16 on q, o (128 -> 128), k, v (128 -> 64), gate, up, down (128 <-> 256), 2 layers
        assert out["trainable"] == 2 * 16 * (2 * 256 + 2 * 192 + 3 * 384)
        assert out["memory"]["adapters"] == 4 * out["trainable"]


def test_qat_settings_reject_unknown_keys(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("steps: 3\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        _load("qat_smollm2").load_settings(bad, {})


@pytest.mark.parametrize("name", ["quantize_linen", "quantize_nnx", "smollm2_ptq",
                                  "memory_math"])  # fmt: skip
def test_examples_are_thin(name):
    text = (EXAMPLES / f"{name}.py").read_text()
    assert len(text.splitlines()) <= 110 and text.startswith('"""')


@pytest.mark.parametrize("doc", ["formats.md", "recipes.md", "api.md", "qat.md"])
def test_doc_snippets_run(doc):
    """Every ```python block of the docs runs, in order, in one namespace (blocks that start
    with "# not run" need a download and are skipped)."""
    text = (EXAMPLES.parent / "docs" / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    namespace: dict = {}
    registered = dict(jquant.algorithms._REGISTRY)  # recipes.md registers a demo algorithm
    try:
        # optax's Adam mixes int32 step counts and floats, which strict promotion refuses
        promotion = "standard" if doc == "qat.md" else "strict"
        with jax.numpy_dtype_promotion(promotion):
            for i, block in enumerate(blocks):
                if not block.startswith("# not run"):
                    exec(compile(block, f"docs/{doc}[{i}]", "exec"), namespace)
    finally:
        jquant.algorithms._REGISTRY.clear()
        jquant.algorithms._REGISTRY.update(registered)
