"""y = x @ dequantize(W) for weights stored in jquant's packed layout.

The layout (fixed by jquant's `QArray`): a logical (K, N) weight is stored transposed,
contraction axis last.

* `qvalue` (N, Kbytes): int8 / float8 one code per byte; int4, uint4, nf4, mxfp4, nvfp4
  two codes per byte, packed per group: a group of L elements (L rounded up to even with a
  zero code) is L/2 bytes, element j in the low nibble of byte j, element j + L/2 in the
  high nibble.
* `scale` (N, G) and, for uint4 only, `zero_point` (N, G) in the scale's dtype, with
  G = ceil(K / group_size); the last group is short when group_size does not divide K.
  Per-channel is one group: `group_size=None` (or any group_size >= K).
* Identity: w[k, n] = (decode(code[n, k]) - zero_point[n, k // g]) * scale[n, k // g],
  where decode is two's complement for int4, the NF4 codebook for nf4, the FP4 E2M1
  value for mxfp4 and nvfp4, the value itself otherwise. The kernels take float scales
  only (bfloat16, float16, float32): an mxfp4 E8M0 scale or an nvfp4 E4M3-times-tensor
  scale is passed converted to float (as `jquant.ops` does), and the group size is
  whatever the caller gives (mxfp4 is defined with 32, nvfp4 with 16).

`quantized_matmul` picks the Pallas kernel of the backend (`_tpu.py`; on GPU `_mgpu.py`,
Mosaic GPU for Hopper, or `_gpu.py`, Triton lowering, see `select_gpu_kernel`); the part
of K that does not fill whole kernel blocks of whole groups (a short last group, K below
one block) is added by XLA, so every shape gives the reference's answer.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _env, _gpu, _mgpu, _tpu
from ._formats import (
    PACKED_QTYPES,
    QTYPES,
    SCALE_DTYPES,
    STORAGE_DTYPES,
    ZERO_POINT_QTYPES,
    byte_groups,
    code_planes,
    decode,
    dot_nt,
    is_per_channel,
    num_groups,
    packed_k,
    plane_indices,
    planes_dot,
    split_activations,
    split_planes,
)
from .block_sizes import BlockSizes, get_block_sizes

X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
TPU_X_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
TPU_QTYPES = QTYPES
GPU_QTYPES = QTYPES
GPU_KERNELS = ("mosaic", "triton")
GPU_KERNEL_ENV = _env.GPU_KERNEL  # names a GPU kernel to force, see `forced_gpu_kernel`


def validate_inputs(x, qvalue, scale, zero_point, *, qtype: str, k: int,
                    group_size: int | None) -> None:
    """Raise `ValueError` naming the first argument that breaks the storage contract."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown {qtype=}; expected one of {QTYPES}")
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"{k=} must be a positive int")
    if group_size is not None and (not isinstance(group_size, int) or group_size <= 0):
        raise ValueError(f"{group_size=} must be a positive int or None (per-channel)")
    if qtype in PACKED_QTYPES and group_size is not None and group_size < k and group_size % 2:
        raise ValueError(f"{group_size=} must be even for 4-bit {qtype=} (two codes a byte)")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} elements along K (last axis) but {k=}")
    if jnp.dtype(x.dtype) not in X_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} must be one of bfloat16, float16, float32")
    if qvalue.ndim != 2:
        raise ValueError(f"qvalue must be 2-D (N, Kbytes), got shape {qvalue.shape}")
    if qvalue.dtype != STORAGE_DTYPES[qtype]:
        raise ValueError(f"qvalue.dtype={qvalue.dtype} but {qtype=} is stored as "
                         f"{STORAGE_DTYPES[qtype]}")
    kbytes = packed_k(qtype, k, group_size)
    if qvalue.shape[1] != kbytes:
        raise ValueError(f"qvalue has {qvalue.shape[1]} bytes along K but {qtype=} with "
                         f"{k=}, {group_size=} needs {kbytes}")
    expected = (qvalue.shape[0], num_groups(k, group_size))
    if scale.shape != expected:
        raise ValueError(f"scale.shape={scale.shape} must be (N, G)={expected} for {k=}, "
                         f"{group_size=}")
    if jnp.dtype(scale.dtype) not in SCALE_DTYPES:
        raise ValueError(f"scale.dtype={scale.dtype} must be bfloat16, float16 or float32")
    if qtype in ZERO_POINT_QTYPES:
        if zero_point is None:
            raise ValueError(f"{qtype=} needs a zero_point of shape {expected}")
        if zero_point.shape != expected or zero_point.dtype != scale.dtype:
            raise ValueError(f"zero_point {zero_point.shape} {zero_point.dtype} must match "
                             f"scale {scale.shape} {scale.dtype}")
    elif zero_point is not None:
        raise ValueError(f"{qtype=} is symmetric; zero_point must be None")


def dequantize(qvalue, scale, zero_point=None, *, qtype: str, k: int,
               group_size: int | None, dtype=jnp.float32) -> jax.Array:
    """The logical (K, N) weight, written as plainly as possible (the oracle for kernels)."""
    planes = [decode(c, qtype) for c in code_planes(qvalue, qtype)]
    # inverse of plane_indices: element e sits at column inv[e] of concat(planes).
    inv = np.zeros(k + 1, np.int32)
    for p, idx in enumerate(plane_indices(qtype, k, group_size)):
        inv[idx] = p * qvalue.shape[1] + np.arange(idx.size)
    values = jnp.take(jnp.concatenate(planes, axis=1), inv[:k], axis=1)  # (N, K)
    groups = np.zeros(k, np.int32) if is_per_channel(k, group_size) else np.arange(k) // group_size
    if zero_point is not None:
        values = values - jnp.take(zero_point.astype(jnp.float32), groups, axis=1)
    w = values * jnp.take(scale.astype(jnp.float32), groups, axis=1)
    return w.T.astype(dtype)


def quantized_matmul_reference(x, qvalue, scale, zero_point=None, *, qtype: str, k: int,
                               group_size: int | None) -> jax.Array:
    """x (..., K) @ dequantize(W) (K, N): the weight rounded to x.dtype, f32 accumulation.

    >>> y = quantized_matmul_reference(x, q, s, qtype="int8", k=256, group_size=128)
    """
    validate_inputs(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size)
    w = dequantize(qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size,
                   dtype=x.dtype)
    lead = x.shape[:-1]
    y = dot_nt(x.reshape(-1, k), w.T).reshape(*lead, w.shape[1])
    return y.astype(x.dtype)


def _per_byte(a: jax.Array, groups: np.ndarray) -> jax.Array:
    """(N, G) per-group values -> (N, len(groups)) f32, one per byte of the given groups.

    Equal-length groups broadcast (cheap); a short group anywhere needs a gather.
    """
    first, counts = groups[0], np.bincount(groups - groups[0])
    a = a[:, first:first + counts.size].astype(jnp.float32)
    if np.all(counts == counts[0]):
        return jnp.repeat(a, int(counts[0]), axis=1, total_repeat_length=groups.size)
    return jnp.take(a, groups - first, axis=1)


def planes_matmul_xla(x, qvalue, scale, zero_point, *, qtype: str, k: int,
                      group_size: int | None, start: int = 0) -> jax.Array:
    """f32 x (M, K) @ dequantize(W) over bytes [start, Kbytes) of each plane, in XLA.

    With start=0 this is the XLA fallback; with start > 0 it is the tail that kernels
    leave (a short last group, or bytes past the last whole block). It never builds the
    (K, N) weight in element order: it moves x's columns to the weight's byte order.
    """
    if start >= qvalue.shape[1]:
        return jnp.zeros((x.shape[0], qvalue.shape[0]), jnp.float32)
    if start == 0 and qtype in PACKED_QTYPES:  # the whole weight: plane by plane, run by run
        zp = None if zero_point is None else zero_point.astype(jnp.float32)
        return planes_dot(split_planes(x, k, group_size), qvalue, scale.astype(jnp.float32),
                          zp, qtype, dot_nt)
    groups = byte_groups(qtype, k, group_size)[start:]
    s = _per_byte(scale, groups)
    zp = None if zero_point is None else _per_byte(zero_point, groups)
    if start == 0:
        x_planes = split_activations(x, qtype, k, group_size)
    else:
        xpad = jnp.concatenate([x, jnp.zeros((x.shape[0], 1), x.dtype)], axis=1)
        x_planes = [jnp.take(xpad, idx[start:], axis=1)
                    for idx in plane_indices(qtype, k, group_size)]
    y = jnp.zeros((x.shape[0], qvalue.shape[0]), jnp.float32)
    for xp, codes in zip(x_planes, code_planes(qvalue[:, start:], qtype)):
        w = decode(codes, qtype)
        w = ((w if zp is None else w - zp) * s).astype(x.dtype)
        y += dot_nt(xp, w)
    return y


def _normalize_backend(backend: str | None) -> str:
    backend = jax.default_backend() if backend is None else backend
    return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def _kernel_problem(x, qvalue, scale, zero_point, *, qtype, k, group_size,
                    backend: str, gpu_kernel: str = "triton") -> str | None:
    """Why the kernel of `backend` cannot take these inputs, or None if it can."""
    try:
        validate_inputs(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size)
    except ValueError as e:
        return str(e)
    if backend == "tpu":
        if qtype not in TPU_QTYPES:
            return f"{qtype=} has no TPU kernel; supported: {TPU_QTYPES}"
        if jnp.dtype(x.dtype) not in TPU_X_DTYPES:
            return f"x.dtype={x.dtype} has no TPU kernel; use bfloat16 or float32"
        return None
    if backend == "gpu":
        if qtype not in GPU_QTYPES:
            return f"{qtype=} has no GPU kernel; supported: {GPU_QTYPES}"
        if gpu_kernel == "mosaic":
            return _mgpu.unsupported_reason(qtype, k, group_size, x_dtype=x.dtype,
                                            n=qvalue.shape[0])
        return _gpu.unsupported_reason(qtype, k, group_size)
    return f"{backend=} has no Pallas kernel (only 'tpu' and 'gpu')"


@functools.cache
def gpu_compute_capability() -> tuple[int, ...] | None:
    """The attached GPU's compute capability, e.g. (9, 0); None without a GPU (or when
    the runtime does not say). Asked once per process: dispatch calls it per matmul."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        return None
    cc = getattr(devices[0], "compute_capability", None) if devices else None
    try:
        return None if cc is None else tuple(int(v) for v in str(cc).split("."))
    except ValueError:
        return None


def _is_hopper_or_newer() -> bool:
    """True when a GPU is attached and its compute capability is 9.0 or more."""
    cc = gpu_compute_capability()
    return cc is not None and cc >= (9, 0)


def forced_gpu_kernel(gpu_kernel: str | None = None) -> str | None:
    """The GPU kernel that `gpu_kernel`, else `$JQUANT_GPU_KERNEL`, forces; None when
    neither names one. The one reader of that variable, for weight-only and W8A8 alike.

    Raises:
      ValueError: the name is not one of `GPU_KERNELS`.
    """
    if gpu_kernel:
        choice, source = gpu_kernel, "gpu_kernel"
    else:
        choice, source = _env.read(GPU_KERNEL_ENV), f"${GPU_KERNEL_ENV}"
    if choice is not None and choice not in GPU_KERNELS:
        raise ValueError(f"{source}={choice!r} must be one of {GPU_KERNELS}")
    return choice


def select_gpu_kernel(x, qvalue, *, qtype: str, k: int, group_size: int | None,
                      gpu_kernel: str | None = None) -> str:
    """Which GPU kernel runs: "mosaic" (Mosaic GPU, Hopper wgmma) or "triton".

    `gpu_kernel` (else `$JQUANT_GPU_KERNEL`) forces one. Otherwise: Mosaic GPU on a Hopper
    or newer GPU when it takes the problem (bf16/f16 x, its group and shape rules), else
    the Triton-lowered kernel (Ampere and Ada, f32 x, small groups). Off a GPU the default
    is "triton" (what interpret-mode tests of `backend="gpu"` exercise).
    """
    choice = forced_gpu_kernel(gpu_kernel)
    if choice is not None:
        return choice
    if _is_hopper_or_newer() and _mgpu.unsupported_reason(
            qtype, k, group_size, x_dtype=x.dtype, n=qvalue.shape[0]) is None:
        return "mosaic"
    return "triton"


def can_use_tpu_kernel(x, qvalue, scale, zero_point=None, *, qtype: str, k: int,
                       group_size: int | None, backend: str | None = None) -> bool:
    """True when the backend is TPU and the Mosaic kernel takes these inputs."""
    if _normalize_backend(backend) != "tpu":
        return False
    return _kernel_problem(x, qvalue, scale, zero_point, qtype=qtype, k=k,
                           group_size=group_size, backend="tpu") is None


def can_use_gpu_kernel(x, qvalue, scale, zero_point=None, *, qtype: str, k: int,
                       group_size: int | None, backend: str | None = None,
                       gpu_kernel: str | None = None) -> bool:
    """True when the backend is a GPU and the Pallas GPU kernel that `select_gpu_kernel`
    picks (or `gpu_kernel` names) takes these inputs."""
    if _normalize_backend(backend) != "gpu":
        return False
    try:
        validate_inputs(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size)
    except ValueError:
        return False
    impl = select_gpu_kernel(x, qvalue, qtype=qtype, k=k, group_size=group_size,
                             gpu_kernel=gpu_kernel)
    return _kernel_problem(x, qvalue, scale, zero_point, qtype=qtype, k=k,
                           group_size=group_size, backend="gpu", gpu_kernel=impl) is None


class _Config(NamedTuple):
    qtype: str
    k: int
    group_size: int | None
    backend: str
    interpret: Any
    block_sizes: BlockSizes | None
    gpu_kernel: str = "triton"


def _forward(x, qvalue, scale, zero_point, cfg: _Config) -> jax.Array:
    """x (M, K) -> (M, N) in x.dtype: kernel over whole blocks, XLA over the rest."""
    qtype, k, g = cfg.qtype, cfg.k, cfg.group_size
    if cfg.backend not in ("tpu", "gpu"):
        y = planes_matmul_xla(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=g)
        return y.astype(x.dtype)
    m, n = x.shape[0], qvalue.shape[0]
    strict = cfg.block_sizes is not None
    sizes = cfg.block_sizes or get_block_sizes(cfg.backend, m)
    if cfg.backend == "tpu":
        call = _tpu.weight_only_matmul_tpu
        plan = _tpu.plan_tpu(qtype, k, g, m, n, x.dtype, sizes, strict=strict)
    elif cfg.gpu_kernel == "mosaic":
        call = _mgpu.weight_only_matmul_mgpu
        plan = _mgpu.plan_mgpu(qtype, k, g, m, n, sizes, strict=strict)
    else:
        call = _gpu.weight_only_matmul_gpu
        plan = _gpu.plan_gpu(qtype, k, g, m, n, sizes, strict=strict)
    kbytes = qvalue.shape[1]
    if plan.kb_main == 0:  # K smaller than one block: nothing for the kernel to do
        y = planes_matmul_xla(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=g)
        return y.astype(x.dtype)
    has_tail = plan.kb_main < kbytes
    planes = split_activations(x, qtype, k, g, plan.kb_main)
    y = call(planes, qvalue, scale, zero_point, plan=plan, qtype=qtype, k=k, group_size=g,
             out_dtype=jnp.dtype(jnp.float32) if has_tail else jnp.dtype(x.dtype),
             interpret=cfg.interpret)
    if has_tail:
        y = y + planes_matmul_xla(x, qvalue, scale, zero_point, qtype=qtype, k=k,
                                  group_size=g, start=plan.kb_main)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _quantized_matmul_2d(x, qvalue, scale, zero_point, cfg: _Config):
    return _forward(x, qvalue, scale, zero_point, cfg)


def _fwd(x, qvalue, scale, zero_point, cfg):
    return _forward(x, qvalue, scale, zero_point, cfg), (x, qvalue, scale, zero_point)


def _bwd(cfg, residuals, dy):
    """Gradients through the reference (XLA): exact for x, scale and zero point."""
    x, qvalue, scale, zero_point = residuals

    def ref(x, scale, zero_point):
        return quantized_matmul_reference(x, qvalue, scale, zero_point, qtype=cfg.qtype,
                                          k=cfg.k, group_size=cfg.group_size)

    _, vjp = jax.vjp(ref, x, scale, zero_point)
    dx, dscale, dzp = vjp(dy)
    return dx, np.zeros(qvalue.shape, jax.dtypes.float0), dscale, dzp


_quantized_matmul_2d.defvjp(_fwd, _bwd)


def quantized_matmul(x, qvalue, scale, zero_point=None, *, qtype: str, k: int,
                     group_size: int | None, backend: str | None = None,
                     interpret: Any = False, block_sizes: BlockSizes | None = None,
                     gpu_kernel: str | None = None):
    """x (..., K) @ dequantize(W), W stored as described in this module's docstring.

    Args:
      x: activations (..., K), bfloat16 / float16 / float32; the result has x's dtype.
      qvalue, scale, zero_point: the packed weight (see module docstring).
      qtype: "int8", "int4", "uint4", "nf4", "mxfp4", "nvfp4", "fp8_e4m3" or "fp8_e5m2".
      k: logical K (needed because 4-bit storage rounds odd groups up).
      group_size: elements per scale along K; None for per-channel.
      backend: "tpu" or "gpu" run the Pallas kernel, anything else (e.g. "cpu") the XLA
        path; default `jax.default_backend()`.
      interpret: run the kernel in Pallas interpret mode (True, or a
        `pltpu.InterpretParams` for TPU / an `InterpretGPUParams` for Mosaic GPU), which
        is how it is tested on CPU.
      block_sizes: override the default `BlockSizes`; then they must be legal as given.
      gpu_kernel: "mosaic" (Mosaic GPU, Hopper) or "triton"; default `select_gpu_kernel`
        (Mosaic GPU on Hopper+ where it applies, else Triton).

    Raises:
      ValueError: inputs break the storage contract, or the backend's kernel cannot take
        this qtype / dtype (check `can_use_tpu_kernel` / `can_use_gpu_kernel` first).

    >>> y = quantized_matmul(x, q, s, qtype="int4", k=4096, group_size=128, backend="tpu")
    """
    backend = _normalize_backend(backend)
    impl = "triton"
    if backend in ("tpu", "gpu"):
        validate_inputs(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size)
        if backend == "gpu":
            impl = select_gpu_kernel(x, qvalue, qtype=qtype, k=k, group_size=group_size,
                                     gpu_kernel=gpu_kernel)
        problem = _kernel_problem(x, qvalue, scale, zero_point, qtype=qtype, k=k,
                                  group_size=group_size, backend=backend, gpu_kernel=impl)
        if problem is not None:
            raise ValueError(problem)
    else:
        validate_inputs(x, qvalue, scale, zero_point, qtype=qtype, k=k, group_size=group_size)
    if isinstance(interpret, bool) or interpret is None:
        interpret = bool(interpret)
    cfg = _Config(qtype, k, group_size, backend, interpret, block_sizes, impl)
    lead = x.shape[:-1]
    y = _quantized_matmul_2d(x.reshape(-1, k), qvalue, scale, zero_point, cfg)
    return y.reshape(*lead, qvalue.shape[0])
