"""GPTQ against a row-by-row NumPy GPTQ, against RTN, traced, and its failure modes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jquant.algorithms.gptq  # noqa: F401 (registers "gptq")
from jquant import algorithms, qtypes
from jquant.algorithms import _gptq_host
from jquant.algorithms.gptq import check_info, gptq
from jquant.calib.stats import Calibration, from_inputs
from jquant.qarray import quantize_array
from jquant.recipe import Rule


def _rule(weight="int4", path="w", **kw):
    kw.setdefault("algorithm", "gptq")
    return Rule(pattern="w", weight=weight, **kw).resolve(path, 2)


def _layer(seed, k, n, *, dead=()):
    """A weight and the calibration of inputs with strongly correlated channels (few
    latent factors plus noise, channel scales over a decade), so GPTQ differs from RTN."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((512, k // 8)) @ rng.standard_normal((k // 8, k))
    x = (latent + 0.3 * rng.standard_normal((512, k))) * 10.0 ** rng.uniform(-0.5, 0.5, k)
    x[:, list(dead)] = 0.0
    w = rng.standard_normal((k, n)) * 0.05
    return w.astype(np.float32), from_inputs(x.astype(np.float32))


# ---- the NumPy reference ---------------------------------------------------------------


def _round_up(x32, dtype):
    """float32 ``x32`` cast to ``dtype`` rounding up (the scale dtype cast)."""
    y = x32.astype(dtype)
    up = np.nextafter(y, np.asarray(np.inf, dtype))
    return np.where(y.astype(np.float32) < x32, up, y)


def _np_scale(block_t, qt, scale_dtype):
    """Scale and zero point of each row of ``block_t (N, L)``: absmax (or the min/max range
    holding zero) onto the format's target, computed in float32, rounded up to the dtype."""
    target = np.float32(qt.scale_target)
    if not qt.asymmetric:
        s = np.abs(block_t).max(-1).astype(np.float32) / target
        return _round_up(np.where(s > 0, s, np.float32(1)), scale_dtype), None
    lo = np.minimum(block_t.min(-1), 0).astype(np.float32)
    hi = np.maximum(block_t.max(-1), 0).astype(np.float32)
    s = _round_up(np.where(hi - lo > 0, hi / target - lo / target, np.float32(1)), scale_dtype)
    z = np.clip(np.round(-lo / s.astype(np.float32)), qt.qmin, qt.qmax)
    return s, z.astype(scale_dtype)


def np_gptq(w, h, qtype, group_size, *, act_order, static_groups, damp=0.01, sd=np.float32):
    """Plain GPTQ, one row at a time in float64 (no lazy batch, no JAX) → codes (N, K),
    scales (N, G) and zero points (N, G, or None)."""
    qt = qtypes.get(qtype)
    w, h = w.astype(np.float64), h.astype(np.float64).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # dead inputs keep their weights (GPTQ's reference zeroes them)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    gs = group_size or k
    scales = {}
    if static_groups:
        for g in range(0, k, gs):
            scales[g // gs] = _np_scale(w[g : g + gs].T, qt, sd)
    hp = h[perm][:, perm]
    u = np.linalg.cholesky(np.linalg.inv(hp)).T
    wp = w[perm].copy()
    codes = np.zeros(w.shape[::-1])
    for i in range(k):
        g = perm[i] // gs
        if not static_groups and perm[i] % gs == 0:  # no act order: rows in place
            scales[g] = _np_scale(wp[i : i + gs].T, qt, sd)
        s, z = (np.asarray(a, np.float64) if a is not None else 0.0 for a in scales[g])
        c = np.clip(np.round(wp[i] / s + z), qt.qmin, qt.qmax)
        err = (wp[i] - (c - z) * s) / u[i, i]
        wp[i + 1 :] -= np.outer(u[i, i + 1 :], err)
        codes[:, perm[i]] = c
    groups = [scales[g] for g in sorted(scales)]
    zeros = None if groups[0][1] is None else np.stack([z for _, z in groups], -1)
    return codes, np.stack([s for s, _ in groups], -1), zeros


# Every case and most other tests use one (K, N) = (100, 24) layer geometry: K is not a
# multiple of the group (a short last group of 4) nor of the block size, and tests that
# share a case's settings reuse its compilation.
K, N = 100, 24
# (qtype, group_size, act_order, static_groups, block_size, scale dtype, dead rows)
CASES = {
    "int4-g32-short-last-act-order": ("int4", 32, True, True, 40, "bfloat16", (7,)),
    "uint4-asymmetric": ("uint4", 32, True, True, 40, "float32", ()),
    # Blocks of two groups; a block of 80 rows would cut group 2 (rows 64-95) in two.
    "uint4-dynamic-groups": ("uint4", 32, False, False, 80, "bfloat16", ()),
    "int8-per-channel": ("int8", None, True, True, 40, "float32", ()),
}


def _case_rule(case, **kw):
    qtype, gs, act_order, static, block, sd, _ = CASES[case]
    args = {"act_order": act_order, "static_groups": static, "block_size": block}
    return _rule(qtype, group_size=gs, scale_dtype=sd, algorithm_args=args, **kw)


def _narrow_sweeps(monkeypatch, cols):
    """Eager sweeps of ``cols`` output columns at a time (N = 24: chunks and a short last)."""
    monkeypatch.setattr(_gptq_host, "SWEEP_BYTES", 4 * K * cols)


@pytest.mark.parametrize("cols", [None, 7], ids=["one-sweep", "7-column-sweeps"])
@pytest.mark.parametrize("case", list(CASES))
def test_codes_equal_numpy_gptq(case, cols, monkeypatch):
    if cols:
        _narrow_sweeps(monkeypatch, cols)
    qtype, gs, act_order, static, _, sd, dead = CASES[case]
    w, calib = _layer(len(case), K, N, dead=dead)
    q, info = gptq(w, _case_rule(case), path="w", calibration=calib)
    np_sd = ml_dtypes.bfloat16 if sd == "bfloat16" else np.float32
    ref, ref_scale, ref_zero = np_gptq(w, np.asarray(calib.hessian), qtype, gs,
                                       act_order=act_order, static_groups=static, sd=np_sd)
    got = np.asarray(q.codes(), np.float64)
    # Every code equal: float32 (jquant) and float64 (the reference) could in principle
    # round a value at a code boundary differently; none does for these layers.
    np.testing.assert_array_equal(got, ref)
    # float32 scales may differ in the last bit (the order of the range's arithmetic).
    np.testing.assert_allclose(np.asarray(q.scale, np.float32), ref_scale.astype(np.float32),
                               rtol=1e-6)  # fmt: skip
    if ref_zero is not None:
        np.testing.assert_array_equal(np.asarray(q.zero_point, np.float32),
                                      ref_zero.astype(np.float32))  # fmt: skip
    assert float(info["damp"]) == pytest.approx(0.01) and bool(info["factored"])
    rtn = np.asarray(quantize_array(w, qtype, group_size=gs, scale_dtype=jnp.dtype(sd)).codes())
    assert (got != rtn).mean() > 0.1  # GPTQ really moved codes
    for row in dead:  # a dead input is rounded as RTN rounds it
        np.testing.assert_array_equal(got[:, row], rtn[:, row])


def _output_error(w, q, h):
    d = np.asarray(q.dequantize(), np.float64) - w
    return float(np.trace(d.T @ np.asarray(h, np.float64) @ d))


def test_output_error_well_below_rtn():
    w, calib = _layer(1, K, N)
    q, _ = gptq(w, _case_rule("int4-g32-short-last-act-order"), path="w", calibration=calib)
    rtn = quantize_array(w, "int4", group_size=32)
    ratio = _output_error(w, q, calib.hessian) / _output_error(w, rtn, calib.hessian)
    assert ratio < 0.1  # measured 0.014: these inputs are nearly low-rank


@pytest.mark.parametrize(
    "qtype, kw",
    [
        ("nf4", {"group_size": 32, "double_quant": True}),
        ("fp8_e4m3", {"per_tensor": True}),
        ("int4", {"group_size": 32, "algorithm_args": {"mse": {"grid": 4}}}),
    ],
)
def test_diagonal_hessian_is_rtn(qtype, kw):
    """With uncorrelated inputs no error is passed on: codes, scales and zero points are
    RTN's (quantize_array; rtn's clip search for mse), whatever the format."""
    w, _ = _layer(2, K, N)
    h = np.diag(np.random.default_rng(3).uniform(0.5, 2.0, K)).astype(np.float32)
    calib = Calibration(jnp.asarray(h), jnp.ones(K), jnp.ones(K), jnp.float32(1))
    q, _ = gptq(w, _rule(qtype, **kw), path="w", calibration=calib)
    args = {"clip_search": kw["algorithm_args"]["mse"]} if "algorithm_args" in kw else {}
    ref = algorithms.run(
        "rtn", w, _rule(qtype, **{**kw, "algorithm": "rtn", "algorithm_args": args}), path="w"
    )
    assert jax.tree.structure(q) == jax.tree.structure(ref)
    for got, want in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_traced_equals_eager():
    w, calib = _layer(4, K, N)
    rule = _case_rule("uint4-asymmetric", activation="int8")
    eager, _ = gptq(w, rule, path="w", calibration=calib)
    traced, info = jax.jit(lambda w, c: gptq(w, rule, path="w", calibration=c))(w, calib)
    np.testing.assert_array_equal(np.asarray(traced.codes()), np.asarray(eager.codes()))
    np.testing.assert_array_equal(np.asarray(traced.scale), np.asarray(eager.scale))
    assert traced.activation == "int8" and bool(info["factored"])
    check_info("w", info)  # the concrete info of the jit: no warning, no error


def test_indefinite_hessian_raises_damp_and_warns():
    w, calib = _layer(5, K, N)
    h = np.asarray(calib.hessian, np.float64)
    lam, vecs = np.linalg.eigh(h)
    v = vecs[:, -1]
    # Move the top eigenvalue to -0.5 · mean diag (of the new matrix): damping 0.01 and 0.1
    # cannot make that positive definite, 1 can.
    c = (lam[-1] + 0.5 * np.trace(h) / K) / (1 - 0.5 / K)
    hessian = jnp.asarray(h - c * np.outer(v, v), jnp.float32)
    bad = Calibration(hessian, calib.mean_abs, calib.max_abs, calib.count)
    rule = _case_rule("int4-g32-short-last-act-order")
    with pytest.warns(UserWarning, match=r"^w: GPTQ Hessian not positive definite at "
                                         r"damp=0.01; raised to 1$"):  # fmt: skip
        q = algorithms.run("gptq", w, rule, path="w", calibration=bad)
    d = np.asarray(q.dequantize())
    assert np.isfinite(d).all() and np.linalg.norm(d - w) < 0.2 * np.linalg.norm(w)


def test_nan_hessian_raises_naming_the_path():
    w, calib = _layer(7, K, N)
    nan = Calibration(
        jnp.full((K, K), jnp.nan, jnp.float32), calib.mean_abs, calib.max_abs, calib.count
    )
    path = "layers/0/mlp/down_proj/kernel"
    _, info = gptq(w, _case_rule("int4-g32-short-last-act-order"), path=path, calibration=nan)
    assert not bool(info["factored"]) and float(info["damp"]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match=rf"^{path}: GPTQ could not factor the Hessian even "
                                         r"at damp=10"):  # fmt: skip
        check_info(path, info)


@pytest.mark.parametrize("cols", [None, 4], ids=["one-sweep", "4-column-sweeps"])
def test_nan_weight_raises_naming_the_path(cols, monkeypatch):
    if cols:  # the NaN is in the second chunk, the first in row-major order of two
        _narrow_sweeps(monkeypatch, cols)
    w, calib = _layer(8, K, N)
    w[7, 1] = np.nan
    w[3, 5] = np.nan
    rule = _case_rule("int4-g32-short-last-act-order")
    with pytest.raises(ValueError, match=r"^w: weight holds 2 NaN/inf values \(first at "
                                         r"index \[3, 5\]\)"):  # fmt: skip
        algorithms.run("gptq", w, rule, path="w", calibration=calib)


def test_check_info_names_scale_dtype_problems():
    """float16 scales of tiny weights underflow (counted in the trace, raised on the host)."""
    info = {"damp": np.float32(0.01), "factored": np.bool_(True), "damp_requested": 0.01,
            "nonfinite": np.zeros(3), "scale_range_float16": np.array([0, 3])}  # fmt: skip
    with pytest.raises(ValueError, match=r"^w: 3 scale\(s\) underflow float16"):
        check_info("w", info)


def test_bad_input():
    w, calib = _layer(9, 64, 16)  # nothing here reaches the compiled core
    with pytest.raises(ValueError, match=r"w: gptq needs calibration data"):
        gptq(w, _rule(), path="w")
    with pytest.raises(ValueError, match="act_order: true needs static_groups: true"):
        _rule(algorithm_args={"static_groups": False})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['blocksize'\]"):
        _rule(algorithm_args={"blocksize": 64})
    with pytest.raises(ValueError, match=r"mse: grid=0 must be a positive integer"):
        _rule(algorithm_args={"mse": {"grid": 0}})
    with pytest.raises(ValueError, match=r"awq: unknown key"):
        _rule(algorithm_args={"awq": {"grids": 3}})
    _rule(algorithm_args={"awq": {"grid": 10, "clip": True}, "mse": True, "damp": 0.1})
    with pytest.raises(ValueError, match=r"damp=0 must be a number in \(0, 10\]"):
        _rule(algorithm_args={"damp": 0})
    rule3 = Rule(pattern="w", weight="int4", algorithm="gptq").resolve("w", 3)
    with pytest.raises(ValueError, match=r"w: gptq quantizes 2-D Dense kernels.*\(2, 64, 16\)"):
        gptq(np.stack([w, w]), rule3, path="w", calibration=calib)
    with pytest.raises(ValueError, match=r"w: gptq quantizes 2-D .*axis=-1"):
        gptq(w, _rule(axis=-1), path="w", calibration=calib)
    with pytest.raises(ValueError, match=r"w: calibration Hessian has shape \(32, 32\)"):
        gptq(w, _rule(), path="w", calibration=from_inputs(np.ones((4, 32), np.float32)))
    dynamic = {"act_order": False, "static_groups": False}
    rule = _rule("nf4", group_size=32, double_quant=True, algorithm_args=dynamic)
    with pytest.raises(ValueError, match=r"w: double_quant needs static_groups: true"):
        gptq(w, rule, path="w", calibration=calib)


# ---- refit: each group's scale and zero point by least squares -----------------------------


def _np_refit(w, h, values, group_size, asymmetric):
    """Per output column, the affine-per-group dequantisation ``a_g·v + b_g`` closest to
    the column in the ``H`` norm: weighted least squares through the Cholesky factor."""
    k, n = w.shape
    g = -(-k // group_size)
    chol = np.linalg.cholesky(np.asarray(h, np.float64))  # H = L Lᵀ, ‖e‖_H = ‖Lᵀ e‖
    scales, zeros = np.zeros((n, g)), np.zeros((n, g))
    for c in range(n):
        cols = []
        for gi in range(g):
            rows = slice(gi * group_size, min(k, (gi + 1) * group_size))
            a = np.zeros(k)
            a[rows] = values[rows, c]
            cols.append(a)
            if asymmetric:
                b = np.zeros(k)
                b[rows] = 1.0
                cols.append(b)
        design = np.stack(cols, axis=1)
        theta = np.linalg.lstsq(chol.T @ design, chol.T @ w[:, c], rcond=None)[0]
        theta = theta.reshape(g, 2 if asymmetric else 1)
        scales[c] = theta[:, 0]
        if asymmetric:
            zeros[c] = -theta[:, 1] / theta[:, 0]
    return scales, zeros


@pytest.mark.parametrize("qtype", ["uint4", "int4", "nf4"])
def test_refit_equals_numpy_least_squares(qtype):
    from jquant.algorithms.gptq import refit_scales

    w, calib = _layer(11, 96, 12)  # K = 96 with groups of 64: a short last group
    h = np.asarray(calib.hessian, np.float64) + 0.01 * np.eye(96)
    q, _ = gptq(w, _rule(qtype, group_size=64, scale_dtype="float32"), path="w",
                calibration=calib)  # fmt: skip
    values = np.asarray(qtypes.decode(qtypes.get(qtype), q.codes()), np.float64).T  # (K, N)
    scale, zero = refit_scales(
        jnp.asarray(w), jnp.asarray(h, jnp.float32), jnp.asarray(values, jnp.float32),
        q.scale, q.zero_point, 64,
    )  # fmt: skip
    want_scale, want_zero = _np_refit(w.astype(np.float64), h, values, 64, q.zero_point is not None)
    np.testing.assert_allclose(np.asarray(scale), want_scale, rtol=2e-3)
    if q.zero_point is not None:
        np.testing.assert_allclose(np.asarray(zero), want_zero, rtol=2e-3, atol=2e-3)
    assert not np.allclose(np.asarray(scale), np.asarray(q.scale), rtol=1e-3)  # it moved


@pytest.mark.parametrize("qtype", ["uint4", "int4", "nf4", "uint3"])
def test_refit_lowers_the_output_error_keeping_the_codes(qtype):
    w, calib = _layer(12, 192, 32)
    plain, _ = gptq(w, _rule(qtype, group_size=64), path="w", calibration=calib)
    refit, _ = gptq(w, _rule(qtype, group_size=64, algorithm_args={"refit": True}), path="w",
                    calibration=calib)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(refit.codes()), np.asarray(plain.codes()))
    assert refit.scale.dtype == plain.scale.dtype  # stored as the rule says (bf16)
    before, after = (_output_error(w, q, calib.hessian) for q in (plain, refit))
    assert after < 0.99 * before


def test_refit_refuses_quantized_scales():
    w, calib = _layer(13, 64, 8)
    rule = _rule("nf4", group_size=32, double_quant=True, algorithm_args={"refit": True})
    with pytest.raises(ValueError, match=r"w: refit .* double_quant"):
        gptq(w, rule, path="w", calibration=calib)
    with pytest.raises(ValueError, match=r"refit must be true or false"):
        _rule(algorithm_args={"refit": 1})


def test_host_factor_is_the_inverse_cholesky_in_one_buffer(monkeypatch):
    """The host factorization: ``UᵀU = (Pᵀ (H + λI) P)⁻¹`` with U upper (NumPy's float64
    inverse as the reference), holding one K × K float32 buffer besides H (NumPy's
    allocations are traced by tracemalloc: a second full copy would show)."""
    import tracemalloc

    from jquant.algorithms import _gptq_host

    k = 384
    _, calib = _layer(11, k, 8, dead=(3,))
    h = np.asarray(calib.hessian)
    perm = _gptq_host.order(_gptq_host.fixed_diagonal(h), act_order=True)
    _gptq_host.factor(h[:8, :8].copy(), np.arange(8), 0.01)  # imports LAPACK first
    monkeypatch.setattr(_gptq_host, "_CHUNK", 4096)  # chunks well below k·k
    tracemalloc.start()
    u, used, factored = _gptq_host.factor(h, perm, 0.01)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert factored and used == np.float32(0.01)
    assert peak < 1.1 * k * k * 4, peak  # u itself is k·k·4 bytes
    h64 = h.astype(np.float64)
    h64[3, 3] = 1.0  # a dead input gets H_kk = 1
    h64 += 0.01 * np.mean(np.diagonal(h64)) * np.eye(k)
    want = np.linalg.inv(h64[np.ix_(perm, perm)])
    assert np.all(np.tril(u, -1) == 0)
    np.testing.assert_allclose(u.T.astype(np.float64) @ u, want, rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())  # fmt: skip
