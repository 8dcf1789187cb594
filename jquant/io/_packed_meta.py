"""jquant.json of a packed checkpoint: its layout constants, and every parameter's descriptor.

A descriptor is what jquant.json records of a parameter: an array's shape, dtype and the
sha256 of its bytes, or a QArray's static fields (``{"qarray": {...}}``) with a descriptor per
array field (a double-quantized scale nests one more). `_encode_params` checks the parameters
against the config and writes the descriptors; `_read_metadata` reads jquant.json back, refusing
another format or layout version; `_placeholder` turns a descriptor back into the leaf it
describes, with shape-only arrays, and `_fill` puts the restored arrays in. `jquant.io.packed`
writes and reads the checkpoint with them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.arch import LlamaConfig, param_shapes
from jquant.qarray import QArray
from jquant.tree import unwrap

#: Version of the on-disk layout `jquant.io.packed` writes and reads; bumped on any incompatible
#: change.
LAYOUT_VERSION = 1

FORMAT = "jquant.packed"  # the `format` value in jquant.json
METADATA = "jquant.json"
ARRAYS = "arrays"


# QArray's pytree children and static fields, from the dataclass itself (one source).
_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if not f.metadata.get("static"))
_STATIC_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if f.metadata.get("static"))


def _encode_params(params: nnx.State, config: dict[str, Any]) -> tuple[dict, dict]:
    """``({path: descriptor}, nested array tree)``, after checking params against config."""
    expected = _expected_shapes(config)
    names, tree = {}, {}
    for keys, var in nnx.to_flat_state(params):
        path = "/".join(map(str, keys))
        value = unwrap(var)
        desc, arrays = _encode(value, path)
        shape = tuple(value.shape)
        if path not in expected:
            raise ValueError(
                f"save_packed: parameter {path} is not part of the model `config`"
                " describes; pass the config these params were loaded with"
            )
        if shape != expected[path]:
            raise ValueError(
                f"save_packed: parameter {path} has shape {shape}, but `config` "
                f"implies {expected[path]}"
            )
        names[path] = desc
        _nest(tree, keys, arrays)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise ValueError(
            f"save_packed: params lack {len(missing)} parameter(s) of the model, "
            f"e.g. {', '.join(missing[:3])}"
        )
    return names, tree


def _encode(x, name: str) -> tuple[dict, Any]:
    """A leaf's descriptor for jquant.json and its arrays (a QArray becomes a dict of fields)."""
    if isinstance(x, QArray):
        desc: dict[str, Any] = {
            "qarray": {f: _static_to_json(getattr(x, f)) for f in _STATIC_FIELDS}
        }
        arrays = {}
        for field in _DATA_FIELDS:
            value = getattr(x, field)
            if value is None:
                desc[field] = None
            else:
                desc[field], arrays[field] = _encode(value, f"{name}.{field}")
        return desc, arrays
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(
            f"save_packed: parameter {name} is a {type(x).__name__}, not an array or a QArray"
        )
    return {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name, "sha256": _sha256(x)}, x


def _sha256(x) -> str:
    """The sha256 of an array's bytes (C order), as `read_packed` recomputes it."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _static_to_json(value):
    return np.dtype(value).name if isinstance(value, np.dtype) else value


def _nest(tree: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(keys[-1])] = value


def _to_json(value, what: str) -> str:
    """JSON text, a dict's first two levels one entry a line (a parameter, a file) and the
    rest compact, so jquant.json reads well."""
    try:
        return _dumps(value, 0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_packed: {what} cannot be written as JSON ({e})") from None


def _dumps(value, depth: int) -> str:
    if isinstance(value, dict) and value and depth < 2:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(value, default=_plain)


def _plain(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON-serializable")


def _read_metadata(d: Path) -> dict[str, Any]:
    if not d.is_dir():
        raise ValueError(f"{d}: no such directory")
    path = d / METADATA
    if not path.is_file():
        if (d / ARRAYS).is_dir():
            raise ValueError(
                f"{d}: {METADATA} is missing, so the packed checkpoint is "
                "incomplete (an interrupted copy?); write it again"
            )
        raise ValueError(f"{d}: not a jquant packed checkpoint (no {METADATA})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{d}: {METADATA} is not valid JSON ({e}); the checkpoint is truncated or corrupt"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(
            f"{d}: {METADATA} is not a jquant packed checkpoint's metadata "
            f"(its format is not {FORMAT!r})"
        )
    layout = meta.get("layout_version")
    if layout != LAYOUT_VERSION:
        hint = (
            "upgrade jquant"
            if isinstance(layout, int) and layout > LAYOUT_VERSION
            else "re-quantize and save the model with this jquant"
        )
        raise ValueError(
            f"{d}: written by jquant layout {layout} (jquant {meta.get('jquant_version')}); "
            f"this jquant reads layout {LAYOUT_VERSION} ({hint})"
        )
    kinds = {"config": dict, "params": dict, "tokenizer": (dict, type(None)), "files": dict,
             "sha256": (dict, type(None))}  # fmt: skip; sha256: None before checksums
    bad = [k for k, kind in kinds.items() if not isinstance(meta.get(k), kind)]
    if bad:
        raise ValueError(
            f"{d}: {METADATA} lacks a valid {', '.join(bad)}; the checkpoint is corrupt"
        )
    return meta


def _abstract(d: Path, desc, name: str, sharding):
    """A descriptor as the leaf it describes, with ShapeDtypeStruct arrays (no memory)."""
    try:
        return _placeholder(desc, sharding)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{d}: {METADATA} describes parameter {name} badly ({e!r}); the checkpoint is corrupt"
        ) from None


def _placeholder(desc: dict, sharding):
    if "qarray" not in desc:
        shape = tuple(int(n) for n in desc["shape"])
        return jax.ShapeDtypeStruct(shape, jnp.dtype(desc["dtype"]), sharding=sharding)
    static = dict(desc["qarray"])
    if set(static) != set(_STATIC_FIELDS):
        raise ValueError(f"QArray fields {sorted(static)}, expected {sorted(_STATIC_FIELDS)}")
    static["dtype"] = jnp.dtype(static["dtype"])
    fields = {f: None if desc[f] is None else _placeholder(desc[f], sharding) for f in _DATA_FIELDS}
    return QArray(**fields, **static)


def _fill(target, arrays):
    """``target`` (a placeholder leaf) with the restored ``arrays`` in its place."""
    if not isinstance(target, QArray):
        return arrays
    fields = {
        f: _fill(getattr(target, f), arrays[f])
        for f in _DATA_FIELDS
        if getattr(target, f) is not None
    }
    return dataclasses.replace(target, **fields)


def _as_field_dicts(leaf):
    """A placeholder leaf as orbax stores it: a QArray as ``{field: ...}``, None fields left out
    (the nesting `_encode` writes)."""
    if isinstance(leaf, QArray):
        return {
            f: _as_field_dicts(getattr(leaf, f))
            for f in _DATA_FIELDS
            if getattr(leaf, f) is not None
        }
    return leaf


def _get(tree: dict, keys: tuple):
    for key in keys:
        tree = tree[str(key)]
    return tree


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return param_shapes(LlamaConfig.from_hf(config))
