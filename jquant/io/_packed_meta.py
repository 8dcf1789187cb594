"""jquant.json of a packed checkpoint: its layout constants, and every parameter's descriptor.

A descriptor is what jquant.json records of a parameter: an array's shape, dtype and the
sha256 of its bytes, or a QArray's static fields (``{"qarray": {...}}``) with a descriptor per
array field (a double-quantized scale nests one more). In layout 2 a parameter's descriptor
also names the file holding its arrays (``"file"``), and each array's descriptor its
``"offsets"``: ``[begin, end)`` bytes in that file. `_check_leaf` checks a parameter against
the config; `_encode` makes its descriptor and the host arrays to store, named as
`_array_descs` names them; `_read_metadata` reads jquant.json back, refusing another format or
an unknown layout version; `_placeholder` turns a descriptor back into the leaf it describes,
with shape-only arrays, and `_fill` puts the read arrays in. `jquant.io.packed` writes and
reads the checkpoint with them.
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

from jquant.arch import LlamaConfig, param_shapes
from jquant.io._safetensors import DTYPE_CODES, dtype_code
from jquant.qarray import QArray
from jquant.vq import VQArray

#: Version of the on-disk layout `jquant.io.packed` writes; bumped on any incompatible change.
#: 1: the arrays in an orbax-checkpoint (read only); 2: in safetensors files, one per part.
LAYOUT_VERSION = 2
READ_LAYOUTS = (1, 2)

FORMAT = "jquant.packed"  # the `format` value in jquant.json
METADATA = "jquant.json"
ARRAYS = "arrays"
PROGRESS = "progress.json"  # in a PackedWriter's unfinished output only, never in a checkpoint
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
RECIPE = "recipe.yaml"
REPORT = "report.json"


# QArray's pytree children and static fields, from the dataclass itself (one source).
_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if not f.metadata.get("static"))
_STATIC_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if f.metadata.get("static"))


def _check_leaf(value, path: str, expected: dict[str, tuple[int, ...]], who: str) -> None:
    """Refuses a parameter the model ``expected`` lacks, of another shape, or holding an array
    a safetensors file cannot store; reads no array data."""
    if path not in expected:
        raise ValueError(
            f"{who}: parameter {path} is not part of the model `config` describes; pass the "
            "config these params were loaded with"
        )
    _check_arrays(value, path, who)
    if tuple(value.shape) != expected[path]:
        raise ValueError(
            f"{who}: parameter {path} has shape {tuple(value.shape)}, but `config` "
            f"implies {expected[path]}"
        )


def _check_arrays(x, name: str, who: str) -> None:
    if isinstance(x, VQArray):
        raise ValueError(f"{who}: parameter {name} is a {x.qtype} VQArray (vector codebooks); "
                         "packed checkpoints do not store vector formats yet: evaluate it in "
                         "memory (jquant.calib.quantize_model, jquant.eval.perplexity)")
    if isinstance(x, QArray):
        for field in _DATA_FIELDS:
            if getattr(x, field) is not None:
                _check_arrays(getattr(x, field), f"{name}.{field}", who)
        return
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise ValueError(
            f"{who}: parameter {name} is a {type(x).__name__}, not an array or a QArray"
        )
    if dtype_code(x.dtype) is None:
        raise ValueError(
            f"{who}: parameter {name} has dtype {np.dtype(x.dtype).name}, which a packed "
            f"checkpoint cannot store (safetensors has no code for it; storable: "
            f"{', '.join(DTYPE_CODES)})"
        )


def _encode(x, name: str) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """A leaf's descriptor for jquant.json (offsets not yet filled in) and its arrays as
    ``[(tensor name, host array)]``: the parameter path for an array, ``path.field`` for a
    QArray's fields (``path.scale.qvalue`` for a double-quantized scale's codes)."""
    if isinstance(x, QArray):
        desc: dict[str, Any] = {
            "qarray": {f: _static_to_json(getattr(x, f)) for f in _STATIC_FIELDS}
        }
        tensors = []
        for field in _DATA_FIELDS:
            value = getattr(x, field)
            if value is None:
                desc[field] = None
            else:
                desc[field], more = _encode(value, f"{name}.{field}")
                tensors += more
        return desc, tensors
    array = np.ascontiguousarray(np.asarray(x))
    desc = {"shape": list(array.shape), "dtype": array.dtype.name, "sha256": _sha256(array)}
    return desc, [(name, array)]


def _sha256(x) -> str:
    """The sha256 of an array's bytes (C order), as `read_packed` recomputes it."""
    flat = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def _array_descs(desc: dict, name: str) -> dict[str, dict]:
    """``{tensor name: array descriptor}`` of a parameter's descriptor (`_encode`'s names)."""
    if "qarray" not in desc:
        return {name: desc}
    out = {}
    for field in _DATA_FIELDS:
        if desc.get(field) is not None:
            out.update(_array_descs(desc[field], f"{name}.{field}"))
    return out


def _static_to_json(value):
    return np.dtype(value).name if isinstance(value, np.dtype) else value


def _to_json(value, what: str, who: str = "save_packed") -> str:
    """JSON text, a dict's first two levels one entry a line (a parameter, a file) and the
    rest compact, so jquant.json reads well."""
    try:
        return _dumps(value, 0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{who}: {what} cannot be written as JSON ({e})") from None


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
        if (d / PROGRESS).is_file():
            raise ValueError(
                f"{d}: an unfinished PackedWriter output (it has {PROGRESS}, no {METADATA}), "
                "not a checkpoint; run the quantization that wrote it again to finish it"
            )
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
    if layout not in READ_LAYOUTS:
        hint = (
            "upgrade jquant"
            if isinstance(layout, int) and layout > LAYOUT_VERSION
            else "re-quantize and save the model with this jquant"
        )
        raise ValueError(
            f"{d}: written by jquant layout {layout} (jquant {meta.get('jquant_version')}); "
            f"this jquant reads layouts {', '.join(map(str, READ_LAYOUTS))} ({hint})"
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
    # .get: a field added later (``perm``) is absent from older files, and None there.
    fields = {f: None if desc.get(f) is None else _placeholder(desc[f], sharding)
              for f in _DATA_FIELDS}  # fmt: skip
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


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return param_shapes(LlamaConfig.from_hf(config))
