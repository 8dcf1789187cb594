"""W8A8: int8 activations (one scale per row/token) times int8 weights (one scale per column).

Products accumulate exactly in int32; the two scales are applied once, in the epilogue.
This only works with per-channel weight scales: with group-wise scales the int32 partial
sums of different groups would need rescaling before they could be added.

Kernel: TPU only (`_tpu.w8a8_matmul_tpu`). Other backends run the XLA reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import _tpu
from .tuned_block_sizes import BlockSizes, get_block_sizes

_NT = (((1,), (1,)), ((), ()))
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row absmax int8: x (..., K) -> (xq int8 (..., K), x_scale float32 (..., 1)).

    >>> xq, xs = quantize_activations(x)   # x ~= xq * xs
    """
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    x_scale = jnp.where(amax > 0, amax / 127, jnp.ones_like(amax))
    xq = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
    return xq, x_scale


def _validate(xq, x_scale, qvalue, scale) -> None:
    if xq.dtype != jnp.int8 or qvalue.dtype != jnp.int8:
        raise ValueError(f"W8A8 needs int8 xq and qvalue, got {xq.dtype} and {qvalue.dtype}")
    if qvalue.ndim != 2 or xq.shape[-1] != qvalue.shape[1]:
        raise ValueError(f"xq (..., K)={xq.shape} and qvalue (N, K)={qvalue.shape} disagree "
                         "on K")
    if x_scale.shape != (*xq.shape[:-1], 1):
        raise ValueError(f"x_scale.shape={x_scale.shape} must be {(*xq.shape[:-1], 1)} "
                         "(one scale per row)")
    if scale.shape != (qvalue.shape[0], 1):
        raise ValueError(f"scale.shape={scale.shape} must be {(qvalue.shape[0], 1)}: W8A8 "
                         "needs per-channel weight scales")
    for name, a in (("x_scale", x_scale), ("scale", scale)):
        if jnp.dtype(a.dtype) not in _FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={a.dtype} must be bfloat16, float16 or float32")


def _int_dot(xq, qvalue) -> jax.Array:
    return lax.dot_general(xq, qvalue, _NT, preferred_element_type=jnp.int32)


def quantized_matmul_w8a8_reference(xq, x_scale, qvalue, scale, *, out_dtype=jnp.bfloat16):
    """(xq @ qvalue.T, exact in int32) * x_scale * scale.T, in `out_dtype`."""
    _validate(xq, x_scale, qvalue, scale)
    lead = xq.shape[:-1]
    acc = _int_dot(xq.reshape(-1, xq.shape[-1]), qvalue).astype(jnp.float32)
    y = acc * x_scale.reshape(-1, 1).astype(jnp.float32) * scale.astype(jnp.float32).T
    return y.astype(out_dtype).reshape(*lead, qvalue.shape[0])


def quantized_matmul_w8a8(xq, x_scale, qvalue, scale, *, out_dtype=jnp.bfloat16,
                          backend: str | None = None, interpret=False,
                          block_sizes: BlockSizes | None = None):
    """W8A8 matmul: the TPU kernel on TPU (or when interpreting), else the XLA reference.

    Args:
      xq, x_scale: from `quantize_activations` (or any per-row int8 scheme).
      qvalue, scale: int8 weight (N, K) and its per-channel scale (N, 1).
      backend: "tpu" runs the kernel; default `jax.default_backend()`.

    Raises:
      ValueError: dtypes or shapes break the contract above, or explicit block sizes are
        illegal on TPU.
    """
    _validate(xq, x_scale, qvalue, scale)
    backend = jax.default_backend() if backend is None else backend
    if backend != "tpu":
        return quantized_matmul_w8a8_reference(xq, x_scale, qvalue, scale, out_dtype=out_dtype)
    lead, k = xq.shape[:-1], xq.shape[-1]
    xq2, xs2 = xq.reshape(-1, k), x_scale.reshape(-1, 1)
    m, n = xq2.shape[0], qvalue.shape[0]
    sizes = block_sizes or get_block_sizes("tpu", m)
    plan = _tpu.plan_tpu("int8", k, None, m, n, jnp.int8, sizes, strict=block_sizes is not None)
    if plan.kb_main == 0:
        return quantized_matmul_w8a8_reference(xq, x_scale, qvalue, scale, out_dtype=out_dtype)
    has_tail = plan.kb_main < k
    y = _tpu.w8a8_matmul_tpu(
        xq2[:, :plan.kb_main], xs2, qvalue, scale, plan=plan,
        out_dtype=jnp.dtype(jnp.float32) if has_tail else jnp.dtype(out_dtype),
        interpret=interpret)
    if has_tail:
        tail = _int_dot(xq2[:, plan.kb_main:], qvalue[:, plan.kb_main:]).astype(jnp.float32)
        y = y + tail * xs2.astype(jnp.float32) * scale.astype(jnp.float32).T
    return y.astype(out_dtype).reshape(*lead, n)
