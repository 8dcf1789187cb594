"""Reading layout 1 of a packed checkpoint: its arrays in an orbax-checkpoint under ``arrays/``.

jquant no longer writes this layout (`jquant.io.packed` writes layout 2: safetensors files);
checkpoints written before still load. orbax stores the arrays nested by parameter path, a
QArray as ``{qvalue, scale, zero_point}`` with None fields left out; `read_arrays` restores
them from shape placeholders after `_compare` has held orbax's own record of every array to
jquant.json (orbax would silently cast a dtype). Every failure is a ValueError naming the
directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jquant.io._packed_meta import _DATA_FIELDS, ARRAYS, METADATA
from jquant.qarray import QArray


def read_arrays(d: Path, targets: dict) -> dict[str, dict | object]:
    """``{parameter path: arrays}`` (a QArray's as ``{field: array}``) for the placeholder
    leaves ``targets`` (``{path: placeholder}``), restored from ``d/arrays``."""
    abstract = {}
    for path, target in targets.items():
        _nest(abstract, tuple(path.split("/")), _as_field_dicts(target))
    restored = _restore(d, abstract)
    return {path: _get(restored, tuple(path.split("/"))) for path in targets}


def _restore(d: Path, abstract: dict) -> dict:
    import orbax.checkpoint as ocp  # ~2 s to import: only when a layout-1 checkpoint is read

    path = (d / ARRAYS).absolute()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        try:
            stored = ckptr.metadata(path).item_metadata.tree
        except Exception as e:  # orbax raises many types for a damaged directory
            raise ValueError(
                f"{d}: cannot read {ARRAYS}/ ({_brief(e)}); the checkpoint is truncated or corrupt"
            ) from None
        _compare(d, stored, abstract, ())
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            return ckptr.restore(
                path, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
            )
        except Exception as e:
            raise ValueError(
                f"{d}: cannot restore the arrays ({_brief(e)}); the checkpoint "
                "is truncated or corrupt"
            ) from None


def _brief(e: Exception) -> str:
    """The first line of an error, without the TensorStore spec it ends with, <= 200 chars."""
    line = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore details")[0]
    line = line if len(line) <= 200 else line[:200] + "..."
    return f"{type(e).__name__}: {line}"


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


def _as_field_dicts(leaf):
    """A placeholder leaf as orbax stores it: a QArray as ``{field: ...}``, None fields left out."""
    if isinstance(leaf, QArray):
        return {
            f: _as_field_dicts(getattr(leaf, f))
            for f in _DATA_FIELDS
            if getattr(leaf, f) is not None
        }
    return leaf


def _nest(tree: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(keys[-1])] = value


def _get(tree: dict, keys: tuple):
    for key in keys:
        tree = tree[str(key)]
    return tree
