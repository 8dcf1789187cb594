"""Damage checks of a packed checkpoint, all made before its arrays are used.

`_check_files` holds the directory to jquant.json's record of it (a missing or resized file,
a file whose bytes no longer hash to its sha256, naming the arrays that changed:
`_changed_arrays`), `_check_paths` the stored parameters to the model the config describes,
and `_check_header` a safetensors file's own header to jquant.json (every tensor's name,
dtype, shape and byte offsets), so no byte is read from where jquant.json does not say an
array is. Every failure is a ValueError naming the directory.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import jax
import numpy as np

from jquant.io import _packed_v1, _safetensors
from jquant.io._packed_meta import ARRAYS, METADATA, _array_descs, _placeholder, _sha256


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_files(
    d: Path, files: dict[str, int], sha256: dict[str, str] | None, hashed=None
) -> None:
    """Checks every file's size, and the sha256 of those in ``hashed`` (all by default)."""
    for name, size in files.items():
        path = d / name
        if not path.is_file():
            raise ValueError(
                f"{d}: file {name} is missing; the checkpoint is incomplete, write it again"
            )
        found = path.stat().st_size
        if found != size:
            raise ValueError(
                f"{d}: file {name} has {found} bytes, {METADATA} says {size}; "
                "the checkpoint is truncated or corrupt, write it again"
            )
    if sha256 is None:
        warnings.warn(
            f"{d}: written without checksums (before jquant recorded them), so damage that "
            "keeps file sizes goes undetected; save it again to add them",
            stacklevel=3,
        )
        return
    for name in files:
        if hashed is not None and name not in hashed:
            continue
        if not isinstance(sha256.get(name), str):
            raise ValueError(
                f"{d}: {METADATA} has no sha256 for file {name}; the checkpoint is corrupt"
            )
        if _file_sha256(d / name) != sha256[name]:
            raise ValueError(
                f"{d}: file {name} does not match its sha256 in {METADATA} (its bytes changed "
                f"after it was written){_changed_arrays(d, name)}; the checkpoint is corrupt, "
                "write it again"
            )


def _changed_arrays(d: Path, name: str) -> str:
    """", changed arrays: ..." naming the arrays of file ``name`` whose bytes no longer hash
    to their sha256 ("its header" when none did), or "" when that cannot be told."""
    if not name.startswith(f"{ARRAYS}/"):
        return ""
    try:
        meta = json.loads((d / METADATA).read_text(encoding="utf-8"))
        if meta["layout_version"] == 1:
            changed = _changed_v1(d, meta["params"])
        else:
            changed = _changed_v2(d, name, meta["params"])
    except Exception:  # the damage may stop the arrays from being read at all
        return ""
    return f", changed arrays: {', '.join(changed[:5])}" if changed else ""


def _changed_v2(d: Path, name: str, params: dict) -> list[str]:
    changed, wanted = [], {}
    for path, desc in params.items():
        if desc.get("file") == name:
            wanted.update(_array_descs(desc, path))
    with open(d / name, "rb") as f:
        for tensor, desc in wanted.items():
            array = _safetensors.read_tensor(f, np.dtype(np.uint8), (-1,), *desc["offsets"])
            if _sha256(array) != desc["sha256"]:
                changed.append(tensor)
    return changed or ["none (the change is in its header)"]


def _changed_v1(d: Path, params: dict) -> list[str]:
    # orbax packs many arrays into one file, so the file alone does not say which changed.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {path: _placeholder(desc, device) for path, desc in params.items()}
    restored = _packed_v1.read_arrays(d, targets)
    changed = []
    for path, desc in params.items():
        for tensor, array_desc in _array_descs(desc, path).items():
            keys = tensor.split(".")[1:]
            array = restored[path]
            for key in keys:
                array = array[key]
            if array_desc.get("sha256") and _sha256(array) != array_desc["sha256"]:
                changed.append(tensor)
    return changed


def _check_paths(d: Path, stored: set[str], model: set[str]) -> None:
    missing, extra = sorted(model - stored), sorted(stored - model)
    if missing or extra:
        raise ValueError(
            f"{d}: the stored parameters do not match the model its config describes "
            f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: "
            f"{', '.join(extra[:3]) or 'none'}); the checkpoint is corrupt"
        )


def _check_header(d: Path, name: str, wanted: dict[str, dict]) -> None:
    """Holds safetensors file ``name``'s header to the array descriptors jquant.json gives it
    (``{tensor name: descriptor}``): the same tensors, dtypes, shapes and offsets, in the file."""
    path = d / name
    try:
        header = _safetensors.read_header(path)
    except ValueError as e:
        raise ValueError(f"{d}: file {name} is not a safetensors file ({e}); the checkpoint "
                         "is corrupt") from None  # fmt: skip
    if set(header) != set(wanted):
        missing, extra = sorted(set(wanted) - set(header)), sorted(set(header) - set(wanted))
        raise ValueError(
            f"{d}: file {name} holds other tensors than {METADATA} lists (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(extra[:3]) or 'none'}); "
            "the checkpoint is corrupt"
        )
    size = path.stat().st_size
    for tensor, desc in wanted.items():
        found = header[tensor]
        said = (np.dtype(desc["dtype"]), tuple(desc["shape"]), tuple(desc["offsets"]))
        got = (found["dtype"], found["shape"], found["offsets"])
        nbytes = said[0].itemsize * int(np.prod(said[1]))
        if got != said or said[2][1] - said[2][0] != nbytes or said[2][1] > size:
            raise ValueError(
                f"{d}: file {name} stores tensor {tensor} as {got[0].name}{list(got[1])} at "
                f"bytes {list(got[2])}, but {METADATA} says {said[0].name}{list(said[1])} at "
                f"bytes {list(said[2])} of the file's {size}; the checkpoint is corrupt"
            )
