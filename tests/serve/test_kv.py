"""KV-cache quantization: codes and scales against NumPy, and attention over codes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.models.attention import attend
from jquant.models.cache import kv_format


def _x(shape, seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero vector: scale 0, codes 0
    return x


def test_int8_codes_and_scales_match_numpy():
    x = _x((5, 3, 64))
    codes, scale = kv_format("int8").quantize(jnp.asarray(x))
    assert codes.dtype == jnp.int8 and scale.dtype == jnp.bfloat16 and scale.shape == (5, 3)
    ref_scale = (np.abs(x).max(-1) * np.float32(1 / 127)).astype(ml_dtypes.bfloat16)
    s = ref_scale.astype(np.float32)
    ref_codes = np.clip(np.round(np.divide(x, s[..., None], where=s[..., None] > 0,
                                           out=np.zeros_like(x))), -127, 127)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(scale).astype(np.float32), s)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes.astype(np.int8))
    err = np.abs(np.asarray(codes, np.float32) * s[..., None] - x)
    # Half a step, plus what clipping at 127 costs when the bf16 scale rounded down.
    assert np.all(err <= 0.5 * s[..., None] + np.abs(x).max(-1, keepdims=True) * 2**-8)


def test_fp8_codes_are_e4m3_casts():
    x = _x((4, 2, 64), seed=1)
    codes, scale = kv_format("fp8").quantize(jnp.asarray(x))
    assert codes.dtype == jnp.float8_e4m3fn
    s = np.asarray(scale).astype(np.float32)[..., None]
    ref = np.clip(np.divide(x, s, where=s > 0, out=np.zeros_like(x)), -448, 448)
    np.testing.assert_array_equal(np.asarray(codes).astype(np.float32),
                                  ref.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))


def test_bytes_per_token_int8_about_half_of_bfloat16():
    bf16 = kv_format("bfloat16").bytes_per_token(3, 64, 30, jnp.bfloat16)
    int8 = kv_format("int8").bytes_per_token(3, 64, 30, jnp.bfloat16)
    assert bf16 == 2 * 30 * 3 * 64 * 2 and int8 == 2 * 30 * 3 * (64 + 2)
    assert int8 / bf16 == pytest.approx(0.516, abs=1e-3)


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError, match="int4.*none, bfloat16, float16, float32, int8, fp8"):
        kv_format("int4")


def _numpy_attention(q, k, v, allowed):
    b, s, h, dh = q.shape
    kv = k.shape[2]
    k = np.repeat(k, h // kv, axis=2)
    v = np.repeat(v, h // kv, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) / np.sqrt(dh)
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", p, v).reshape(b, s, h * dh)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_attention_over_codes_equals_attention_over_dequantized_cache(name):
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=sh).astype(np.float32)
               for sh in ((2, 3, 4, 16), (2, 7, 2, 16), (2, 7, 2, 16)))  # fmt: skip
    allowed = np.tril(np.ones((3, 7), bool), k=4)[None].repeat(2, 0)
    fmt = kv_format(name)
    (kc, ks), (vc, vs) = fmt.quantize(jnp.asarray(k)), fmt.quantize(jnp.asarray(v))
    out = attend(jnp.asarray(q), kc, vc, jnp.asarray(allowed), k_scale=ks, v_scale=vs)

    def deq(c, s):
        return np.asarray(c).astype(np.float32) * np.asarray(s).astype(np.float32)[..., None]

    ref = _numpy_attention(q, deq(kc, ks), deq(vc, vs), allowed)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
    # And the quantization error itself is small against the float attention.
    exact = _numpy_attention(q, k, v, allowed)
    assert np.abs(np.asarray(out) - exact).max() < (0.05 if name == "int8" else 0.2)


def test_jit_and_eager_quantize_agree():
    x = jnp.asarray(_x((3, 2, 64), seed=3))
    fmt = kv_format("int8")
    eager = fmt.quantize(x)
    jitted = jax.jit(fmt.quantize)(x)
    for a, b in zip(eager, jitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
