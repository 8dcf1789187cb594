"""Reading layout 2 of a packed checkpoint: its arrays in safetensors files under ``arrays/``.

`read_file` reads some parameters of one file, after holding the file's header to the
descriptors jquant.json (or a `PackedWriter`'s progress.json) gives its parameters: every
array is read from the offsets those record, with plain reads into a fresh buffer, then put
on the device; nothing of the file stays mapped. Every failure is a ValueError naming the
directory.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jquant.io import _safetensors
from jquant.io._packed_check import _check_header
from jquant.io._packed_meta import ARRAYS, METADATA, _abstract, _array_descs, _fill


def read_file(d: Path, file: str, params: dict, paths: set[str], raw: bool = False) -> dict:
    """The parameters ``paths`` of safetensors ``file``, whose parameters jquant.json
    describes as ``params``, after checking its header against all of them; each as its
    leaf, or (``raw``) as the arrays `_fill` puts into the leaf."""
    if not file.startswith(f"{ARRAYS}/") or ".." in file.split("/"):
        raise ValueError(f"{d}: {METADATA} names file {file} outside {ARRAYS}/; it is corrupt")
    wanted = {}
    for path, desc in params.items():
        wanted.update(_array_descs(desc, path))
    _check_header(d, file, wanted)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    out = {}
    with open(d / file, "rb") as f:
        for path in sorted(paths):
            arrays = _read_leaf(f, params[path], device)
            out[path] = arrays if raw else _fill(_abstract(d, params[path], path, device), arrays)
    return out


def _read_leaf(f, desc: dict, device):
    """A descriptor's arrays read from ``f``: an array, or a QArray's ``{field: arrays}``."""
    if "qarray" in desc:
        return {field: _read_leaf(f, value, device) for field, value in desc.items()
                if field not in ("qarray", "file") and value is not None}  # fmt: skip
    array = _safetensors.read_tensor(
        f, jnp.dtype(desc["dtype"]), tuple(desc["shape"]), *desc["offsets"]
    )
    return jax.device_put(array, device)
