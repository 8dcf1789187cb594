"""`jquant.calib.apply_recipe` / `quantize_loaded`: a recipe applied to a loaded model."""

from __future__ import annotations

import jax
import pytest

import jquant
from jquant.calib import apply_recipe, is_quantized, quantize_loaded
from jquant.qarray import is_qarray


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return jquant.models.load(tiny_model)


def test_quantize_loaded_without_a_recipe_returns_the_same_objects(loaded):
    model, params, _ = loaded
    assert quantize_loaded(model, params, None) == (model, params)
    assert quantize_loaded(model, params, None, report=True) == (model, params, None)


def test_quantize_loaded_refuses_quantized_params(loaded):
    model, params, _ = loaded
    _, qparams, rows = quantize_loaded(model, params, "w8a16", report=True)
    assert is_quantized(qparams) and not is_quantized(params) and rows
    with pytest.raises(ValueError, match="already quantized.*drop --recipe w8a16"):
        quantize_loaded(model, qparams, "w8a16")


def test_apply_recipe_without_calibration_reports_rows(loaded):
    model, params, _ = loaded
    m, qparams, report = apply_recipe(model, params, "w8a16")  # no tokenizer needed
    assert m is model and report["calibrated"] is False and report["seconds"] >= 0
    n = sum(is_qarray(x) for x in jax.tree.leaves(qparams, is_leaf=is_qarray))
    assert n > 0 and len(report["rows"]) >= n


def test_apply_recipe_calibrates_when_the_recipe_asks(loaded):
    model, params, tok = loaded
    with pytest.raises(ValueError, match="needs calibration text.*no tokenizer"):
        apply_recipe(model, params, "w4a16-gptq-g64")
    _, qparams, report = apply_recipe(model, params, "w4a16-gptq-g64", tokenizer=tok,
                                      calib="python-code", samples=2, seq_len=16)  # fmt: skip
    assert report["calibrated"] is True and report["corpus"] == "python-code"
    assert is_quantized(qparams)
