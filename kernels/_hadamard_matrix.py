"""Hadamard matrices of the orders the transform needs: ``n = 2**k * m``.

The ``2**k`` factor is Sylvester's (``[[H, H], [H, -H]]``, applied as a butterfly); ``m``
is 1 or the order of a Paley matrix, built here from a prime ``q``:

* Paley I, ``q ≡ 3 (mod 4)``: order ``q + 1`` (12, 20, 24, 32, 44, 48, 60, 68, ...);
* Paley II, ``q ≡ 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, 76, ...).

Every matrix ``H`` here has entries ±1 and ``H @ H.T == order * I``. The transform of a
vector ``x`` of length ``n`` is ``(H_{2^k} ⊗ H_m) @ x``: element ``i = a * m + b`` of ``x``
is row ``a`` of a ``(2**k, m)`` view, column ``b``.
"""

from __future__ import annotations

import functools

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(j - i)``: the quadratic character of ``j - i`` modulo the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if d in squares else -1 for d in range(1, q)], np.int64)
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def paley1(q: int) -> np.ndarray:
    """Paley's first construction, order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    s = np.zeros((q + 1, q + 1), np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + np.eye(q + 1, dtype=np.int64)


def paley2(q: int) -> np.ndarray:
    """Paley's second construction, order ``2 (q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]], np.int64)
    one = np.array([[1, 1], [1, -1]], np.int64)
    return np.kron(c, one) + np.kron(c == 0, zero)


def paley_matrix(m: int) -> np.ndarray | None:
    """A Paley Hadamard matrix of order ``m`` (int64 ±1), or None when neither applies."""
    if m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return paley1(m - 1)
    if m % 4 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return paley2(m // 2 - 1)
    return None


@functools.cache
def factor(n: int) -> tuple[int, np.ndarray]:
    """``(2**k, H_m)`` with ``n = 2**k * m`` and ``m`` the smallest Paley order that fits
    (``H_m`` is ``[[1]]`` for a power of two); read-only int64 ``H_m``.

    Raises:
      ValueError: no ``m`` of this module divides ``n`` with a power-of-two quotient.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Hadamard size {n=} must be a positive int")
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        m = n // p
        h = np.ones((1, 1), np.int64) if m == 1 else paley_matrix(m)
        if h is not None:
            h.setflags(write=False)
            return p, h
        p //= 2
    raise ValueError(
        f"no Hadamard matrix of size {n=}: it must be 2**k * m with m 1 or a Paley order "
        "(q + 1 for a prime q = 3 mod 4, 2 (q + 1) for a prime q = 1 mod 4)"
    )


def has_hadamard(n: int) -> bool:
    """Whether `factor` builds a Hadamard matrix of size ``n``."""
    try:
        factor(n)
    except ValueError:
        return False
    return True


def random_signs(n: int, seed: int) -> np.ndarray:
    """The ±1 float32 vector ``s`` of the randomized transform ``x ↦ H (s ⊙ x) / √n``,
    a function of ``(n, seed)`` only."""
    rng = np.random.default_rng([int(seed), int(n)])
    return np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)
