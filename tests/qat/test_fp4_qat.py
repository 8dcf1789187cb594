"""QAT's fake quantization for the FP4 formats against NumPy: E2M1 rounding (ml_dtypes' cast,
saturating at ±6) forward, the straight-through derivative backward, zero where a value
saturates (under MXFP4's power-of-two scales the largest values of a block do)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.qat.fake import fake_quantize_leaf, round_ste
from jquant.recipe import Rule


def _e2m1(v):
    """NumPy's E2M1 rounding: ml_dtypes' float4_e2m1fn cast (round to nearest, ties to even)
    of the value saturated to ±6."""
    return np.clip(v, -6, 6).astype(np.float32).astype(ml_dtypes.float4_e2m1fn).astype(
        np.float32)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_round_ste_is_e2m1_rounding_with_straight_through_grad(name):
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0])
    v = np.concatenate([ties, -ties, np.random.default_rng(0).uniform(-9, 9, 500)])
    v = v.astype(np.float32)
    got = np.asarray(round_ste(jnp.asarray(v), name))
    np.testing.assert_array_equal(got, _e2m1(v))
    clipped = np.asarray(jax.grad(lambda a: round_ste(a, name).sum())(jnp.asarray(v)))
    np.testing.assert_array_equal(clipped, (np.abs(v) <= 6).astype(np.float32))
    ident = np.asarray(jax.grad(lambda a: round_ste(a, name, "identity").sum())(jnp.asarray(v)))
    np.testing.assert_array_equal(ident, np.ones_like(v))


def test_mxfp4_fake_quant_and_its_gradient_equal_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 6)).astype(np.float32)  # (K, N), blocks of 32 along K
    c = rng.standard_normal(w.shape).astype(np.float32)
    rule = Rule(pattern="w", weight="mxfp4", group_size=32).resolve("w", 2)
    fq = np.asarray(fake_quantize_leaf(jnp.asarray(w), rule))
    grad = np.asarray(jax.grad(lambda a: jnp.sum(fake_quantize_leaf(a, rule) * c))(
        jnp.asarray(w)))  # fmt: skip
    blocks = w.reshape(2, 32, 6)
    scale = 2.0 ** (np.floor(np.log2(np.abs(blocks).max(axis=1, keepdims=True))) - 2)
    v = blocks / scale
    np.testing.assert_array_equal(fq, (_e2m1(v) * scale).reshape(w.shape))
    inside = (np.abs(v) <= 6).reshape(w.shape)
    assert not inside.all()  # some block maxima lie in (6, 8): saturated, no gradient
    np.testing.assert_array_equal(grad, np.where(inside, c, 0))
