"""SmoothQuant (jquant.algorithms.smoothquant) against NumPy W8A8 fake quantization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms.smoothquant import smooth_scales, smoothquant
from jquant.calib.stats import from_inputs
from jquant.qarray import quantize_array
from jquant.recipe import Rule, RuleError

K, M = 64, 256
OUTLIERS = [2, 30, 51]
DEAD = 5  # an input channel that is always zero
ZERO_ROW = 7  # an input channel whose weight rows are zero in every matmul


@pytest.fixture(scope="module")
def data():
    """Activations with three channels 50x larger than the rest (as in LLMs); q/k/v-like
    weights sharing the input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, OUTLIERS] *= 50
    x[:, DEAD] = 0
    ws = [(rng.standard_normal((K, n)) * 0.05).astype(np.float32) for n in (32, 16)]
    for w in ws:
        w[ZERO_ROW] = 0
    return x, ws


def np_smooth_scales(x, ws, alpha):
    """SmoothQuant's formula in NumPy (float64), with the zero-channel convention."""
    a = np.abs(x.astype(np.float64)).max(axis=0)
    wmax = np.max([np.abs(w.astype(np.float64)).max(axis=1) for w in ws], axis=0)
    s = np.maximum(a**alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-5)
    return np.where((a > 0) & (wmax > 0), s, 1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_smooth_scales_equal_the_formula(data, alpha):
    x, ws = data
    s = smooth_scales(ws, from_inputs(x), alpha=alpha)
    assert s.shape == (K,) and s.dtype == jnp.float32
    np.testing.assert_allclose(s, np_smooth_scales(x, ws, alpha), rtol=2e-6)
    assert s[DEAD] == 1 and s[ZERO_ROW] == 1


def np_fake_w8a8(x, w):
    """NumPy: per-token int8 activations times per-output-channel int8 weights."""
    sx = np.abs(x).max(axis=1, keepdims=True) / 127
    xq = np.clip(np.round(x / np.where(sx > 0, sx, 1)), -127, 127) * sx
    sw = np.abs(w).max(axis=0, keepdims=True) / 127
    wq = np.clip(np.round(w / np.where(sw > 0, sw, 1)), -127, 127) * sw
    return xq @ wq


def test_smoothing_lowers_the_w8a8_output_error(data):
    x, ws = data
    s = np.asarray(smooth_scales(ws, from_inputs(x), alpha=0.5), np.float64)
    x64 = x.astype(np.float64)
    for w in ws:
        w64 = w.astype(np.float64)
        ref = x64 @ w64
        plain = np.linalg.norm(ref - np_fake_w8a8(x64, w64))
        smoothed = np.linalg.norm(ref - np_fake_w8a8(x64 / s, s[:, None] * w64))
        assert smoothed < 0.5 * plain, smoothed / plain  # measured 0.30 and 0.26


def test_folding_is_exact(data):
    x, ws = data
    s = np.asarray(smooth_scales(ws, from_inputs(x)))
    for w in ws:
        ref = x.astype(np.float64) @ w.astype(np.float64)
        folded = (x / s) @ (s[:, None] * w)  # float32 throughout, as the model computes
        assert np.linalg.norm(folded - ref) <= 1e-6 * np.linalg.norm(ref)


def rule_for(activation="int8", **args):
    return Rule(pattern="w", weight="int8", activation=activation, algorithm="smoothquant",
                algorithm_args=args).resolve("w", 2)  # fmt: skip


def test_the_algorithm_is_rtn_with_the_activation_format(data):
    x, ws = data
    q = smoothquant(ws[0], rule_for(), path="w", calibration=from_inputs(x))
    rtn = quantize_array(ws[0], "int8", axis=0, activation="int8")
    assert q.activation == "int8"
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(rtn), strict=True):
        np.testing.assert_array_equal(a, b)


def test_traceable(data):
    x, ws = data
    calib = from_inputs(x)
    eager = smooth_scales(ws, calib, alpha=0.7)
    traced = jax.jit(lambda ws, c: smooth_scales(ws, c, alpha=0.7))(ws, calib)
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    q = jax.jit(lambda w, c: smoothquant(w, rule_for(), path="w", calibration=c))(ws[1], calib)
    assert q.activation == "int8" and q.shape == ws[1].shape


# ---- bad input ------------------------------------------------------------------------------


def test_weight_only_rule_is_refused(data):
    x, ws = data
    with pytest.raises(ValueError, match="layers/0/q: smoothquant is for W8A8 recipes"):
        smoothquant(ws[0], rule_for(activation=None), path="layers/0/q",
                    calibration=from_inputs(x))  # fmt: skip


def test_missing_calibration_is_refused(data):
    _, ws = data
    with pytest.raises(ValueError, match="layers/0/q: smoothquant needs calibration"):
        smoothquant(ws[0], rule_for(), path="layers/0/q")


@pytest.mark.parametrize("args,match", [
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"alpha": -0.1}, "alpha=-0.1"),
    ({"alpha": True}, "alpha=True"),
    ({"migration": 0.5}, "unknown key"),
])  # fmt: skip
def test_bad_args_fail_when_the_rule_is_built(args, match):
    with pytest.raises(RuleError, match=match):
        rule_for(**args)


def test_smooth_scales_input_errors(data):
    x, ws = data
    calib = from_inputs(x)
    with pytest.raises(ValueError, match="alpha=2"):
        smooth_scales(ws, calib, alpha=2)
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(32, 16\)"):
        smooth_scales([ws[0], ws[1][:32]], calib)
    with pytest.raises(ValueError, match="at least one weight"):
        smooth_scales([], calib)
