"""W8A8: 8-bit activations (one scale per row/token) times 8-bit weights (one per column).

Two formats, both operands in the same one:

* int8 x int8: products accumulate exactly in int32.
* fp8 x fp8 (`float8_e4m3fn`, scales onto +-448): products accumulate in float32.

The two scales are applied once, in the epilogue: `y = (xq @ qvalue.T) * x_scale *
scale.T`. This only works with per-channel weight scales: with group-wise scales the partial
sums of different groups would need rescaling before they could be added.

Kernels, chosen by `backend` (default `jax.default_backend()`):

* "tpu": `_tpu.w8a8_matmul_tpu` (Pallas, Mosaic), int8 and fp8. int8 is an int8 MXU dot
  with an exact int32 accumulator. fp8 tiles are upcast to bf16 in VMEM (exact: every e4m3
  value is a bf16 value) and multiplied on the MXU with an f32 accumulator (the MXU's bf16 path);
  TPU v7-class chips have a native fp8 MXU, and a kernel that feeds it fp8
  directly is future work. `can_use_tpu_w8a8` says when it applies. Validated in
  interpret mode and by export only: it has never run on a TPU.
* "gpu" / "cuda" on Hopper (sm_90+), where K is a multiple of 32 and N of 8:
  `_mgpu_w8a8.w8a8_matmul_mgpu` (Pallas Mosaic GPU, 8-bit `wgmma`, int8 -> int32 and
  fp8 -> f32 accumulators), checked in the Mosaic GPU interpreter and by export only.
  `select_gpu_w8a8_kernel` / `gpu_kernel=` / `$JQUANT_GPU_KERNEL` choose.
* "gpu" / "cuda" otherwise: `_gpu.w8a8_matmul_gpu` (Pallas, Triton lowering), int8 and fp8. The fp8
  kernel is a native fp8 `tt.dot` (it exports for "cuda" with float8 operands, so no
  upcast to bf16 in the kernel); Triton's fp8 MMA needs compute capability >= 8.9, which
  `can_use_gpu_w8a8` checks when a GPU is attached. Validated in interpret mode and by
  export only: it has never run on a GPU.
* anything else: the XLA reference.

Every shape gives the reference's answer: M is padded to a whole block; rows of N past the
last whole block and K past the last whole block are computed by XLA and added.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _gpu, _mgpu_w8a8, _tpu
from .block_sizes import BlockSizes, get_block_sizes
from .quantized_matmul import (
    _is_hopper_or_newer,
    _normalize_backend,
    forced_gpu_kernel,
    gpu_compute_capability,
)

_NT = (((1,), (1,)), ((), ()))
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# Code dtype -> the magnitude a row's absmax is scaled onto: the dtype's largest finite
# value (int8 codes stay in [-127, 127], symmetric).
W8A8_DTYPES = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}
# Formats `quantize_activations` also writes for fake-quantized activations (no W8A8 kernel).
ACTIVATION_DTYPES = {**W8A8_DTYPES, jnp.dtype(jnp.float8_e5m2): 57344.0}


def quantize_activations(x: jax.Array, dtype=jnp.int8, *,
                         axis: int | tuple[int, ...] = -1) -> tuple[jax.Array, jax.Array]:
    """Per-row absmax: x (..., K) -> (xq (..., K) in `dtype`, x_scale float32 (..., 1)).

    `dtype` is int8 (round to nearest, ties to even) or float8_e4m3fn / float8_e5m2 (round
    to nearest in fp8; only e4m3 has a W8A8 kernel). `axis` is the axis (or axes) a row
    spans; they are kept as size 1 in x_scale. An all-zero row gets scale 1. A row holding
    NaN or inf gets a NaN or inf scale, so the matmul's epilogue (`* x_scale`) turns its
    output row non-finite, as x @ w would: a diverging run must not come out finite.

    >>> xq, xs = quantize_activations(x)   # x ~= xq * xs
    """
    dtype = jnp.dtype(dtype)
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{dtype=} must be one of {[d.name for d in ACTIVATION_DTYPES]}")
    target = ACTIVATION_DTYPES[dtype]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    # XLA:CPU's max reduction may skip a NaN (seen at K = 1000, not at 512), so ask.
    amax = jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=True), jnp.nan, amax)
    x_scale = jnp.where(amax == 0, jnp.ones_like(amax), amax / target)
    xs = jnp.clip(x / x_scale, -target, target)
    xq = (jnp.round(xs) if dtype == jnp.int8 else xs).astype(dtype)
    return xq, x_scale


def _validate(xq, x_scale, qvalue, scale) -> None:
    if xq.dtype != qvalue.dtype or jnp.dtype(xq.dtype) not in W8A8_DTYPES:
        raise ValueError(f"W8A8 needs int8 or float8_e4m3fn xq and qvalue of the same dtype, "
                         f"got {xq.dtype} and {qvalue.dtype}")
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


def _dot(xq, qvalue) -> jax.Array:
    """Exact int32 for int8, float32 for fp8; returned as float32."""
    acc = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    return lax.dot_general(xq, qvalue, _NT, preferred_element_type=acc).astype(jnp.float32)


def _epilogue(acc, xs2, scale):
    return acc * xs2.astype(jnp.float32) * scale.astype(jnp.float32).T


def quantized_matmul_w8a8_reference(xq, x_scale, qvalue, scale, *, out_dtype=jnp.bfloat16):
    """(xq @ qvalue.T, in int32 or f32) * x_scale * scale.T, in `out_dtype`."""
    _validate(xq, x_scale, qvalue, scale)
    lead = xq.shape[:-1]
    y = _epilogue(_dot(xq.reshape(-1, xq.shape[-1]), qvalue), x_scale.reshape(-1, 1), scale)
    return y.astype(out_dtype).reshape(*lead, qvalue.shape[0])


def _fp8_mma_supported() -> bool:
    """False only when a GPU is attached and it predates fp8 MMA (sm_89)."""
    cc = gpu_compute_capability()
    return cc is None or cc >= (8, 9)


def select_gpu_w8a8_kernel(xq, qvalue, *, gpu_kernel: str | None = None) -> str:
    """Which GPU W8A8 kernel runs: "mosaic" (Mosaic GPU, Hopper 8-bit wgmma) or "triton".

    `gpu_kernel` (else `$JQUANT_GPU_KERNEL`) forces one; otherwise Mosaic GPU on a GPU of
    compute capability >= 9.0 when its shape rules hold (`_mgpu_w8a8.unsupported_reason`),
    else Triton. Off a GPU the default is "triton".
    """
    choice = forced_gpu_kernel(gpu_kernel)
    if choice is not None:
        return choice
    if _is_hopper_or_newer() and _mgpu_reason(xq, qvalue) is None:
        return "mosaic"
    return "triton"


def _mgpu_reason(xq, qvalue) -> str | None:
    """Why the Mosaic GPU W8A8 kernel cannot take xq (..., K) x qvalue (N, K), or None."""
    m = max(1, int(np.prod(xq.shape[:-1])))
    return _mgpu_w8a8.unsupported_reason(m, qvalue.shape[0], xq.shape[-1], xq.dtype)


def can_use_gpu_w8a8(xq, x_scale, qvalue, scale, *, backend: str | None = None,
                     gpu_kernel: str | None = None) -> bool:
    """True when the backend is a GPU and the GPU W8A8 kernel `select_gpu_w8a8_kernel`
    picks (or `gpu_kernel` names) takes these inputs."""
    if _normalize_backend(backend) != "gpu":
        return False
    try:
        _validate(xq, x_scale, qvalue, scale)
    except ValueError:
        return False
    if select_gpu_w8a8_kernel(xq, qvalue, gpu_kernel=gpu_kernel) == "mosaic":
        return _mgpu_reason(xq, qvalue) is None
    return _gpu.TRITON_AVAILABLE and (xq.dtype == jnp.int8 or _fp8_mma_supported())


def can_use_tpu_w8a8(xq, x_scale, qvalue, scale, *, backend: str | None = None) -> bool:
    """True when the backend is a TPU and the TPU W8A8 kernel takes these inputs.

    Both formats (int8 and fp8 e4m3) qualify: fp8 runs as exact bf16 on the MXU, so no
    chip check is made (unlike `can_use_gpu_w8a8`); this has never run on a TPU.
    """
    if _normalize_backend(backend) != "tpu":
        return False
    try:
        _validate(xq, x_scale, qvalue, scale)
    except ValueError:
        return False
    return True


def _tpu_forward(xq2, xs2, qvalue, scale, out_dtype, interpret, block_sizes):
    m, k = xq2.shape
    n = qvalue.shape[0]
    sizes = block_sizes or get_block_sizes("tpu", m)
    # qtype "int8" only selects the unpacked, per-channel byte geometry; the row tiling
    # comes from xq's dtype (int8 and fp8 both pack 32 rows per native tile).
    plan = _tpu.plan_tpu("int8", k, None, m, n, xq2.dtype, sizes,
                         strict=block_sizes is not None)
    if plan.kb_main == 0:
        return _epilogue(_dot(xq2, qvalue), xs2, scale)
    y = _tpu.w8a8_matmul_tpu(xq2[:, :plan.kb_main], xs2, qvalue, scale, plan=plan,
                             out_dtype=jnp.dtype(jnp.float32), interpret=interpret)
    if plan.kb_main < k:
        y = y + _epilogue(_dot(xq2[:, plan.kb_main:], qvalue[:, plan.kb_main:]), xs2, scale)
    return y


def _gpu_forward(xq2, xs2, qvalue, scale, out_dtype, interpret, block_sizes):
    m, k = xq2.shape
    n = qvalue.shape[0]
    sizes = block_sizes or get_block_sizes("gpu", m)
    bm, bn, bk = _gpu.plan_w8a8_gpu(m, n, k, sizes, strict=block_sizes is not None)
    k_main, n_main = k // bk * bk, n // bn * bn
    if k_main == 0 or n_main == 0:
        return _epilogue(_dot(xq2, qvalue), xs2, scale)
    m_pad = -(-m // bm) * bm
    xp = jnp.pad(xq2[:, :k_main], ((0, m_pad - m), (0, 0)))
    xsp = jnp.pad(xs2.reshape(-1).astype(jnp.float32), (0, m_pad - m))
    y = _gpu.w8a8_matmul_gpu(xp, xsp, qvalue, scale.reshape(-1), block_m=bm, block_n=bn,
                             block_k=bk, out_dtype=jnp.dtype(jnp.float32),
                             interpret=interpret)[:m]
    if k_main < k:
        y = y + _epilogue(_dot(xq2[:, k_main:], qvalue[:n_main, k_main:]), xs2,
                          scale[:n_main])
    if n_main < n:
        tail = _epilogue(_dot(xq2, qvalue[n_main:]), xs2, scale[n_main:])
        y = jnp.concatenate([y, tail], axis=1)
    return y


def quantized_matmul_w8a8(xq, x_scale, qvalue, scale, *, out_dtype=jnp.bfloat16,
                          backend: str | None = None, interpret=False,
                          block_sizes: BlockSizes | None = None,
                          gpu_kernel: str | None = None):
    """W8A8 matmul: the backend's kernel (see the module docstring), else the XLA reference.

    Args:
      xq, x_scale: from `quantize_activations` (or any per-row 8-bit scheme): (..., K)
        int8 or float8_e4m3fn, and (..., 1).
      qvalue, scale: the weight (N, K) in xq's dtype and its per-channel scale (N, 1).
      out_dtype: dtype of the result (..., N).
      backend: "tpu", "gpu" / "cuda" run the kernel (int8 or fp8), anything else (e.g.
        "cpu") the reference; default `jax.default_backend()`.
      interpret: run the kernel in Pallas interpret mode (how it is tested on CPU).
      block_sizes: override the default `BlockSizes`; then they must be legal as given.
      gpu_kernel: "mosaic" or "triton" on GPU; default `select_gpu_w8a8_kernel`.

    Raises:
      ValueError: dtypes or shapes break the contract above, explicit block sizes are
        illegal for the backend, or `gpu_kernel="mosaic"` names a kernel that cannot take
        the shapes (K a multiple of 32, N of 8).

    >>> xq, xs = quantize_activations(x)
    >>> y = quantized_matmul_w8a8(xq, xs, q, s, backend="gpu")   # q int8 (N, K), s (N, 1)
    """
    _validate(xq, x_scale, qvalue, scale)
    backend = _normalize_backend(backend)
    lead, k = xq.shape[:-1], xq.shape[-1]
    xq2, xs2 = xq.reshape(-1, k), x_scale.reshape(-1, 1)
    if backend == "gpu" and select_gpu_w8a8_kernel(xq2, qvalue,
                                                   gpu_kernel=gpu_kernel) == "mosaic":
        y = _mgpu_w8a8.w8a8_matmul_mgpu(xq2, xs2, qvalue, scale, out_dtype=jnp.float32,
                                        interpret=interpret, block_sizes=block_sizes)
    elif backend == "gpu":
        y = _gpu_forward(xq2, xs2, qvalue, scale, out_dtype, interpret, block_sizes)
    elif backend == "tpu":
        y = _tpu_forward(xq2, xs2, qvalue, scale, out_dtype, interpret, block_sizes)
    else:
        return quantized_matmul_w8a8_reference(xq, x_scale, qvalue, scale, out_dtype=out_dtype)
    return y.astype(out_dtype).reshape(*lead, qvalue.shape[0])
