"""`jquant.models.sampling.allow` (the step program's token bitmask) against NumPy: the bits
unpacked by ``np.unpackbits`` from the little-endian bytes of the words, and llguidance's
own ``apply_token_bitmask_inplace``."""

import jax
import llguidance.numpy as lln
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jquant.models.sampling import allow, allow_all, bitmask_words


def _numpy_allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """(rows, vocab) bool: the bits of each row's int32 words, token t at bit t of the row's
    little-endian byte string."""
    raw = bitmask.astype("<i4").view(np.uint8)
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :vocab].astype(bool)


def _random(rng, rows: int, vocab: int):
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    bitmask = rng.integers(-(2**31), 2**31, (rows, bitmask_words(vocab)), dtype=np.int64)
    return logits, bitmask.astype(np.int32)


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 100, 265, 49152])
def test_minus_inf_exactly_where_the_bit_is_zero(vocab):
    rng = np.random.default_rng(vocab)
    logits, bitmask = _random(rng, 3, vocab)
    bitmask[0, 0] |= 1  # token 0 allowed in row 0
    bitmask[1] = 0  # a row that allows nothing
    bitmask[2, 0] = -(2**31)  # only bit 31 of the first word (the sign bit)
    got = np.asarray(allow(logits, bitmask))
    keep = _numpy_allowed(bitmask, vocab)
    np.testing.assert_array_equal(got, np.where(keep, logits, -np.inf))
    peer = logits.copy()
    lln.apply_token_bitmask_inplace(peer, bitmask)
    np.testing.assert_array_equal(got, peer)
    assert keep.any() and not keep.all()  # the case can tell a mask from none


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_unpacking_matches_numpy_for_any_shape(rows, vocab, seed):
    logits, bitmask = _random(np.random.default_rng(seed), rows, vocab)
    keep = _numpy_allowed(bitmask, vocab)
    np.testing.assert_array_equal(np.asarray(allow(logits, bitmask)),
                                  np.where(keep, logits, -np.inf))  # fmt: skip


def test_all_ones_leaves_the_logits_unchanged_bit_for_bit():
    logits, _ = _random(np.random.default_rng(0), 4, 1000)
    logits[0, :3] = [np.inf, -np.inf, np.finfo(np.float32).max]
    got = jax.jit(allow)(logits, allow_all(4, 1000))
    assert np.asarray(got).tobytes() == logits.tobytes()
    assert allow_all(4, 1000).shape == (4, 32)  # ceil(1000 / 32) words per row
