"""The one reader of the environment in ``kernels`` (which never imports jquant; the
variables are documented with jquant's own in `jquant.settings`)."""

from __future__ import annotations

import os

GPU_KERNEL = "JQUANT_GPU_KERNEL"  # names a GPU kernel to force, see `forced_gpu_kernel`
DISPATCH_TABLE = "JQUANT_DISPATCH_TABLE"  # a dispatch-table JSON that updates the shipped one


def read(name: str) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    if name not in (GPU_KERNEL, DISPATCH_TABLE):
        raise ValueError(f"kernels reads no variable {name!r}; add it to kernels/_env.py")
    return os.environ.get(name) or None
