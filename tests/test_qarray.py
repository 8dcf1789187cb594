"""QArray storage, packing and per-format error bounds."""

import dataclasses

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant import qtypes
from jquant.qarray import QArray, from_codes, pack, packed_length, quantize_array, unpack

PACKED = [name for name, q in qtypes.QTYPES.items() if q.packed]
# Formats with a free group size and scale dtype; the block-scaled ones (mxfp4, nvfp4) fix
# both and have their own tests (tests/test_fp4.py).
ALL = [name for name, q in qtypes.QTYPES.items() if q.block_size is None]


def _random_codes(rng, qt, shape):
    lo, hi = (int(qt.qmin), int(qt.qmax)) if qt.kind not in ("codebook", "fp4") else (0, 15)
    return rng.integers(lo, hi + 1, size=shape).astype(qt.code_dtype)


@st.composite
def _pack_case(draw):
    qt = qtypes.get(draw(st.sampled_from(PACKED)))
    k = draw(st.integers(1, 300))
    group = draw(st.sampled_from([None, 1, 2, 3, 4, 8]))
    group = None if group is None else group * qt.pack_width
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    return qt, k, group, tuple(lead), seed


@settings(max_examples=40, deadline=None)
@given(_pack_case())
def test_pack_unpack_is_exact(case):
    qt, k, group, lead, seed = case
    codes = _random_codes(np.random.default_rng(seed), qt, (*lead, k))
    # Jitted whole: one compilation per example instead of one per eager op.
    packed = jax.jit(pack, static_argnums=(1, 2))(jnp.asarray(codes), qt.name, group)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (*lead, packed_length(k, qt, group))
    unpacked = jax.jit(unpack, static_argnums=(1, 2, 3))(packed, qt.name, k, group)
    np.testing.assert_array_equal(np.asarray(unpacked), codes)


def test_packed_length_is_exact_bits_when_groups_align():
    for name in PACKED:
        qt = qtypes.get(name)
        assert packed_length(576, qt, 64) * 8 == 576 * qt.bits
    # An odd short last group is padded to the pack width: 576 = 4*128 + 64, 577 adds one.
    assert packed_length(577, "int4", 128) == 289
    assert packed_length(5, "int4", None) == 3


def test_int4_nibble_order_is_per_group_halves():
    # Group of 8 codes 0..7 (as int4) → byte j holds code j (low) and j + 4 (high).
    codes = jnp.arange(16, dtype=jnp.int8).reshape(1, 16) - 8
    packed = np.asarray(pack(codes, "int4", 8))
    c = np.asarray(codes[0]) & 0xF
    expected = [c[j] | (c[j + 4] << 4) for j in range(4)] + [c[8 + j] | (c[12 + j] << 4)
                                                             for j in range(4)]
    np.testing.assert_array_equal(packed[0], np.array(expected, np.uint8))


def test_six_bit_is_a_four_bit_then_a_two_bit_plane():
    # One group of 8 uint6 codes: low nibbles as int4 packs them (code j low, j + 4 high),
    # then the high two bits as 2-bit slices (byte j holds codes j, j + 2, j + 4, j + 6).
    c = np.array([0, 63, 17, 42, 5, 48, 33, 12], np.uint8)
    lo, hi = c & 0xF, c >> 4
    nib = [lo[j] | (lo[j + 4] << 4) for j in range(4)]
    two = [hi[j] | (hi[j + 2] << 2) | (hi[j + 4] << 4) | (hi[j + 6] << 6) for j in range(2)]
    packed = np.asarray(pack(jnp.asarray(c[None]), "uint6", 8))
    np.testing.assert_array_equal(packed[0], np.array(nib + two, np.uint8))
    assert packed_length(8, "uint5", 8) == 5 and packed_length(8, "int6", 8) == 6


def _weight(seed=0, shape=(576, 96)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _bound(q: QArray, w: np.ndarray) -> np.ndarray:
    """Each format's elementwise error bound, in the logical layout."""
    qt = q.format
    s = np.asarray(q.scales(), np.float64)  # (N, G)
    g = q.group_size or q.k
    s = np.repeat(s, g, axis=-1)[..., : q.k].T  # (K, N)
    if qt.kind == "uint":
        # The range includes zero and the zero point is an integer: still half a step.
        return s * 0.5 * (1 + 1e-5)
    return s * qtypes.half_step(qt, w / s) * (1 + 1e-6) + 1e-12


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group_size", [None, 64, 128])
@pytest.mark.parametrize("name", ALL)
def test_quantize_error_obeys_format_bound(name, group_size, scale_dtype):
    qt = qtypes.get(name)
    group_size = None if group_size is None else max(group_size, qt.pack_width)
    w = _weight()
    q = quantize_array(w, name, group_size=group_size, scale_dtype=scale_dtype)
    assert q.shape == w.shape and q.qvalue.shape[0] == w.shape[1]
    err = np.abs(np.asarray(q.dequantize(), np.float64) - w)
    bound = _bound(q, w)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (name, worst, err[worst], bound[worst])


@given(
    w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40),
                 elements=st.floats(-1e3, 1e3, width=32)),
    name=st.sampled_from(["int8", "int6", "int5", "int4", "uint6", "uint5", "uint4", "fp8_e4m3",
                          "nf4"]),
)
@settings(max_examples=25, deadline=None)
def test_quantize_bound_property(w, name):
    q = quantize_array(w, name, group_size=None, scale_dtype=jnp.float32)
    err = np.abs(np.asarray(q.dequantize(), np.float64) - w)
    assert (err <= _bound(q, w) + 1e-30).all()


# Relative Frobenius error ||w - ŵ|| / ||w|| of a standard-normal (576, 96) weight
# (seed 0), f32 scales. Pinned so that a change in rounding or packing shows up here.
PINNED_REL_ERROR = {
    ("int8", None): 0.00757, ("int4", None): 0.13790, ("int4", 64): 0.10849,
    ("int4", 128): 0.11758, ("uint4", 64): 0.09173, ("nf4", 64): 0.09197,
    ("fp8_e4m3", None): 0.02639, ("fp8_e5m2", None): 0.05263, ("int3", 64): 0.25259,
    ("int2", 64): 0.72172, ("uint8", None): 0.00706, ("int6", 64): 0.02446,
    ("uint6", 64): 0.02179, ("int5", 64): 0.05059, ("uint5", 64): 0.04433,
}  # fmt: skip


@pytest.mark.parametrize("name,group_size", list(PINNED_REL_ERROR))
def test_pinned_relative_error(name, group_size):
    w = _weight()
    q = quantize_array(w, name, group_size=group_size, scale_dtype=jnp.float32)
    rel = np.linalg.norm(np.asarray(q.dequantize()) - w) / np.linalg.norm(w)
    assert rel == pytest.approx(PINNED_REL_ERROR[(name, group_size)], abs=5e-5)


def test_nbytes_int4_g128_bf16_4096():
    w = jnp.zeros((4096, 4096), jnp.float32).at[0, 0].set(1.0)
    q = quantize_array(w, "int4", group_size=128, scale_dtype=jnp.bfloat16)
    assert q.nbytes == 4096 * 4096 // 2 + 4096 * 32 * 2
    assert q.bits_per_weight == pytest.approx(4.125)


def test_short_last_group_has_its_own_scale():
    w = _weight(1, (576, 8))
    q = quantize_array(w, "int4", group_size=128, scale_dtype=jnp.float32)
    assert q.scale.shape == (8, 5)
    np.testing.assert_allclose(
        np.asarray(q.scale[:, 4]), np.abs(w[512:]).max(axis=0) / 7, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(q.scale[:, 0]), np.abs(w[:128]).max(axis=0) / 7, rtol=1e-6)


def test_uint4_grid_spans_min_and_max_and_holds_zero_exactly():
    w = _weight(2, (64, 4))
    w[5] = 0.0
    q = quantize_array(w, "uint4", scale_dtype=jnp.float32)
    zp = np.asarray(q.zero_point)
    np.testing.assert_array_equal(zp, np.round(zp))  # integer zero points
    assert ((zp >= 0) & (zp <= 15)).all()
    d = np.asarray(q.dequantize())
    assert (d[5] == 0.0).all()
    s = np.asarray(q.scale)[:, 0]
    assert (np.abs(d.min(axis=0) - w.min(axis=0)) <= s / 2 + 1e-6).all()
    assert (np.abs(d.max(axis=0) - w.max(axis=0)) <= s / 2 + 1e-6).all()
    # An all-positive group: the grid starts at zero (zero point 0) and still reaches max.
    p = quantize_array(np.abs(w) + 3.0, "uint4", scale_dtype=jnp.float32)
    assert (np.asarray(p.zero_point) == 0).all()
    err = np.abs(np.asarray(p.dequantize()) - (np.abs(w) + 3.0))
    assert (err <= np.asarray(p.scale)[:, 0] / 2 + 1e-6).all()


def test_per_tensor_has_one_scale():
    w = _weight()
    q = quantize_array(w, "int8", per_tensor=True, scale_dtype=jnp.float32)
    assert q.scale.shape == (1, 1)
    assert float(q.scale[0, 0]) == pytest.approx(np.abs(w).max() / 127, rel=1e-6)


def test_double_quant_shrinks_scales_and_keeps_error():
    w = _weight(3, (512, 512))
    plain = quantize_array(w, "nf4", group_size=64)
    dq = quantize_array(w, "nf4", group_size=64, double_quant=True)
    assert isinstance(dq.scale, QArray) and dq.scale.qtype == "log8"
    assert dq.nbytes < plain.nbytes
    e_plain = np.linalg.norm(np.asarray(plain.dequantize()) - w)
    e_dq = np.linalg.norm(np.asarray(dq.dequantize()) - w)
    assert e_dq < 1.01 * e_plain


def test_all_zero_weight_dequantizes_to_zero():
    for name in ALL:
        q = quantize_array(np.zeros((64, 3), np.float32), name, group_size=None)
        assert not np.asarray(q.dequantize()).any(), name


def test_higher_rank_and_other_axis():
    w = _weight(4, (4, 64, 6))
    q = quantize_array(w, "int4", axis=1, group_size=32, scale_dtype=jnp.float32)
    assert q.shape == (4, 64, 6) and q.axis == -2 and q.qvalue.shape == (4, 6, 32)
    emb = quantize_array(w[0].T, "int8", axis=-1)
    assert emb.qvalue.shape == (6, 64) and emb.shape == (6, 64)


def test_from_codes_roundtrip():
    w = _weight(5, (128, 16))
    q = quantize_array(w, "uint4", group_size=32)
    q2 = from_codes(q.codes(), q.scale, q.zero_point, qtype="uint4", group_size=32)
    np.testing.assert_array_equal(np.asarray(q2.qvalue), np.asarray(q.qvalue))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(qtype="int4", group_size=3), "group_size=3 is invalid for int4"),
        (dict(qtype="int4", group_size=0), "group_size=0"),
        (dict(qtype="int3", group_size=12), "multiple of 8"),
        (dict(qtype="int8", per_tensor=True, group_size=64), "per_tensor"),
        (dict(qtype="int7"), "unknown qtype 'int7'"),
        (dict(qtype="int8", axis=2), "axis=2 is out of range"),
        (dict(qtype="int8", activation="int4"), "activation format .int4. is not supported"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    qtype = kwargs.pop("qtype")
    with pytest.raises(ValueError, match=match):
        quantize_array(_weight(), qtype, name="layers/0/mlp/kernel", **kwargs)


def test_bad_weights_name_the_parameter():
    with pytest.raises(ValueError, match="layers/1/kernel: only float weights.*int32"):
        quantize_array(np.ones((8, 8), np.int32), "int8", name="layers/1/kernel")
    w = _weight()
    w[3, 5] = np.nan
    with pytest.raises(ValueError, match=r"layers/2/kernel: weight holds 1 NaN/inf.*\[3, 5\]"):
        quantize_array(w, "int8", name="layers/2/kernel")


def test_abstract_weights_get_a_pointer_to_eval_shape():
    with pytest.raises(ValueError, match="layers/3/kernel: is abstract.*eval_shape"):
        quantize_array(jax.ShapeDtypeStruct((64, 8), jnp.float32), "int4", name="layers/3/kernel")


def test_unpack_rejects_wrong_storage_length():
    with pytest.raises(ValueError, match="needs 288"):
        unpack(jnp.zeros((4, 300), jnp.uint8), "int4", 576, 128)


def test_qarray_is_not_silently_an_array():
    q = quantize_array(_weight(), "int8")
    with pytest.raises(TypeError, match="not an array"):
        jnp.asarray(q)


# ---- hardening: clipping, bad inputs, scale ranges -----------------------------------


def _uint_reference(w, bits, ratio):
    """NumPy asymmetric RTN per column (per-channel along axis 0), range shrunk toward 0."""
    qmax = 2**bits - 1
    lo = np.minimum(w.min(axis=0), 0.0) * ratio
    hi = np.maximum(w.max(axis=0), 0.0) * ratio
    s = (hi - lo) / qmax
    z = np.clip(np.round(-lo / s), 0, qmax)
    codes = np.clip(np.round(w / s + z), 0, qmax)
    return (codes - z) * s


def test_uint_clipping_shrinks_toward_zero_and_keeps_zero_in_range():
    # A group over [-0.1, 1] at ratio 0.8: the range becomes [-0.08, 0.8], not [0.01, 0.89]
    # (which would drop zero and clip the zero point to 0).
    w = np.linspace(-0.1, 1.0, 64, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    w[7] = 0.0
    q = quantize_array(w, "uint4", clip_ratio=0.8, scale_dtype=jnp.float32)
    d = np.asarray(q.dequantize(), np.float64)
    np.testing.assert_allclose(d, _uint_reference(w.astype(np.float64), 4, 0.8), atol=1e-6)
    assert (d[7] == 0.0).all() and d.min() < 0.0
    assert (np.asarray(q.zero_point) == 1).all()


def test_activation_format_is_checked_when_the_qarray_is_made():
    with pytest.raises(ValueError, match="layers/0/kernel: activation format 'uint8'"):
        quantize_array(_weight(), "int8", activation="uint8", name="layers/0/kernel")


def test_zero_size_weight_names_the_parameter():
    with pytest.raises(ValueError, match=r"layers/4/kernel: .*empty.*\(128, 0\)"):
        quantize_array(np.ones((128, 0), np.float32), "int4", group_size=32,
                       name="layers/4/kernel")


@pytest.mark.parametrize("factor,match", [(2e5, "overflow"), (1e-9, "underflow")])
def test_float16_scales_out_of_range_name_the_tensor(factor, match):
    w = _weight(6, (128, 8)) * np.float32(factor)
    with pytest.raises(ValueError, match=rf"layers/5/kernel: .*{match}.*float16.*bfloat16"):
        quantize_array(w, "int4", group_size=64, scale_dtype=jnp.float16, name="layers/5/kernel")


def test_float16_subnormal_scales_that_keep_their_precision_are_accepted():
    # Scales ~4e-5 are float16 subnormals, but rounded up by < 2^-7: no error, bound holds.
    w = _weight(6, (128, 8)) * np.float32(1e-4)
    q = quantize_array(w, "int4", group_size=64, scale_dtype=jnp.float16)
    assert np.abs(np.asarray(q.dequantize(), np.float64)).max() > 0
    assert (np.abs(np.asarray(q.dequantize(), np.float64) - w) <= _bound(q, w)).all()


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_uint_range_at_extreme_finite_values_does_not_overflow(scale_dtype):
    w = np.array([[-3e38, 3e38], [3e38, -1e38], [0.0, 2e38], [1e38, -3e38]], np.float32)
    if scale_dtype == jnp.float16:  # 3e38 / 15 is far beyond float16: a clear error instead
        with pytest.raises(ValueError, match="w: .*overflow.*float16"):
            quantize_array(w, "uint4", scale_dtype=scale_dtype, name="w")
        return
    q = quantize_array(w, "uint4", scale_dtype=scale_dtype)
    d = np.asarray(q.dequantize(), np.float64)
    assert np.isfinite(d).all()
    s = np.asarray(q.scales(), np.float64)[:, 0]
    assert (np.abs(d - w.astype(np.float64)) <= s * 0.5 * (1 + 1e-2)).all()


def test_quantize_checks_the_weight_on_device(monkeypatch):
    # The NaN/inf check is a reduction on device: no host-side pass over the weight (a
    # sharded weight that is not fully addressable could not be copied at all).
    host_isfinite = np.isfinite

    def guarded(x, *args, **kwargs):
        assert np.size(x) <= 16, f"host-side isfinite over a {np.shape(x)} array"
        return host_isfinite(x, *args, **kwargs)

    monkeypatch.setattr(np, "isfinite", guarded)
    w = jnp.asarray(_weight(7, (128, 16)))
    q = quantize_array(w, "int4", group_size=64)
    assert q.shape == (128, 16)
    with pytest.raises(ValueError, match=r"layers/6/kernel: weight holds 1 NaN/inf.*\[9, 2\]"):
        quantize_array(w.at[9, 2].set(jnp.inf), "int4", group_size=64, name="layers/6/kernel")


# ---- construction checks the parts' shapes ---------------------------------------------


def _int4_g128():
    w = _weight(7, (256, 8))
    return w, quantize_array(w, "int4", group_size=128)  # qvalue (8, 128), scale (8, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(scale=np.ones((8, 3), np.float32)),
         r"scale has shape \(8, 3\), expected \(8, 2\)"),
        (dict(scale=np.ones((8,), np.float32)), r"scale has shape \(8,\), expected \(8, 2\)"),
        (dict(k=250), r"qvalue has shape \(8, 128\), expected \(8, 125\) for k=250"),
        (dict(k=128), r"qvalue has shape \(8, 128\), expected \(8, 64\) for k=128"),
        (dict(group_size=64), r"scale has shape \(8, 2\), expected \(8, 4\)"),
        (dict(axis=0), r"axis must be negative"),
        (dict(qtype="int8"), r"qvalue has shape \(8, 128\), expected \(8, 256\)"),
        (dict(zero_point=np.ones((8, 2), np.float32)), r"int4 is symmetric"),
    ],
)
def test_wrong_parts_are_refused_when_built(change, message):
    _, q = _int4_g128()
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(q, **change)


def test_wrong_zero_point_shape_is_refused():
    q = quantize_array(_weight(7, (256, 8)), "uint4", group_size=128)
    with pytest.raises(ValueError, match=r"zero_point has shape \(8, 1\), expected \(8, 2\)"):
        dataclasses.replace(q, zero_point=np.ones((8, 1), np.float32))


def test_good_parts_still_build_under_transformations():
    w, q = _int4_g128()
    want = np.asarray(q.dequantize())
    # Stacked layers (as jquant.serve does), then vmap, scan, jit and eval_shape over them.
    st = jax.tree.map(lambda *xs: jnp.stack(xs), q, q)
    assert st.shape == (2, 256, 8)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda q: q.dequantize())(st))[1], want)
    total, _ = jax.lax.scan(lambda c, q: (c + q.dequantize().sum(), None), 0.0, st)
    assert float(total) == pytest.approx(2 * want.sum(), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(q)), want)
    assert jax.eval_shape(lambda q: q, q).shape == q.shape
    jax.tree.map(lambda _: object(), q)  # sentinels and None leaves are not checked
    jax.tree.map(lambda _: None, q)
    per_tensor = quantize_array(w, "int8", per_tensor=True)
    assert jax.tree.map(lambda *xs: jnp.stack(xs), per_tensor, per_tensor).scale.shape == (2, 1, 1)


# ---- NaN/inf weights are reported under jit too -------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weight_quantized_under_jit_is_reported(bad):
    w = _weight(9, (64, 8))
    w[3, 5] = bad
    f = jax.jit(lambda w: quantize_array(w, "int4", group_size=32, name="layer/w").dequantize())
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"layer/w: weight holds 1 NaN/inf "
                                                         r"values \(first at index \[3, 5\]\)"):
        np.asarray(f(w))  # before the check, the NaN came back silently as a 0


def test_finite_weight_under_jit_is_unaffected():
    w = _weight(9, (64, 8))
    f = jax.jit(lambda w: quantize_array(w, "int4", group_size=32).dequantize())
    np.testing.assert_array_equal(np.asarray(f(w)),
                                  np.asarray(quantize_array(w, "int4", group_size=32).dequantize()))
