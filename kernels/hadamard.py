"""y = H x / √n along the last axis of a block of rows: the Hadamard transform as a kernel.

``H = H_p ⊗ H_m`` (`_hadamard_matrix.factor`: ``p = 2**k`` Sylvester, ``m`` Paley or 1).
Row ``x`` of length ``n`` seen as a ``(p, m)`` matrix ``X`` (element ``a * m + b`` at
``[a, b]``, a free reshape done outside the kernel) transforms to ``H_p X H_mᵀ``: two small
dense matmuls per block of rows, O(n (p + m)) multiply-adds on the MXU / tensor cores
instead of the O(n²) of a dense ``H``. ``transpose=True`` is ``Hᵀ x / √n``, the inverse.

`jquant.hadamard` runs the XLA butterfly by default; this kernel only where a measured
dispatch table says so (kind ``"hadamard"``; none ships).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from ._hadamard_matrix import factor

X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
DEFAULT_BLOCK_ROWS = 16  # a Triton dot's smallest block
GPU_MAX_N = 4096  # the GPU kernel holds the dense (n, n) matrix in shared memory per block


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def _factors(n: int, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(left (p, p), right (m, m))`` float32 with ``H x / √n = left @ X @ right``."""
    p, hm = factor(n)
    left = _sylvester(p) / np.float32(np.sqrt(n))  # symmetric
    hm = hm.astype(np.float32)
    return left, (hm if transpose else hm.T)


def hadamard_kernel(x_ref, left_ref, right_ref, o_ref):
    """One block of rows: ``o[r] = left @ x[r] @ right`` for every row ``r`` of the block."""
    x = x_ref[...].astype(jnp.float32)  # (bm, p, m)
    bm = x.shape[0]
    right = jnp.broadcast_to(right_ref[...], (bm, *right_ref.shape))
    left = jnp.broadcast_to(left_ref[...], (bm, *left_ref.shape))
    dims = (((2,), (1,)), ((0,), (0,)))
    y = jax.lax.dot_general(x, right, dims, preferred_element_type=jnp.float32)
    y = jax.lax.dot_general(left, y, dims, preferred_element_type=jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def hadamard_kernel_gpu(x_ref, h_ref, o_ref):
    """One block of rows on GPU (``n`` a power of two): ``o = x @ H / √n`` (Triton blocks
    are powers of two, so no ``(p, m)`` view; ``H`` is symmetric)."""
    y = jnp.dot(x_ref[...].astype(jnp.float32), h_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def validate_inputs(x, *, block_rows: int) -> None:
    """Raise `ValueError` naming what the kernel cannot take."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows, n), got shape {x.shape}")
    if jnp.dtype(x.dtype) not in X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} must be one of bfloat16, float16, float32")
    if not isinstance(block_rows, int) or block_rows <= 0:
        raise ValueError(f"{block_rows=} must be a positive int")
    rows = x.shape[0]
    if rows % block_rows:
        raise ValueError(f"{rows=} must be a multiple of {block_rows=}")
    factor(x.shape[1])  # raises for a size with no Hadamard matrix


def can_use_hadamard_kernel(n: int, backend: str) -> bool:
    """Whether the kernel applies to width ``n`` on ``backend`` ("tpu" or "gpu"): a known
    Hadamard size, and on GPU (Triton blocks are powers of two) a power of two."""
    try:
        p, hm = factor(n)
    except ValueError:
        return False
    if backend == "gpu":
        return hm.shape[0] == 1 and 16 <= p <= GPU_MAX_N
    return backend == "tpu"


@functools.partial(jax.jit, static_argnames=("transpose", "block_rows", "backend",
                                             "interpret"))
def hadamard_transform(x: jax.Array, *, transpose: bool = False,
                       block_rows: int = DEFAULT_BLOCK_ROWS, backend: str = "tpu",
                       interpret: bool = False):  # fmt: skip
    """``H x / √n`` (``Hᵀ x / √n`` with ``transpose``) for every row of ``x (rows, n)``,
    ``block_rows`` rows a grid step; the result in ``x``'s dtype.

    Args:
      backend: "tpu" (Mosaic) or "gpu" (Triton; `can_use_hadamard_kernel` sizes only).

    Raises:
      ValueError: as `validate_inputs`, or a width the backend's kernel does not take.
    """
    validate_inputs(x, block_rows=block_rows)
    rows, n = x.shape
    if not can_use_hadamard_kernel(n, backend):
        raise ValueError(f"{n=} has no {backend} Hadamard kernel (can_use_hadamard_kernel)")
    left, right = _factors(n, transpose)
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltr

        return pl.pallas_call(
            hadamard_kernel_gpu,
            out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
            grid=(rows // block_rows,),
            in_specs=[pl.BlockSpec((block_rows, n), lambda i: (i, 0)),
                      pl.BlockSpec((n, n), lambda i: (0, 0))],  # fmt: skip
            out_specs=pl.BlockSpec((block_rows, n), lambda i: (i, 0)),
            compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1),
            interpret=interpret,
            name="hadamard",
        )(x, jnp.asarray(left))
    p, m = left.shape[0], right.shape[0]
    out = pl.pallas_call(
        hadamard_kernel,
        out_shape=jax.ShapeDtypeStruct((rows, p, m), x.dtype),
        grid=(rows // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, p, m), lambda i: (i, 0, 0)),
                  pl.BlockSpec((p, p), lambda i: (0, 0)),
                  pl.BlockSpec((m, m), lambda i: (0, 0))],  # fmt: skip
        out_specs=pl.BlockSpec((block_rows, p, m), lambda i: (i, 0, 0)),
        interpret=interpret,
        name="hadamard",
    )(x.reshape(rows, p, m), jnp.asarray(left), jnp.asarray(right))
    return out.reshape(rows, n)


def hadamard_reference(x: jax.Array, *, transpose: bool = False) -> jax.Array:
    """Plain jnp: ``x @ Hᵀ / √n`` (``x @ H / √n`` with ``transpose``) with the dense ``H``."""
    n = x.shape[-1]
    p, hm = factor(n)
    h = jnp.asarray(np.kron(_sylvester(p), hm.astype(np.float32)) / np.sqrt(n), jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), h if transpose else h.T,
                precision=jax.lax.Precision.HIGHEST)  # fmt: skip
    return y.astype(x.dtype)
