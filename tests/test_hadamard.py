"""The fast (randomized) Hadamard transform against dense NumPy matrices.

The reference for ``n = 2**k * m`` is ``np.kron(scipy.linalg.hadamard(2**k), H_m)``; the
Paley ``H_m`` is checked on its own to be a Hadamard matrix (±1, ``H Hᵀ = m I``).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jquant.kernels._hadamard_matrix import factor, paley1, paley2, paley_matrix, random_signs

from jquant.hadamard import hadamard, has_hadamard, orthogonal_matrix, rht, rht_matrix

# SmolLM2's hidden, intermediate and head widths, the tiny model's intermediate width, and
# one of each Paley kind.
SIZES = (576, 1536, 64, 96, 20, 28, 1)


def _is_hadamard(h):
    m = h.shape[0]
    return set(np.unique(h)) <= {-1, 1} and np.array_equal(h @ h.T, m * np.eye(m))


@pytest.mark.parametrize("q", (3, 7, 11, 19, 23, 43, 59))
def test_paley1_is_hadamard(q):
    assert q % 4 == 3 and _is_hadamard(paley1(q))


@pytest.mark.parametrize("q", (5, 13, 17, 29, 37))
def test_paley2_is_hadamard(q):
    assert q % 4 == 1 and _is_hadamard(paley2(q))


@pytest.mark.parametrize("m,exists", [(12, True), (36, True), (60, True), (76, True),
                                      (52, False), (6, False), (9, False)])  # fmt: skip
def test_paley_orders(m, exists):
    assert (paley_matrix(m) is not None) == exists


def _dense(n):
    p, hm = factor(n)
    assert _is_hadamard(hm)
    return np.kron(scipy.linalg.hadamard(p), hm).astype(np.float64)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("transpose", (False, True))
def test_hadamard_matches_dense(n, transpose):
    x = np.random.default_rng(n).standard_normal((3, 5, n)).astype(np.float32)
    h = _dense(n)
    want = x.astype(np.float64) @ (h if transpose else h.T) / np.sqrt(n)
    got = np.asarray(hadamard(jnp.asarray(x), transpose=transpose))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_hadamard_other_axis_and_dtype():
    x = np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32)
    want = _dense(12) @ x.astype(np.float64) / np.sqrt(12)
    got = hadamard(jnp.asarray(x, jnp.bfloat16), axis=0)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)


@pytest.mark.parametrize("n", SIZES)
def test_rht_is_an_orthogonal_matrix(n):
    q = rht_matrix(n, seed=7)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    x = np.random.default_rng(1).standard_normal((2, n)).astype(np.float32)
    got = np.asarray(rht(jnp.asarray(x), seed=7))
    s = random_signs(n, 7)  # x ↦ H (s ⊙ x) / √n
    want = (x.astype(np.float64) * s) @ _dense(n).T / np.sqrt(n)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    back = np.asarray(rht(jnp.asarray(got), seed=7, inverse=True))
    np.testing.assert_allclose(back, x, atol=1e-5 * np.abs(x).max())
    assert set(np.unique(s)) == {-1.0, 1.0} or n == 1
    np.testing.assert_allclose(q, s[:, None] * _dense(n).T / np.sqrt(n), atol=1e-12)


def test_seeds_differ():
    assert not np.allclose(rht_matrix(64, 0), rht_matrix(64, 1))


def test_unknown_size_is_named():
    assert not has_hadamard(18)
    with pytest.raises(ValueError, match="n=18"):
        hadamard(jnp.ones((2, 18)))


def test_orthogonal_fallback():
    q = orthogonal_matrix(18, seed=0)  # no Hadamard matrix of 18: a QR one
    np.testing.assert_allclose(q @ q.T, np.eye(18), atol=1e-12)
    np.testing.assert_array_equal(orthogonal_matrix(64, 3), rht_matrix(64, 3))
