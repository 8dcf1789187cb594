"""AWQ (jquant.algorithms.awq): scale search and clip search against NumPy on real inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.algorithms import awq as awq_mod
from jquant.algorithms.awq import (
    awq,
    expand_kv_scales,
    output_error,
    reduce_kv_channels,
    search_scales,
)
from jquant.calib.stats import from_inputs
from jquant.qarray import quantize_array
from jquant.recipe import Rule, RuleError

K, N, M = 80, 24, 512  # groups of 32 along K = 80 leave a short last group of 16
OUTLIERS = [3, 17, 40, 71]


@pytest.fixture(scope="module")
def data():
    """Inputs X (M, K) with correlated channels, four of them 30x larger; weights W."""
    rng = np.random.default_rng(0)
    mix = np.eye(K) + 0.2 * rng.standard_normal((K, K)) / np.sqrt(K)
    x = (rng.standard_normal((M, K)) @ mix).astype(np.float32)
    x[:, OUTLIERS] *= 30
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w2 = (rng.standard_t(4, (K, 16)) * 0.05).astype(np.float32)
    return x, w, w2


def rule_for(qtype, group_size, **args):
    # float32 scales: the NumPy RTN below reproduces the library's codes bit for bit.
    return Rule(pattern="w", weight=qtype, group_size=group_size, scale_dtype="float32",
                algorithm="awq", algorithm_args=args).resolve("w", 2)  # fmt: skip


def np_rtn(w, qtype, group_size, ratio=1.0):
    """NumPy round-to-nearest of w (K, N) along K; ``ratio`` scalar or (N, G). float32."""
    w_t = np.asarray(w, np.float32).T
    n, k = w_t.shape
    g = k if group_size is None else group_size
    ratio = np.broadcast_to(np.asarray(ratio, np.float32), (n, -(-k // g)))
    out = np.empty_like(w_t)
    for gi, start in enumerate(range(0, k, g)):
        v = w_t[:, start : start + g]
        r = ratio[:, gi : gi + 1]
        if qtype.startswith("int"):
            qmax = np.float32(2 ** (int(qtype[3:]) - 1) - 1)
            s = np.abs(v).max(axis=1, keepdims=True) * r / qmax
            s = np.where(s > 0, s, np.float32(1))
            out[:, start : start + g] = np.clip(np.round(v / s), -qmax - 1, qmax) * s
        else:
            qmax = np.float32(2 ** int(qtype[4:]) - 1)
            lo = np.minimum(v.min(axis=1, keepdims=True), 0) * r
            hi = np.maximum(v.max(axis=1, keepdims=True), 0) * r
            s = hi / qmax - lo / qmax
            s = np.where(s > 0, s, np.float32(1))
            z = np.clip(np.round(-lo / s), 0, qmax)
            out[:, start : start + g] = (np.clip(np.round(v / s + z), 0, qmax) - z) * s
    return out.T


def np_output_error(x, w, qtype, group_size, s):
    """NumPy: the mean over tokens of ‖x W - (x / s) Q(diag(s) W)‖²."""
    s = np.asarray(s, np.float32)
    q = np_rtn(w * s[:, None], qtype, group_size).astype(np.float64)
    x = np.asarray(x, np.float64)
    ref = x @ w.astype(np.float64)
    return np.sum(np.square(ref - (x / s) @ q)) / x.shape[0]


# ---- the scale search ----------------------------------------------------------------------


def test_hessian_loss_equals_output_error_on_the_inputs(data):
    x, w, w2 = data
    rules = [rule_for("int4", 32), rule_for("uint4", None)]
    s = np.random.default_rng(1).uniform(0.3, 3.0, K).astype(np.float32)
    got = output_error([w, w2], rules, from_inputs(x).hessian, s)
    want = np_output_error(x, w, "int4", 32, s) + np_output_error(x, w2, "uint4", None, s)
    np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.parametrize("qtype,group_size", [("int4", 32), ("uint4", None)])
def test_awq_scales_lower_the_real_output_error(data, qtype, group_size):
    x, w, _ = data
    s = search_scales([w], [rule_for(qtype, group_size)], from_inputs(x), grid=20)
    assert s.shape == (K,) and s.dtype == jnp.float32
    # Salient (outlier) channels get the largest scales.
    assert set(np.argsort(np.asarray(s))[-len(OUTLIERS) :]) == set(OUTLIERS)
    err = np_output_error(x, w, qtype, group_size, s)
    err_rtn = np_output_error(x, w, qtype, group_size, np.ones(K, np.float32))
    assert err < 0.5 * err_rtn, err / err_rtn  # measured 0.17 (int4 g32), 0.26 (uint4)


def test_alpha_zero_is_rtn(data):
    x, w, w2 = data
    rules = [rule_for("int4", 32), rule_for("uint4", None)]
    calib = from_inputs(x)
    s = search_scales([w, w2], rules, calib, grid=1)  # α ∈ {0}
    np.testing.assert_array_equal(s, np.ones(K, np.float32))
    # ... and α = 0 is the first candidate of every grid, scored as plain RTN.
    np.testing.assert_array_equal(awq_mod.candidate_scales(calib.mean_abs, [0.0, 0.5])[0],
                                  np.ones(K, np.float32))  # fmt: skip
    want = np_output_error(x, w, "int4", 32, s) + np_output_error(x, w2, "uint4", None, s)
    np.testing.assert_allclose(output_error([w, w2], rules, calib.hessian, s), want, rtol=2e-5)


def test_best_alpha_of_the_grid(data):
    """The search returns the NumPy-normalised mean|x|**α of the α with the least loss."""
    x, w, _ = data
    rule = rule_for("int4", 32)
    calib = from_inputs(x)
    grid = 20  # as in test_awq_scales_lower_the_real_output_error: one compilation
    m = np.abs(x.astype(np.float64)).mean(axis=0)
    cands = [m**a / np.sqrt((m**a).max() * (m**a).min()) for a in np.linspace(0, 1, grid)]
    losses = [np_output_error(x, w, "int4", 32, c.astype(np.float32)) for c in cands]
    s = search_scales([w], [rule], calib, grid=grid)
    np.testing.assert_allclose(s, cands[int(np.argmin(losses))], rtol=1e-5)


def test_kv_expand(data):
    """Scales tied over the query heads of each kv head (o_proj under GQA)."""
    kv, group, head_dim = 2, 2, 4
    c = np.arange(kv * group * head_dim)
    kv_channel = (c // head_dim // group) * head_dim + c % head_dim
    s_kv = np.arange(1.0, kv * head_dim + 1, dtype=np.float32)
    np.testing.assert_array_equal(expand_kv_scales(s_kv, kv, group, head_dim), s_kv[kv_channel])
    x, w, _ = data
    x, w = x[:, :16], w[:16]  # channels 3 (outlier) and 17... -> head 0 holds channel 3
    geometry = dict(num_kv_heads=kv, group=group, head_dim=head_dim)
    expand = functools.partial(expand_kv_scales, **geometry)
    reduce = functools.partial(reduce_kv_channels, **geometry)
    rule, grid = rule_for("int4", 8), 5
    s = search_scales([w], [rule], from_inputs(x), grid=grid, expand=expand, reduce=reduce)
    assert s.shape == (kv * head_dim,)
    # NumPy: reduce mean|x| over the copies, score each α with the expanded scales.
    m = np.abs(x.astype(np.float64)).mean(axis=0)
    m_kv = np.array([m[kv_channel == j].mean() for j in range(kv * head_dim)])
    cands = [m_kv**a / np.sqrt((m_kv**a).max() * (m_kv**a).min()) for a in np.linspace(0, 1, grid)]
    losses = [np_output_error(x, w, "int4", 8, c[kv_channel].astype(np.float32)) for c in cands]
    assert np.argmin(losses) > 0  # the outlier makes a non-trivial α win
    np.testing.assert_allclose(s, cands[int(np.argmin(losses))], rtol=1e-5)


def test_search_is_traceable(data):
    x, w, _ = data
    rules = [rule_for("int4", 32)]
    calib = from_inputs(x)
    eager = search_scales([w], rules, calib, grid=20)
    traced = jax.jit(lambda w, c: search_scales([w], rules, c, grid=20))(w, calib)
    np.testing.assert_array_equal(eager, traced)


# ---- the per-weight clip search -----------------------------------------------------------


def group_bounds(group_size):
    return [(a, min(a + group_size, K)) for a in range(0, K, group_size)]


def np_clip_errors(x, w, qtype, group_size, ratios):
    """NumPy brute force: Δ_gᵀ H_gg Δ_g per (ratio, output channel, group), H from x."""
    h = x.astype(np.float64).T @ x.astype(np.float64) / x.shape[0]
    out = []
    for r in ratios:
        d = (w - np_rtn(w, qtype, group_size, r)).astype(np.float64)  # (K, N)
        out.append([np.einsum("kn,kl,ln->n", d[a:b], h[a:b, a:b], d[a:b])
                    for a, b in group_bounds(group_size)])  # fmt: skip
    return np.transpose(np.array(out), (0, 2, 1))  # (R, N, G)


@pytest.mark.parametrize("qtype", ["int4", "uint4"])
def test_clip_search_equals_numpy_brute_force(data, qtype):
    x, w, _ = data
    calib = from_inputs(x)
    ratios = 1.0 - 0.5 * np.arange(21, dtype=np.float32) / np.float32(20)
    errors = np_clip_errors(x, w, qtype, 32, ratios)  # (R, N, G)
    q = awq(w, rule_for(qtype, 32), path="w", calibration=calib)
    d = (w - np.asarray(q.dequantize(), np.float32)).astype(np.float64)
    h = x.astype(np.float64).T @ x.astype(np.float64) / M
    chosen = np.stack([np.einsum("kn,kl,ln->n", d[a:b], h[a:b, a:b], d[a:b])
                       for a, b in group_bounds(32)], axis=1)  # fmt: skip
    np.testing.assert_allclose(chosen, errors.min(axis=0), rtol=1e-4, atol=1e-9)
    # Shrinking helps: the Hessian-weighted error is well below no clipping (ratio 1).
    no_clip = awq(w, rule_for(qtype, 32, clip=False), path="w", calibration=calib)
    d0 = (w - np.asarray(no_clip.dequantize(), np.float32)).astype(np.float64)
    rtn = quantize_array(w, qtype, axis=0, group_size=32, scale_dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(no_clip), jax.tree.leaves(rtn), strict=True):
        np.testing.assert_array_equal(a, b)  # clip: false is RTN
    assert np.sum(d * (h @ d)) < 0.9 * np.sum(d0 * (h @ d0))  # measured 0.47 / 0.70
    assert (errors.argmin(axis=0) > 0).mean() > 0.5  # most groups do shrink


def test_awq_is_traceable(data):
    x, w, _ = data
    rule = rule_for("uint4", 32)
    calib = from_inputs(x)
    eager = awq(w, rule, path="w", calibration=calib)
    traced = jax.jit(lambda w, c: awq(w, rule, path="w", calibration=c))(w, calib)
    # The same result up to XLA fusing the scale arithmetic differently under jit (an ulp
    # of a scale); a different code or clip ratio would be a whole step off.
    np.testing.assert_allclose(traced.scales(), eager.scales(), rtol=1e-6)
    np.testing.assert_allclose(traced.dequantize(), eager.dequantize(), rtol=1e-5, atol=1e-8)


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    ({"clip_search": True}, "unknown key"),
    ({"grid": 0}, "grid=0"),
    ({"clip_grid": 2.5}, "clip_grid"),
    ({"clip": "yes"}, "clip="),
    ({"max_shrink": 1.0}, "max_shrink"),
])  # fmt: skip
def test_bad_args_fail_when_the_rule_is_built(args, match):
    with pytest.raises(RuleError, match=match):
        rule_for("int4", 32, **args)


def test_missing_calibration_names_the_path(data):
    _, w, _ = data
    with pytest.raises(ValueError, match="layers/0/mlp/down_proj/kernel: awq needs calib"):
        awq(w, rule_for("int4", 32), path="layers/0/mlp/down_proj/kernel")


def test_calibration_of_the_wrong_width(data):
    x, w, _ = data
    with pytest.raises(ValueError, match="w: awq .* calibration for K=16"):
        awq(w, rule_for("int4", 32), path="w", calibration=from_inputs(x[:, :16]))


def test_search_input_errors(data):
    x, w, _ = data
    calib = from_inputs(x)
    with pytest.raises(ValueError, match="expand and reduce go together"):
        search_scales([w], [rule_for("int4", 32)], calib, expand=lambda s: s)
    with pytest.raises(ValueError, match="one rule per weight"):
        search_scales([w, w], [rule_for("int4", 32)], calib)
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(16, 24\)"):
        search_scales([w[:16]], [rule_for("int4", 32)], calib)
    with pytest.raises(ValueError, match="grid=0"):
        search_scales([w], [rule_for("int4", 32)], calib, grid=0)
