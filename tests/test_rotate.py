"""`jquant.rotate`: a rotated model computes the float function of the original.

The reference is the unrotated jquant model on the same tokens (its forward is checked
against transformers elsewhere); the folds against the dense NumPy matrices of
`tests/test_hadamard.py`'s construction.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from jquant.arch import LlamaConfig
from jquant.calib import quantize_loaded
from jquant.hadamard import rht_matrix
from jquant.io.packed import save_packed
from jquant.models import forward, load_packed, params_from_hf
from jquant.recipe import Recipe
from jquant.rotate import rotate, rotated_hf_config
from jquant.tree import leaves

TOKENS = np.array([[1, 5, 9, 3, 7, 2, 11], [4, 4, 8, 1, 0, 6, 10]])
CASES = [("llama", True), ("llama", False), ("qwen3", False), ("qwen3", True), ("qwen2", True)]


def _model(tiny, arch, tied):
    config = tiny.config(arch=arch, tied=tied)
    tensors = tiny.tensors(arch=arch, tied=tied)
    for name in tensors:  # norm weights near 1, other weights at a realistic scale
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.3 * tensors[name]
        else:
            tensors[name] = 0.05 * tensors[name]
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    return config, model, params


@pytest.mark.parametrize("arch,tied", CASES)
def test_rotated_logits_equal(tiny, arch, tied):
    _, model, params = _model(tiny, arch, tied)
    rotated, rparams = rotate(model, params, seed=3)
    assert rotated.config.rotation.residual_online == tied
    want = np.asarray(forward(model, params, TOKENS)[0], np.float64)
    got = np.asarray(forward(rotated, rparams, TOKENS)[0], np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # The weights did change: every kernel is rotated.
    before, after = dict(leaves(params)), dict(leaves(rparams))
    assert not np.allclose(before["layers/0/mlp/down_proj/kernel"],
                           after["layers/0/mlp/down_proj/kernel"])  # fmt: skip


def test_folds_are_the_rotation(tiny):
    """Untied llama: the table is ``E Q``, norms are 1, ``q_proj`` is ``Qᵀ diag(w) W``."""
    _, model, params = _model(tiny, "llama", False)
    _, rparams = rotate(model, params, seed=0)
    before, after = dict(leaves(params)), dict(leaves(rparams))
    d, f = tiny.shape["hidden"], tiny.shape["ffn"]
    q = rht_matrix(d, 0)
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    e = np.asarray(before["embed_tokens/embedding"], np.float64)
    np.testing.assert_allclose(after["embed_tokens/embedding"], e @ q, atol=1e-6)
    w = np.asarray(before["layers/1/input_layernorm/scale"], np.float64)
    wq = np.asarray(before["layers/1/self_attn/q_proj/kernel"], np.float64)
    np.testing.assert_allclose(after["layers/1/self_attn/q_proj/kernel"],
                               q.T @ (w[:, None] * wq), atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(after["layers/1/input_layernorm/scale"], np.ones(d))
    qf = rht_matrix(f, 0)
    down = np.asarray(before["layers/0/mlp/down_proj/kernel"], np.float64)
    np.testing.assert_allclose(after["layers/0/mlp/down_proj/kernel"], qf.T @ down @ q,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("arch", ("gemma2", "gemma3"))
def test_sandwich_norms_refused(tiny, arch):
    _, model, params = _model(tiny, arch, True)
    with pytest.raises(ValueError, match="sandwich norms"):
        rotate(model, params)


def test_gemma_and_moe_refused():
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=1,
                num_heads=4, num_kv_heads=2)  # fmt: skip
    gemma = LlamaConfig(**base, model_type="gemma", norm_offset=1.0, embed_scale=8.0)
    moe = LlamaConfig(**base, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                      moe_layers=(0,))  # fmt: skip
    for config, why in ((gemma, r"\(1 \+ w\)"), (moe, "mixture-of-experts")):
        from jquant.models.llama import init_model

        model = init_model(config)
        with pytest.raises(ValueError, match=why):
            rotate(model, nnx.state(model))


def test_twice_or_quantized_refused(tiny):
    _, model, params = _model(tiny, "llama", True)
    rotated, rparams = rotate(model, params)
    with pytest.raises(ValueError, match="rotated already"):
        rotate(rotated, rparams)
    _, qparams = quantize_loaded(model, params, "w8a16")
    with pytest.raises(ValueError, match="quantized"):
        rotate(model, qparams)


def test_unknown_online_size_refused(tiny):
    config = dataclasses.replace(LlamaConfig.from_hf(tiny.config()), intermediate_size=18)
    from jquant.models.llama import init_model

    model = init_model(config)
    with pytest.raises(ValueError, match="intermediate_size=18"):
        rotate(model, nnx.state(model))


HAD = {"name": "w8-had", "rotation": {"kind": "hadamard", "seed": 1}, "rules": [
    {"pattern": "embed", "skip": True},
    {"pattern": "kernel$", "weight": "int8"}]}  # fmt: skip


@pytest.mark.parametrize("tied", (True, False))
def test_packed_round_trip(tiny, tmp_path, tied):
    """A rotated, quantized model saved and loaded runs its online rotations again."""
    hf, model, params = _model(tiny, "llama", tied)
    qmodel, qparams = quantize_loaded(model, params, Recipe.from_dict(HAD))
    assert qmodel.config.rotation.seed == 1
    want = np.asarray(forward(qmodel, qparams, TOKENS)[0])
    save_packed(tmp_path / "out", config=rotated_hf_config(hf, qmodel.config), params=qparams)
    loaded, lparams, _, config = load_packed(tmp_path / "out")
    assert loaded.config.rotation == qmodel.config.rotation
    np.testing.assert_array_equal(np.asarray(forward(loaded, lparams, TOKENS)[0]), want)
    # The quantized rotated model is still close to the float one (the rotation was undone).
    ref = np.asarray(forward(model, params, TOKENS)[0])
    assert np.abs(want - ref).max() < 0.1 * np.abs(ref).max()


def test_recipe_rotation_key():
    r = Recipe.from_dict({**HAD, "rotation": {"seed": 4}})
    assert r.rotation == {"kind": "hadamard", "seed": 4}
    assert Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(ValueError, match="unknown key 'angle'"):
        Recipe.from_dict({**HAD, "rotation": {"kind": "hadamard", "angle": 1}})
    with pytest.raises(ValueError, match="kind='givens'"):
        Recipe.from_dict({**HAD, "rotation": {"kind": "givens"}})
    with pytest.raises(ValueError, match="seed=-1"):
        Recipe.from_dict({**HAD, "rotation": {"seed": -1}})
    with pytest.raises(ValueError, match="unknown key 'rotate'"):
        Recipe.from_dict({**HAD, "rotate": True})


def test_params_only_quantize_refuses_rotation(tiny):
    import jquant

    _, _, params = _model(tiny, "llama", True)
    with pytest.raises(ValueError, match="needs the model"):
        jquant.quantize(params, Recipe.from_dict(HAD))


@pytest.mark.parametrize("source,untie", [("tied", False), ("tied", True), ("untied", False)])
def test_streamed_quantize_matches_in_memory(tiny_model, tiny_gguf, tmp_path, source, untie):
    """``jquant quantize`` (layer by layer from disk) rotates as `quantize_loaded` does:
    online (a tied source, untied or not by the recipe) or folded into table and head."""
    from jquant import models
    from jquant.calib.stream import quantize_to_disk

    tiny_model = tiny_model if source == "tied" else str(tiny_gguf[0])
    rules = [{"pattern": "embed", "skip": True}, {"pattern": "kernel$", "weight": "int8"}]
    if untie:  # the head quantized apart from the tied table: the model is untied
        rules = [{"pattern": "embed", "skip": True}, {"pattern": "lm_head", "weight": "int8"},
                 *rules[1:]]  # fmt: skip
    recipe = Recipe.from_dict({**HAD, "rules": rules})
    model, params, _ = models.load(tiny_model)
    qmodel, qparams = quantize_loaded(model, params, recipe)
    path, _ = quantize_to_disk(tiny_model, recipe, tmp_path / "out", progress=False)
    loaded, lparams, _, config = load_packed(path)
    assert loaded.config == qmodel.config and config["jquant_rotation"]["seed"] == 1
    np.testing.assert_allclose(np.asarray(forward(loaded, lparams, TOKENS)[0]),
                               np.asarray(forward(qmodel, qparams, TOKENS)[0]),
                               rtol=0, atol=1e-5)  # fmt: skip


def test_calibrated_recipe_rotates_first(tiny):
    """GPTQ calibrates the rotated model (apply_recipe); quantize_model alone refuses."""
    from jquant.calib import apply_recipe, quantize_model

    _, model, params = _model(tiny, "llama", True)
    tokens = np.random.default_rng(0).integers(0, 200, (4, 16))
    qmodel, qparams, _ = apply_recipe(model, params, "w3a16-gptq-g64-had", tokens=tokens)
    assert qmodel.config.rotation.seed == 0 and qmodel.config.rotation.residual_online
    assert np.isfinite(np.asarray(forward(qmodel, qparams, TOKENS)[0])).all()
    with pytest.raises(ValueError, match="rotates the model"):
        quantize_model(model, params, "w3a16-gptq-g64-had", tokens)


@pytest.mark.parametrize("fmt", ("gguf", "compressed-tensors", "gptq"))
def test_export_refuses_a_rotated_model(tiny_model, tmp_path, capsys, fmt):
    """Other formats cannot run the online transforms: exporting says so."""
    from jquant.cli import main

    recipe = tmp_path / "had.yaml"
    recipe.write_text(Recipe.from_dict({**HAD, "rules": [
        {"pattern": "embed", "skip": True},
        {"pattern": "kernel$", "weight": "int4", "group_size": 32}]}).to_yaml())  # fmt: skip
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "out")
    argv = ["export", tiny_model, "--recipe", str(recipe), "--format", fmt, "-o", str(out)]
    assert main(argv) == 2
    assert "the model is rotated" in capsys.readouterr().err
    assert not out.exists()
