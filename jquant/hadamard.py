"""Fast, orthonormal (randomized) Hadamard transforms along one axis.

``hadamard(x)`` is ``H @ x / √n`` along ``axis`` for the ``n × n`` Hadamard matrix
``H = H_{2^k} ⊗ H_m`` of `jquant.kernels._hadamard_matrix` (Sylvester's ``2**k`` part as an
O(n log n) butterfly of adds and subtracts, a dense ``m × m`` Paley matrix for the rest):
SmolLM2's widths are 576 = 16·36, 1536 = 128·12 and 64. ``transpose=True`` is ``Hᵀ @ x / √n``,
its inverse (a Paley matrix is not symmetric, so ``H`` differs from ``Hᵀ``).

The randomized transform (QuIP#'s RHT) first flips signs by a ±1 vector ``s`` drawn from a
seed: ``rht(x) = H (s ⊙ x) / √n``, undone by ``rht(x, inverse=True) = s ⊙ Hᵀ x / √n``.
As a matrix acting on row vectors (``x @ Q``, how jquant stores a Dense kernel ``(K, N)``),
`rht_matrix` is ``Q = diag(s) Hᵀ / √n``, orthogonal.

>>> x = jnp.arange(12.0)
>>> bool(jnp.allclose(rht(rht(x, seed=3), seed=3, inverse=True), x, atol=1e-5))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant import kernels
from jquant.kernels._hadamard_matrix import factor, has_hadamard, random_signs
from jquant.kernels.hadamard import DEFAULT_BLOCK_ROWS

PATHS = ("auto", "xla", "kernel")

__all__ = ["hadamard", "has_hadamard", "orthogonal_matrix", "rht", "rht_matrix"]


def _butterfly(x: jax.Array, p: int) -> jax.Array:
    """``H_p`` (Sylvester) applied to axis 1 of ``x (B, p, m)``, unnormalized."""
    b, _, m = x.shape
    h = 1
    while h < p:
        y = x.reshape(b, p // (2 * h), 2, h, m)
        top, bottom = y[:, :, 0], y[:, :, 1]
        x = jnp.stack([top + bottom, top - bottom], axis=2).reshape(b, p, m)
        h *= 2
    return x


def _kernel_backend(rows: int, n: int, path: str) -> str | None:
    """The backend whose Pallas kernel transforms ``rows`` rows of width ``n``, or None
    (XLA): "auto" only on a TPU or GPU whose measured dispatch table allows it (kind
    ``"hadamard"``), "kernel" always (interpret mode off the device)."""
    if path not in PATHS:
        raise ValueError(f"{path=} must be one of {PATHS}")
    backend = kernels.normalize_backend(None)
    if path == "kernel":
        backend = backend if backend in ("tpu", "gpu") else "tpu"
        if rows % DEFAULT_BLOCK_ROWS or not kernels.can_use_hadamard_kernel(n, backend):
            raise ValueError(f"no {backend} Hadamard kernel for {rows} rows of width {n} "
                             f"(rows a multiple of {DEFAULT_BLOCK_ROWS}, "
                             "can_use_hadamard_kernel)")  # fmt: skip
        return backend
    if path == "xla" or backend not in ("tpu", "gpu"):
        return None
    if (rows % DEFAULT_BLOCK_ROWS or not kernels.can_use_hadamard_kernel(n, backend)
            or not kernels.prefer_kernel(backend, "hadamard", rows)):  # fmt: skip
        return None
    return backend


def hadamard(x: jax.Array, axis: int = -1, *, transpose: bool = False,
             path: str = "auto") -> jax.Array:  # fmt: skip
    """``H @ x / √n`` along ``axis`` (``Hᵀ`` with ``transpose``), in ``x``'s dtype
    (computed in float32 at least).

    Args:
      path: "auto" (the XLA butterfly, or the Pallas kernel `jquant.kernels.hadamard`
        where a measured dispatch table allows it), "xla", or "kernel" (forced; Pallas
        interpret mode off a TPU or GPU).

    Raises:
      ValueError: no Hadamard matrix of ``x.shape[axis]`` is known (`has_hadamard`), or
        "kernel" where no kernel applies.
    """
    n = x.shape[axis]
    p, hm = factor(n)
    m = hm.shape[0]
    moved = jnp.moveaxis(x, axis, -1)
    rows = int(np.prod(moved.shape[:-1]))
    if (backend := _kernel_backend(rows, n, path)) is not None:
        y = kernels.hadamard_transform(moved.reshape(rows, n), transpose=transpose,
                                       backend=backend,
                                       interpret=jax.default_backend() not in ("tpu", "gpu"))
        return jnp.moveaxis(y.reshape(moved.shape), -1, axis)
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    y = moved.reshape(-1, p, m).astype(dtype)
    if m > 1:
        mat = jnp.asarray(hm if transpose else hm.T, dtype)  # rows times H_mᵀ: H_m per row
        y = jnp.einsum("bpm,mj->bpj", y, mat, precision=jax.lax.Precision.HIGHEST)
    y = _butterfly(y, p) * jnp.asarray(1.0 / np.sqrt(n), dtype)
    return jnp.moveaxis(y.reshape(moved.shape).astype(x.dtype), -1, axis)


def rht(x: jax.Array, axis: int = -1, *, seed: int, inverse: bool = False) -> jax.Array:
    """The randomized Hadamard transform ``H (s ⊙ x) / √n`` along ``axis`` (its inverse
    ``s ⊙ Hᵀ x / √n`` with ``inverse``), ``s`` = `random_signs` ``(n, seed)``."""
    n = x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = n
    s = jnp.asarray(random_signs(n, seed).reshape(shape), x.dtype)
    if inverse:
        return hadamard(x, axis, transpose=True) * s
    return hadamard(x * s, axis)


def rht_matrix(n: int, seed: int) -> np.ndarray:
    """``Q`` (float64, orthogonal) with ``x @ Q == rht(x, seed=seed)`` for row vectors."""
    p, hm = factor(n)
    h = np.kron(_sylvester(p), hm).astype(np.float64)
    return random_signs(n, seed).astype(np.float64)[:, None] * h.T / np.sqrt(n)


def orthogonal_matrix(n: int, seed: int) -> np.ndarray:
    """A random orthogonal ``(n, n)`` float64 matrix: `rht_matrix` where a Hadamard
    matrix of size ``n`` is known, else the Q of a seeded Gaussian matrix's QR (signs fixed
    by R's diagonal). Only for transforms folded offline: the QR fallback has no fast
    online form."""
    if has_hadamard(n):
        return rht_matrix(n, seed)
    a = np.random.default_rng([int(seed), int(n)]).standard_normal((n, n))
    q, r = np.linalg.qr(a)
    return q * np.sign(np.diag(r))[None, :]


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h
