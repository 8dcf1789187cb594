"""Double quantization: the scales stored as a log8 QArray, blocks of 256 along N."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant import qtypes
from jquant.qarray import QArray, quantize_array


def _skewed_weight(seed=0, k=64, n=256, decades=3.0):
    """(K, N) weight whose per-column absmax spans ``decades`` orders of magnitude."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n))
    col = 10.0 ** rng.uniform(-decades, 0.0, n)
    col[[0, 1]] = 10.0 ** -decades, 1.0  # both ends present in the one block of 256
    return (w / np.abs(w).max(axis=0) * col).astype(np.float32)


def _log_step(ref):
    """The kept scale's largest factor above the scale: (max / min) ** (1 / 255), per block."""
    return (ref.max(axis=0) / ref.min(axis=0)) ** (1 / 255)


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_skewed_scales_are_never_zero_and_never_shrink(qtype):
    w = _skewed_weight()
    q = quantize_array(w, qtype, group_size=64, double_quant=True, scale_dtype=jnp.float32)
    assert isinstance(q.scale, QArray) and q.scale.qtype == "log8"
    got = np.asarray(q.scales(), np.float64)[:, 0]  # (N,)
    # NumPy reference: the single-level scale of each column.
    ref = np.abs(w.astype(np.float64)).max(axis=0) / qtypes.get(qtype).scale_target
    assert (got > 0).all()
    # Rounded up (like the scale dtype cast), by at most one relative step of the block:
    # a factor (1000) ** (1 / 255) = 1.0275 here.
    assert (got >= ref).all()
    assert (got <= ref * _log_step(ref) * (1 + 1e-5)).all()
    assert got[0] == pytest.approx(ref[0], rel=1e-4)  # the block's smallest scale: code 0
    d = np.asarray(q.dequantize(), np.float64)
    assert (np.abs(d).max(axis=0) > 0).all()  # no column is zeroed
    # The format's bound holds against the scales as kept (no clipping).
    bound = got * qtypes.half_step(qtype, w / got) * (1 + 1e-5)
    assert (np.abs(d - w) <= bound).all()


def test_bfloat16_scales_are_rounded_up_before_double_quant():
    w = _skewed_weight(1, n=300)  # a full block of 256 and a short one of 44
    q = quantize_array(w, "nf4", group_size=32, double_quant=True)
    assert q.scale.shape == (300, 2) and q.scale.scale.shape == (2, 2)
    got = np.asarray(q.scales(), np.float64)
    absmax = np.abs(w.astype(np.float64)).reshape(2, 32, 300).max(axis=1).T  # (N, G)
    ref = absmax.astype(ml_dtypes.bfloat16).astype(np.float64)
    ref = np.where(ref < absmax, np.nextafter(ref.astype(ml_dtypes.bfloat16),
                                              ml_dtypes.bfloat16(np.inf)).astype(np.float64), ref)
    assert (got >= ref).all() and (got > 0).all()
    for block in (slice(0, 256), slice(256, 300)):
        r = ref[block]
        assert (got[block] <= r * _log_step(r) * (1 + 1e-5)).all()


def test_skewed_columns_keep_their_relative_precision():
    """Column scales exp(U(-8, 0)) (3.5 decades in one block): a linear second level (the
    previous uint8 codes) left the worst column's mean error at 0.87 of its mean |w|."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 512)) * np.exp(rng.uniform(-8, 0, 512))).astype(np.float32)
    w64 = w.astype(np.float64)
    q = quantize_array(w, "nf4", group_size=64, double_quant=True)
    d = np.asarray(q.dequantize(), np.float64)
    rel = np.abs(d - w64).mean(axis=0) / np.abs(w64).mean(axis=0)  # per column
    assert rel.max() <= 0.2, rel.max()  # ~0.108; single-level nf4 g64 gives ~0.106


def test_tiny_and_equal_scales_are_kept_and_never_zero():
    w = np.zeros((64, 256), np.float32)
    w[0, 0] = 1e-30  # a group far below everything else in its block, but not zero
    w[0, 1:] = 3.0
    q = quantize_array(w, "nf4", group_size=64, double_quant=True, scale_dtype=jnp.float32)
    got = np.asarray(q.scales(), np.float64)[:, 0]
    assert got[0] >= 1e-30 and got[0] <= 1e-30 * (3e30) ** (1 / 255) * (1 + 1e-5)
    assert (got[1:] >= 3.0).all() and (got[1:] <= 3.0 * (1 + 1e-4)).all()
    assert np.asarray(q.dequantize())[0, 0] != 0
    q = quantize_array(np.full((64, 256), 0.5, np.float32), "nf4", group_size=64,
                       double_quant=True)  # one block of equal scales: kept (to float32 ulps)
    got = np.asarray(q.scales())
    assert (got >= 0.5).all() and (got <= 0.5 * (1 + 2e-6)).all()


def test_linear_uint8_scales_of_earlier_checkpoints_still_dequantize_linearly():
    """Checkpoints written before the log8 codes tag their scale QArray "uint8": the tag,
    not the codes, decides how they are read, so they keep their linear meaning."""
    q = quantize_array(_skewed_weight(), "nf4", group_size=64, double_quant=True)
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (1, 256)).astype(np.uint8)
    step, offset = np.float32([[2e-3]]), np.float32([[-4.0]])
    old = dataclasses.replace(q.scale, qvalue=jnp.asarray(codes), scale=jnp.asarray(step),
                              zero_point=jnp.asarray(offset), qtype="uint8")
    old_q = jax.tree.unflatten(jax.tree.structure(q), jax.tree.leaves(q))  # a copy
    old_q = dataclasses.replace(old_q, scale=old)
    want = (codes.astype(np.float64) - offset) * step  # (1, N)
    np.testing.assert_allclose(np.asarray(old_q.scales())[:, 0], want[0], rtol=1e-6)


def test_log8_is_refused_as_a_weight_format():
    with pytest.raises(ValueError, match="log8 stores double-quantized scales only"):
        quantize_array(np.ones((4, 4), np.float32), "log8")


def test_double_quant_nbytes_counts_codes_scales_and_offsets():
    q = quantize_array(np.ones((256, 512), np.float32), "nf4", group_size=64, double_quant=True)
    s = q.scale
    assert s.nbytes == 512 * 4 + 2 * 4 * (4 + 4)  # uint8 codes, f32 scale + offset per block
    assert q.nbytes == 256 * 512 // 2 + s.nbytes
