"""`jquant.models.sampling.penalize` and `top_logprobs` against NumPy formulas."""

import jax.numpy as jnp
import numpy as np

from jquant.models.sampling import Penalties, penalize, top_logprobs


def test_penalize_is_the_openai_and_hf_formulas_and_leaves_other_rows_bit_identical():
    rng = np.random.default_rng(0)
    rows, vocab = 6, 50
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    generated = rng.integers(0, 4, (rows, vocab)) * (rng.random((rows, vocab)) < 0.3)
    in_prompt = rng.random((rows, vocab)) < 0.2
    counts = (2 * generated + in_prompt).astype(np.int32)
    presence = np.array([0, 1.5, 0, 0, -0.7, 0], np.float32)
    frequency = np.array([0, 0, 2.0, 0, 0.3, 0], np.float32)
    repetition = np.array([1, 1, 1, 1.8, 0.5, 1], np.float32)
    got = np.asarray(penalize(jnp.asarray(logits),
                              Penalties(presence, frequency, repetition, counts)))  # fmt: skip
    for r in range(rows):
        want = logits[r].copy()
        seen = (generated[r] > 0) | in_prompt[r]
        rp = repetition[r]
        want[seen] = np.where(want[seen] > 0, want[seen] / rp, want[seen] * rp)
        want = want - presence[r] * (generated[r] > 0) - frequency[r] * generated[r]
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6)
    for r in (0, 5):  # no penalty: unchanged, bit for bit, whatever the counts
        assert np.array_equal(got[r], logits[r])


def test_top_logprobs_are_numpys_log_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (3, 40)).astype(np.float32)
    tokens = np.array([0, 7, 39], np.int32)
    chosen, ids, values = map(np.asarray, top_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(chosen, ref[np.arange(3), tokens], rtol=1e-5, atol=1e-5)
    assert ids.shape == values.shape == (3, 20)
    np.testing.assert_array_equal(ids, np.argsort(-ref, axis=-1)[:, :20])
    np.testing.assert_allclose(values, np.take_along_axis(ref, ids, -1), rtol=1e-5, atol=1e-5)
