"""jquant.ops against plain-jnp references on the dequantized weights."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant import _act, _dequant_dot, ops, qtypes
from jquant.qarray import quantize_array

FORMATS = [("int8", None), ("int4", 32), ("uint4", 32), ("nf4", 32), ("fp8_e4m3", None)]


def _rand(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("qtype,group", FORMATS)
def test_qdot_matches_dequantized_reference(qtype, group):
    w = quantize_array(_rand((96, 5, 3)), qtype, axis=0, group_size=group)
    x = _rand((2, 4, 96), seed=1)
    y = ops.qdot(x, w)
    assert y.shape == (2, 4, 5, 3) and y.dtype == jnp.float32
    _close(y, jnp.einsum("stk,kab->stab", x, w.dequantize()))


def test_qdot_plain_array_and_bf16_activations():
    w = _rand((64, 8))
    x = _rand((3, 64), seed=1)
    _close(ops.qdot(x, w), x @ w)
    q = quantize_array(w, "int4", group_size=32)
    y = ops.qdot(x.astype(jnp.bfloat16), q)
    assert y.dtype == jnp.bfloat16
    _close(y, x @ q.dequantize(), rtol=2e-2)
    y32 = ops.qdot(x.astype(jnp.bfloat16), q, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32


@pytest.mark.parametrize(
    "spec,x_shape,w_shape,axis",
    [
        ("btd,dhk->bthk", (2, 3, 64), (64, 2, 3), 0),
        ("bthd,hdf->btf", (2, 3, 2, 32), (2, 32, 6), 1),  # two contracted indices
        ("bhd,hdk->bhk", (3, 2, 64), (2, 64, 3), 1),  # h is a batch index
        ("...d,df->...f", (2, 3, 64), (64, 6), 0),
        ("btd,fd->bft", (2, 3, 64), (6, 64), 1),  # weight stored (out, in), output transposed
        ("btd,df->f", (2, 3, 64), (64, 6), 0),  # b, t summed on x only
    ],
)
def test_qeinsum_matches_einsum_on_dequantized(spec, x_shape, w_shape, axis):
    x = _rand(x_shape, seed=2)
    w = quantize_array(_rand(w_shape), "int4", axis=axis, group_size=32)
    _close(ops.qeinsum(spec, x, w), jnp.einsum(spec, x, w.dequantize()))


def test_qdot_general_with_batch_dims():
    w = quantize_array(_rand((4, 32, 6)), "int8", axis=1)
    x = _rand((4, 5, 32), seed=3)
    dims = (((2,), (1,)), ((0,), (0,)))
    ref = jax.lax.dot_general(x, w.dequantize(), dims)
    _close(ops.qdot_general(x, w, dims), ref)


def test_qembed_and_qattend():
    table = _rand((10, 64))
    q = quantize_array(table, "int4", axis=-1, group_size=32)
    ids = jnp.array([[0, 9, 3]])
    np.testing.assert_array_equal(ops.qembed(ids, q), q.dequantize()[ids])
    x = _rand((2, 64), seed=4)
    _close(ops.qattend(x, q), x @ q.dequantize().T)
    _close(ops.qattend(x, table), x @ table.T)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.qdot(_rand((2, 64)), quantize_array(_rand((64, 8)), "int8", axis=1)),
         r"qdot.*\(64, 8\).*axis"),
        (lambda: ops.qdot(_rand((2, 32)), quantize_array(_rand((64, 8)), "int8")),
         r"qdot.*\(2, 32\).*\(64, 8\)"),
        (lambda: ops.qattend(_rand((2, 64)), quantize_array(_rand((10, 64)), "int8", axis=0)),
         r"qattend.*\(10, 64\).*axis"),
        (lambda: ops.qembed(jnp.array([0]), quantize_array(_rand((10, 64)), "int8", axis=0)),
         r"qembed.*\(10, 64\).*axis"),
        (lambda: ops.qeinsum("td,df->tf", _rand((2, 64)),
                             quantize_array(_rand((64, 8)), "int8", axis=1)),
         r"qeinsum.*\(64, 8\).*axis"),
        (lambda: ops.qeinsum("td,df", _rand((2, 64)), quantize_array(_rand((64, 8)), "int8")),
         "explicit"),
    ],
)  # fmt: skip
def test_wrong_weight_is_one_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- activation quantization -----------------------------------------------------------


def _has_int32_dot(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return "preferred_element_type=int32" in str(jaxpr)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_int8_activations_run_integer_matmul_exactly(per_tensor):
    w = quantize_array(_rand((128, 16)), "int8", activation="int8", per_tensor=per_tensor)
    x = _rand((3, 7, 128), seed=5) * 3
    y = ops.qdot(x, w)
    assert _has_int32_dot(ops.qdot, x, w)
    xq, xs = _act.quantize_rows(x, "int8")
    ref = (xq.astype(jnp.float32) * xs) @ w.dequantize(jnp.float32)
    _close(y, ref, rtol=1e-6)
    # ... which is not the unquantized-activation result.
    assert not np.allclose(y, x @ w.dequantize(), rtol=1e-6)


@pytest.mark.parametrize(
    "qtype,group,act",
    [("int8", 32, "int8"), ("int4", 32, "int8"), ("int8", None, "fp8_e4m3"),
     ("fp8_e4m3", None, "fp8_e5m2")],
)  # fmt: skip
def test_fake_quant_activation_paths(qtype, group, act):
    w = quantize_array(_rand((64, 8)), qtype, group_size=group, activation=act)
    x = _rand((4, 64), seed=6)
    assert not _has_int32_dot(ops.qdot, x, w)
    codes, scale = _act.quantize_rows(x, act)
    ref = (qtypes.decode(act, codes) * scale) @ w.dequantize()
    _close(ops.qdot(x, w), ref)


@pytest.mark.parametrize("act", ["int8", "fp8_e4m3"])
def test_activation_quantization_has_straight_through_gradient(act):
    w = quantize_array(_rand((64, 8)), "int8", activation=act)
    x = _rand((4, 64), seed=7)
    g = jax.grad(lambda x: jnp.sum(ops.qdot(x, w) ** 2))(x)
    y = ops.qdot(x, w)
    _close(g, (2 * y) @ w.dequantize().T)


def test_quantize_rows_rejects_packed_formats():
    with pytest.raises(ValueError, match="int4"):
        _act.quantize_rows(jnp.ones((2, 4)), "int4")


# ---- the dispatch switch ------------------------------------------------------------------


def test_matmul_path_switch(monkeypatch):
    w = quantize_array(_rand((64, 8)), "int8")
    x = _rand((2, 64))
    old = ops.set_matmul_path("kernel")
    try:
        with pytest.raises(ValueError, match="no fused kernel"):
            ops.qdot(x, quantize_array(_rand((64, 8)), "int8", activation="fp8_e4m3"))
        ops.set_matmul_path("xla")
        _close(ops.qdot(x, w), x @ w.dequantize())
        ops.set_matmul_path(None)
        monkeypatch.setenv("JQUANT_MATMUL", "kernel")
        assert ops.matmul_path() == "kernel"
        monkeypatch.setenv("JQUANT_MATMUL", "fast")
        with pytest.raises(ValueError, match="JQUANT_MATMUL"):
            ops.matmul_path()
        with pytest.raises(ValueError, match="unknown path"):
            ops.set_matmul_path("gpu")
    finally:
        ops.set_matmul_path(old)


@pytest.mark.parametrize(
    "qtype,kw",
    [("int4", dict(group_size=32)), ("uint4", dict(group_size=32)),
     ("int8", dict(per_tensor=True)), ("nf4", dict(group_size=32, double_quant=True)),
     ("int8", dict(activation="fp8_e4m3"))],
)  # fmt: skip
def test_cpu_row_blocked_path_with_a_short_tail(qtype, kw):
    # N = 601 (no block size near 256 divides it) = 2 blocks of 256 + a tail of 89: the
    # blocked CPU path and its tail.
    assert _dequant_dot._block_rows(601) == 256
    w = quantize_array(_rand((64, 601)), qtype, **kw)
    x = _rand((3, 64), seed=8)
    assert "scan" in str(jax.make_jaxpr(ops.qdot)(x, w))
    if w.activation is not None:
        x_ref = _act.fake_quant(x, w.activation)
    else:
        x_ref = x
    _close(jax.jit(ops.qdot)(x, w), x_ref @ w.dequantize())
    g = jax.grad(lambda x: jnp.sum(ops.qdot(x, w)))(x)
    _close(g, jnp.broadcast_to(jnp.sum(w.dequantize(), axis=1), x.shape))


@pytest.mark.parametrize(
    "qtype,kw",
    [("int4", dict(group_size=128)), ("uint4", dict(group_size=64)), ("int8", {}),
     ("nf4", dict(group_size=64)), ("fp8_e4m3", {})],
)
def test_forced_kernel_path_runs_the_pallas_kernel_on_cpu(qtype, kw):
    # K = 576 leaves a short last group at g128: the kernel covers whole blocks, XLA the rest.
    w = quantize_array(_rand((576, 128)), qtype, **kw)
    x = _rand((3, 576))
    old = ops.set_matmul_path("kernel")
    try:
        jaxpr = str(jax.make_jaxpr(ops.qdot)(x, w))
        y = ops.qdot(x, w)
    finally:
        ops.set_matmul_path(old)
    assert "pallas_call" in jaxpr
    _close(y, ops.qdot(x, w))


def test_fp8_activations_run_the_gpu_w8a8_kernel_when_forced_on_cpu():
    # fp8_e4m3 x fp8_e4m3 per channel: the GPU kernel (interpreted) under "kernel", fake
    # quantization under "auto" on CPU; same numbers up to f32 summation order.
    w = quantize_array(_rand((96, 40)), "fp8_e4m3", activation="fp8_e4m3")
    x = _rand((3, 96), seed=9)
    auto = ops.qdot(x, w)
    # fresh lambdas: make_jaxpr caches traces per function, and the path is read at trace
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: ops.qdot(x, w))(x))
    old = ops.set_matmul_path("kernel")
    try:
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.qdot(x, w))(x))
        y = ops.qdot(x, w)
        g = jax.grad(lambda x: jnp.sum(ops.qdot(x, w) ** 2))(x)
    finally:
        ops.set_matmul_path(old)
    codes, scale = _act.quantize_rows(x, "fp8_e4m3")
    _close(y, (qtypes.decode("fp8_e4m3", codes) * scale) @ w.dequantize())
    _close(y, auto)
    _close(g, (2 * y) @ w.dequantize().T)  # straight-through for x


@pytest.mark.parametrize("qtype", ["int4", "uint4", "nf4"])
@pytest.mark.parametrize(
    "k,n,group",
    [(576, 40, 128),  # 4 groups of 128 + a short last group of 64
     (77, 24, None),  # per-channel, odd K: the high plane ends in a padding code
     (576, 601, 128)],  # N = 601: CPU row blocks (2 x 256 + a tail of 89)
)  # fmt: skip
def test_4bit_nibble_planes_match_dequantize_then_dot(qtype, k, n, group):
    w = quantize_array(_rand((k, n)), qtype, group_size=group)
    x = _rand((3, k), seed=2)
    y = jax.jit(ops.qdot)(x, w)
    assert ("scan" in str(jax.make_jaxpr(ops.qdot)(x, w))) == (n > 512)
    # no unpacking to element order: the nibble planes are contracted separately
    assert "concatenate" not in str(jax.make_jaxpr(_dequant_dot._dequant_dot)(x, w))
    _close(y, x @ w.dequantize())
    # the planes path itself, unblocked, against the element-order dequantize
    _close(_dequant_dot._dequant_dot(x, w), x @ w.dequantize_stored().T)
    g = jax.grad(lambda x: jnp.sum(ops.qdot(x, w)))(x)
    _close(g, jnp.broadcast_to(jnp.sum(w.dequantize(), axis=1), x.shape))


# ---- hardening: non-finite activations, integer activations, stacked 4-bit weights -------


def _np_dequantized(w):
    return np.asarray(w.dequantize(jnp.float32), np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "qtype,act,group,path",
    [("int8", "int8", None, "xla"), ("int8", "int8", None, "kernel"),
     ("int4", "int8", 128, "xla"),  # fake-quantized activations: XLA only, no kernel
     ("int8", None, None, "xla"), ("int8", None, None, "kernel"),
     ("fp8_e4m3", "fp8_e4m3", None, "xla"), ("fp8_e4m3", "fp8_e4m3", None, "kernel")],
)  # fmt: skip
def test_non_finite_activations_give_non_finite_rows(path, bad, qtype, act, group):
    # A diverging run must show: a row of x holding NaN or inf gives a non-finite output
    # row (as NumPy's x @ w does), whatever the path; the other rows stay finite.
    # K = 1000: XLA:CPU's max reduction skips a NaN at some positions of such rows.
    w = quantize_array(_rand((1000, 256)), qtype, group_size=group, activation=act)
    x = np.array(_rand((7, 1000), seed=10))
    x[2, 3], x[5, 10] = bad, bad
    old = ops.set_matmul_path(path)
    try:
        y = np.asarray(ops.qdot(jnp.asarray(x), w))
    finally:
        ops.set_matmul_path(old)
    with np.errstate(invalid="ignore"):
        ref = x.astype(np.float64) @ _np_dequantized(w)
    np.testing.assert_array_equal(np.isfinite(y).all(axis=1), np.isfinite(ref).all(axis=1))
    assert not np.isfinite(y[[2, 5]]).any()


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_quantize_rows_keeps_nan_rows_nan(fmt):
    x = np.array(_rand((3, 16)))
    x[1, 4] = np.nan
    codes, scale = _act.quantize_rows(jnp.asarray(x), fmt)
    assert np.isnan(np.asarray(scale)[1, 0]) and np.isfinite(np.asarray(scale)[[0, 2]]).all()
    target = {"int8": 127.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt]
    np.testing.assert_allclose(np.asarray(scale)[0, 0], np.abs(x[0]).max() / target, rtol=1e-6)


# Both rows have absmax 7: 7 * 127 / 7 and 448 / 7 = 64 leave no rounding ties.
_INT_X = np.array([[3, -1, 2, 0, 7, -5, 1, 4] * 8, [1, 2, 3, 4, -7, -3, -2, -1] * 8])


@pytest.mark.parametrize("x_dtype", [jnp.int32, jnp.int8])
@pytest.mark.parametrize(
    "qtype,kw",
    [("int4", dict(group_size=32)), ("int8", dict(activation="int8")),
     ("fp8_e4m3", dict(activation="fp8_e4m3")), ("nf4", dict(group_size=32))],
)  # fmt: skip
def test_integer_activations_promote_like_jax(x_dtype, qtype, kw):
    # x @ w for integer x and a float32 weight is float32 in JAX (standard promotion); a
    # QArray of a float32 weight behaves the same, with the weight's values.
    w_float = _rand((64, 4))
    w = quantize_array(w_float, qtype, **kw)
    x = jnp.asarray(_INT_X, x_dtype)
    x_ref = np.asarray(_INT_X, np.float64)
    if w.activation is not None:  # per-row absmax quantization of x, written in NumPy
        target = {"int8": 127.0, "fp8_e4m3": 448.0}[w.activation]
        row_scale = np.abs(x_ref).max(axis=1, keepdims=True) / target
        v = x_ref / row_scale
        v = np.round(v) if w.activation == "int8" else v.astype(ml_dtypes.float8_e4m3fn)
        x_ref = np.asarray(v, np.float64) * row_scale
    ref = x_ref @ _np_dequantized(w)
    with jax.numpy_dtype_promotion("standard"):
        assert (x @ w_float).dtype == jnp.float32
        outs = {
            "qdot": ops.qdot(x, w),
            "qdot_general": ops.qdot_general(x, w, (((1,), (0,)), ((), ()))),
            "qeinsum": ops.qeinsum("mk,kn->mn", x, w),
        }
        for name, y in outs.items():
            assert y.dtype == jnp.float32, name
            _close(y, ref, rtol=1e-5)
        y = ops.qdot(x, w_float)
        assert y.dtype == jnp.float32
        _close(y, np.asarray(_INT_X, np.float64) @ np.asarray(w_float, np.float64))
    with pytest.raises(jax.dtypes.TypePromotionError, match="promotion"):
        ops.qdot(x, w)  # strict promotion (this suite's setting) refuses, as x @ w does


def test_integer_activations_in_qattend():
    table = _rand((10, 64))
    q = quantize_array(table, "int4", axis=-1, group_size=32)
    x = jnp.asarray(_INT_X, jnp.int32)
    with jax.numpy_dtype_promotion("standard"):
        for t, deq in ((q, _np_dequantized(q)), (table, np.asarray(table, np.float64))):
            y = ops.qattend(x, t)
            assert y.dtype == jnp.float32
            _close(y, np.asarray(_INT_X, np.float64) @ deq.T)


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float32])
def test_stacked_uint4_weight_runs_the_kernel(scale_dtype):
    # A 3-D weight (DenseGeneral / stacked layers) flattens to (N, Kbytes) for the kernel;
    # its zero points and scales must keep one dtype, as the kernel's contract demands.
    w = quantize_array(_rand((256, 4, 40)), "uint4", group_size=64, scale_dtype=scale_dtype)
    x = _rand((3, 256), seed=11)
    old = ops.set_matmul_path("kernel")
    try:
        assert "pallas_call" in str(jax.make_jaxpr(lambda x: ops.qdot(x, w))(x))
        y = ops.qdot(x, w)
    finally:
        ops.set_matmul_path(old)
    ref = np.asarray(x, np.float64) @ _np_dequantized(w).reshape(256, -1)
    _close(y, ref.reshape(3, 4, 40), rtol=1e-5)
