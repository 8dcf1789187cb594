"""Which path a `PagedView`'s attention takes: the paged-attention kernel or XLA.

The path is ``"auto"``, ``"xla"`` or ``"kernel"``, as for matmuls (`jquant._dispatch`):
``set_attention_path`` sets it, else the ``JQUANT_ATTENTION`` environment variable, else
``"auto"``. A `PagedView` reads it when its forward is traced unless it was given one;
a `jquant.serve.runner.Runner` reads it once, when it is made, and its programs keep it.

* ``"auto"`` runs `jquant.kernels.paged_attention` only on a TPU or GPU, only where the
  kernel takes the inputs, and only for as many query tokens per row (``S``: 1 at decode,
  the chunk at prefill) as a **measured** dispatch table's ``(backend, "paged_attention")``
  entry allows (`jquant.kernels.dispatch_table`). None ships, the kernels having run in
  interpret mode only, so "auto" is XLA everywhere until one is measured and installed.
* ``"xla"`` gathers each row's pages and runs `jquant.models.attention.attend`.
* ``"kernel"`` runs the kernel or raises ValueError. On CPU it runs the TPU kernel in
  Pallas interpret mode: slow, but the same dispatch and kernel code as on the device,
  which is how this is tested without one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jquant import kernels, settings
from jquant.kernels.paged_attention import unsupported_reason

ATTENTION_PATHS = ("auto", "xla", "kernel")
_attention_path: str | None = None


def set_attention_path(path: str | None) -> str | None:
    """Chooses how paged attention runs: ``"auto"``, ``"xla"`` or ``"kernel"``.

    ``None`` clears the choice (back to ``$JQUANT_ATTENTION``, else ``"auto"``).
    Process-wide, read at trace time and not part of JAX's jit cache key: the rule of
    `jquant.ops.set_matmul_path`. A `Runner` made after the call uses the new path.

    Returns:
      The previous setting, so a caller can restore it.

    >>> old = set_attention_path("kernel"); attention_path()
    'kernel'
    >>> _ = set_attention_path(old)
    """
    global _attention_path
    _check(path, "set_attention_path")
    old, _attention_path = _attention_path, path
    return old


def _check(path: str | None, source: str) -> None:
    if path is not None and path not in ATTENTION_PATHS:
        raise ValueError(f"{source}: unknown attention path {path!r}; use one of "
                         f"{ATTENTION_PATHS}")


def attention_path() -> str:
    """The path in effect: ``set_attention_path``'s, else ``$JQUANT_ATTENTION``, else auto."""
    path = _attention_path or settings.attention_path() or "auto"
    _check(path, "JQUANT_ATTENTION")
    return path


class AttentionKernel(NamedTuple):
    """The paged-attention kernel a forward runs."""

    backend: str  # "tpu" or "gpu": whose kernel
    interpret: bool  # Pallas interpret mode (the forced path on CPU)


def paged_attention_kernel(path: str | None, *, tokens: int, dtype, page_size: int,
                           head_dim: int) -> AttentionKernel | None:  # fmt: skip
    """The kernel for queries of ``dtype``, ``tokens`` per row, over pages of
    ``page_size`` x ``head_dim``; None for XLA. ``path`` None: `attention_path()`.

    Raises:
      ValueError: the path is ``"kernel"`` and no kernel takes these inputs.
    """
    path = attention_path() if path is None else path
    _check(path, "attention path")
    if path == "xla":
        return None
    forced = path == "kernel"
    backend = kernels.normalize_backend(None)
    if backend in ("tpu", "gpu"):
        problem = unsupported_reason(dtype, page_size, head_dim, backend)
        if problem is None and (forced or kernels.prefer_kernel(backend, "paged_attention",
                                                                tokens)):
            return AttentionKernel(backend, False)
    elif forced:
        problem = unsupported_reason(dtype, page_size, head_dim, "tpu")
        if backend == "cpu" and problem is None:
            return AttentionKernel("tpu", True)
        problem = problem or f"no paged-attention kernel runs on {backend!r}"
    if forced:
        raise ValueError(f"attention path is 'kernel' but the paged-attention kernel cannot "
                         f"take {jnp.dtype(dtype).name} queries over pages of {page_size} x "
                         f"{head_dim}: {problem}; use set_attention_path('auto')")
    return None
