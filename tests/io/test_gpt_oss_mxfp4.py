"""gpt-oss' MXFP4 expert layout (``*_blocks`` / ``*_scales``) against transformers' own
dequantization (``integrations.mxfp4.convert_moe_packed_tensors``), bit for bit."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.io._fp4_layout import from_gpt_oss, to_gpt_oss
from jquant.qarray import quantize_array

torch = pytest.importorskip("torch")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

pytestmark = pytest.mark.reference


def _random(rng, experts=3, n=24, groups=4):
    blocks = rng.integers(0, 256, (experts, n, groups, 16), dtype=np.uint8)
    scales = rng.integers(127 - 20, 127 + 8, (experts, n, groups), dtype=np.uint8)
    # The extreme scales whose values stay normal float32 (XLA on CPU flushes subnormals to
    # zero, where torch keeps them: see from_gpt_oss and the test below): 2**-126 and 2**127.
    scales[0, 0, :2] = (1, 254)
    blocks[0, 0, 0], blocks[0, 0, 1] = 0x66, 0x11  # 4.0 and 0.5: 2**-124 and 2**126
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantization_equals_transformers(dtype):
    blocks, scales = _random(np.random.default_rng(0))
    want = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                            dtype=dtype).float().numpy()  # fmt: skip
    q = from_gpt_oss(blocks, scales, dtype=jnp.dtype(str(dtype).removeprefix("torch.")))
    assert q.qtype == "mxfp4" and q.shape == want.shape == (3, 128, 24)
    got = np.asarray(q.dequantize(), np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # -0 codes stay -0


def test_round_trip_bytes_and_jquant_quantization():
    blocks, scales = _random(np.random.default_rng(1))
    back = to_gpt_oss(from_gpt_oss(blocks, scales))
    np.testing.assert_array_equal(back[0], blocks)
    np.testing.assert_array_equal(back[1], scales)
    # jquant's own mxfp4 of an (experts, in, out) weight, as transformers dequantizes it.
    w = np.random.default_rng(2).normal(size=(2, 64, 40)).astype(np.float32)
    q = quantize_array(w, "mxfp4", axis=1, group_size=32)
    b, s = to_gpt_oss(q)
    assert b.shape == (2, 40, 2, 16) and s.shape == (2, 40, 2)
    want = mxfp4.convert_moe_packed_tensors(torch.from_numpy(b), torch.from_numpy(s),
                                            dtype=torch.float32).numpy()  # fmt: skip
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), want)


def test_smallest_scale_is_flushed_to_zero_on_cpu():
    """The documented difference: E8M0 code 0 (2**-127) is subnormal in float32; XLA on CPU
    flushes it, so the block dequantizes to 0 where transformers gives 4·2**-127 = 2**-125."""
    blocks = np.full((1, 1, 1, 16), 0x66, np.uint8)
    scales = np.zeros((1, 1, 1), np.uint8)
    want = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                            dtype=torch.float32).numpy()  # fmt: skip
    assert (want == 2.0**-125).all()
    if jnp.asarray(np.float32(2.0**-127)) * 1 != 0:
        pytest.skip("this backend keeps float32 subnormals")
    assert (np.asarray(from_gpt_oss(blocks, scales).dequantize(jnp.float32)) == 0).all()


@pytest.mark.parametrize("blocks, scales, message", [
    (np.zeros((2, 4, 16), np.uint8), np.zeros((2, 3), np.uint8), r"blocks .*\(2, 4, 16\)"),
    (np.zeros((2, 4, 8), np.uint8), np.zeros((2, 4), np.uint8), r"\(\.\.\., N, G, 16\)"),
    (np.zeros((2, 4, 16), np.int8), np.zeros((2, 4), np.uint8), r"got blocks int8"),
    (np.zeros((2, 4, 16), np.uint8), np.full((2, 4), 255, np.uint8),
     r"experts.gate_up_proj scales holds the E8M0 code 255 \(NaN"),
])  # fmt: skip
def test_bad_input_is_named(blocks, scales, message):
    with pytest.raises(ValueError, match=message):
        from_gpt_oss(blocks, scales, name="experts.gate_up_proj")


def test_to_gpt_oss_refuses_what_its_layout_cannot_hold():
    """Another format, or an act-order input permutation (gpt-oss blocks run along the
    inputs in order)."""
    import dataclasses

    rng = np.random.default_rng(0)
    q = from_gpt_oss(rng.integers(0, 256, (3, 2, 16), dtype=np.uint8),
                     np.full((3, 2), 127, np.uint8))  # fmt: skip
    permuted = dataclasses.replace(q, perm=jnp.asarray(rng.permutation(64).astype(np.int32)))
    with pytest.raises(ValueError, match=r"no input permutation, .*, a perm"):
        to_gpt_oss(permuted)
    with pytest.raises(ValueError, match=r"got int4"):
        to_gpt_oss(quantize_array(jnp.ones((64, 3)), "int4", group_size=32))
