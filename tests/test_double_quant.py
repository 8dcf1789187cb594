"""Double quantization: the scales stored as a uint8 QArray, blocks of 256 along N."""

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


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_skewed_scales_are_never_zero_and_never_shrink(qtype):
    w = _skewed_weight()
    q = quantize_array(w, qtype, group_size=64, double_quant=True, scale_dtype=jnp.float32)
    assert isinstance(q.scale, QArray) and q.scale.qtype == "uint8"
    got = np.asarray(q.scales(), np.float64)[:, 0]  # (N,)
    # NumPy reference: the single-level scale of each column.
    ref = np.abs(w.astype(np.float64)).max(axis=0) / qtypes.get(qtype).scale_target
    assert (got > 0).all()
    # Rounded up (like the scale dtype cast), by at most one step of the block's range.
    step = (ref.max() - ref.min()) / 255
    assert (got >= ref * (1 - 1e-6)).all()
    assert (got - ref <= step * (1 + 1e-5) + ref * 1e-6).all()
    assert got[0] == pytest.approx(ref[0], rel=1e-5)  # the block's smallest scale is exact
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
    assert (got >= ref * (1 - 1e-6)).all() and (got > 0).all()
    for block in (slice(0, 256), slice(256, 300)):
        r = ref[block]
        step = (r.max(axis=0) - r.min(axis=0)) / 255
        assert (got[block] - r <= step * (1 + 1e-5) + r * 1e-6).all()


def test_double_quant_nbytes_counts_codes_scales_and_offsets():
    q = quantize_array(np.ones((256, 512), np.float32), "nf4", group_size=64, double_quant=True)
    s = q.scale
    assert s.nbytes == 512 * 4 + 2 * 4 * (4 + 4)  # uint8 codes, f32 scale + offset per block
    assert q.nbytes == 256 * 512 // 2 + s.nbytes
