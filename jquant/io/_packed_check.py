"""Damage checks of a packed checkpoint, all made before its arrays are used.

`_file_sizes` and `_file_sha256` record what `jquant.io.packed.save_packed` wrote;
`_check_files` holds the directory to that record (a missing or resized file, a file whose
bytes no longer hash to its sha256, naming the arrays that changed where they can still be
restored: `_changed_arrays`), `_check_paths` the stored parameters to the model the config
describes, and `_compare` orbax's own record of every array to jquant.json (orbax would
silently cast a dtype). Every failure is a ValueError naming the directory.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import jax
import numpy as np

from jquant.io._packed_meta import (
    _DATA_FIELDS,
    ARRAYS,
    METADATA,
    _as_field_dicts,
    _get,
    _nest,
    _placeholder,
    _sha256,
)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _file_sizes(directory: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``directory``, to detect truncation."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _check_files(d: Path, files: dict[str, int], sha256: dict[str, str] | None) -> None:
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
    """", changed arrays: ..." when ``name`` holds arrays and they can still be restored and
    hashed (orbax packs many arrays into one file, so the file alone does not say which)."""
    if not name.startswith(f"{ARRAYS}/"):
        return ""
    from jquant.io.packed import _read_arrays  # the reader, which imports this module

    try:
        meta = json.loads((d / METADATA).read_text(encoding="utf-8"))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        wanted, abstract = {}, {}
        for path, desc in meta["params"].items():
            target = _placeholder(desc, device)
            wanted.update(_array_hashes(desc, path.replace("/", ".")))
            _nest(abstract, tuple(path.split("/")), _as_field_dicts(target))
        restored = _read_arrays(d, abstract)
    except Exception:  # the damage may stop the arrays from restoring at all
        return ""
    changed = [
        key for key, digest in wanted.items()
        if _sha256(_get(restored, tuple(key.split(".")))) != digest
    ]  # fmt: skip
    return f", changed arrays: {', '.join(changed[:5])}" if changed else ""


def _array_hashes(desc: dict, name: str) -> dict[str, str]:
    """``{dotted array name: sha256}`` of a descriptor's arrays that record one."""
    if "qarray" not in desc:
        return {name: desc["sha256"]} if desc.get("sha256") else {}
    out = {}
    for field in _DATA_FIELDS:
        if desc.get(field) is not None:
            out.update(_array_hashes(desc[field], f"{name}.{field}"))
    return out


def _check_paths(d: Path, stored: set[str], model: set[str]) -> None:
    missing, extra = sorted(model - stored), sorted(stored - model)
    if missing or extra:
        raise ValueError(
            f"{d}: the stored parameters do not match the model its config describes "
            f"(missing: {', '.join(missing[:3]) or 'none'}; unexpected: "
            f"{', '.join(extra[:3]) or 'none'}); the checkpoint is corrupt"
        )


def _compare(d: Path, stored, wanted, keys: tuple) -> None:
    """Checks orbax's own record of every array against jquant.json (restore would cast)."""
    name = ".".join(keys) or ARRAYS
    if isinstance(wanted, dict):
        if not isinstance(stored, dict) or set(stored) != set(wanted):
            found = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
            raise ValueError(
                f"{d}: {ARRAYS}/ holds {found} under {name}, {METADATA} lists "
                f"{sorted(wanted)}; the checkpoint is corrupt"
            )
        for k in wanted:
            _compare(d, stored[k], wanted[k], (*keys, k))
        return
    found = (tuple(getattr(stored, "shape", ())), np.dtype(getattr(stored, "dtype", None)))
    if found != (tuple(wanted.shape), np.dtype(wanted.dtype)):
        raise ValueError(
            f"{d}: array {name} is stored as {found[1].name}{list(found[0])}, but {METADATA} "
            f"says {np.dtype(wanted.dtype).name}{list(wanted.shape)}; the checkpoint is corrupt"
        )
