"""int32 bit-stream packing against a bit-by-bit loop (GPTQ's straddling 3-bit words)."""

import numpy as np
import pytest

from jquant.io._int32_pack import pack_int32, packed_words, unpack_int32


def _reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit ``b`` of code ``i`` to stream bit ``i·bits + b``, word by word (columns packed)."""
    n = codes.shape[0]
    out = np.zeros((packed_words(n, bits), *codes.shape[1:]), np.uint64)
    for i in range(n):
        for b in range(bits):
            pos = i * bits + b
            out[pos // 32] |= ((codes[i] >> b) & 1).astype(np.uint64) << np.uint64(pos % 32)
    return out.astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [64, 70])
def test_pack_matches_bit_loop_and_round_trips(bits, n):
    codes = np.random.default_rng(bits * n).integers(0, 1 << bits, (n, 6))
    words = pack_int32(codes, bits, axis=0)
    np.testing.assert_array_equal(words.view(np.uint32), _reference(codes, bits))
    np.testing.assert_array_equal(unpack_int32(words, bits, n, axis=0), codes)
    rows = pack_int32(codes.T, bits, axis=-1)  # the same along the last axis
    np.testing.assert_array_equal(rows, words.T)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 15\]"):
        pack_int32(np.array([16]), 4)
    with pytest.raises(ValueError, match=r"8 codes of 4 bits need 1 int32 words .* got 2"):
        unpack_int32(np.zeros(2, np.int32), 4, 8)
    with pytest.raises(ValueError, match=r"must be int32 or uint32, got int64"):
        unpack_int32(np.zeros(1, np.int64), 4, 8)
