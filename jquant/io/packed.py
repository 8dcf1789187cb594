"""The packed checkpoint: a quantized model saved as it runs, and loaded without float weights.

A packed checkpoint is a directory::

    jquant.json          metadata: format marker, layout version, jquant version, the HF-style
                         model config, every parameter's arrays (shape, dtype) by path, every
                         QArray's static fields (a double-quantized scale nests one more), the
                         tokenizer's special ids, and the size and sha256 of every other
                         file (``files``, ``sha256``); every array's descriptor carries the
                         sha256 of its bytes too
    arrays/              orbax-checkpoint of the arrays, nested by parameter path; a QArray
                         leaf becomes {qvalue, scale, zero_point} (its codes stay packed)
    tokenizer.json       the `tokenizers` backend, if the model has a tokenizer
    chat_template.jinja  its chat template, if it has one
    recipe.yaml          the recipe that quantized it (`Recipe.to_yaml`), if given
    report.json          what quantization reported (errors, time, bits/weight), if given

The arrays are stored uncompressed, so an int4 g128 kernel takes its in-memory 4.125 bits per
weight on disk too (plus ~1 KB of orbax metadata per array). `read_packed` restores the arrays
from shape placeholders straight into QArrays, on the first local device: no float copy of a
quantized weight is ever made. It returns ``{parameter path: array or QArray}``; building the
model is `jquant.models.load_packed`'s part (this module never imports `jquant.models`).

Damage is caught before any array is read: a missing or resized file, a file whose bytes no
longer hash to the recorded sha256 (a same-size overwrite, a flipped bit; the error names the
file and, where the arrays can still be restored, which arrays changed), or an array whose
shape or dtype orbax records differently from jquant.json (orbax would silently cast the
dtype). Hashing reads every file once (about 1 s per GB). A checkpoint written before
checksums were recorded still loads, with a warning that its damage cannot be detected.

Writing is atomic: everything goes into a temporary sibling directory that is renamed into
place at the end, so an error or Ctrl-C leaves nothing half-written (and, with
``overwrite=True``, the old checkpoint intact). A crash of the whole process (SIGKILL, power
loss) can leave a hidden ``.NAME.tmp-*`` sibling behind, never a partial ``NAME``.

>>> qparams = jquant.quantize(params, "w4a16-rtn-g128")  # doctest: +SKIP
>>> save_packed("out/smollm2-w4", config=config, params=qparams, tokenizer=tok)  # doctest: +SKIP
>>> arrays, tok, config = read_packed("out/smollm2-w4")  # doctest: +SKIP
>>> model, qparams, tok, config = jquant.models.load_packed("out/smollm2-w4")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.arch import LlamaConfig, param_shapes
from jquant.qarray import QArray

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer
    from jquant.recipe import Recipe

#: Version of the on-disk layout this module writes and reads; bumped on any incompatible change.
LAYOUT_VERSION = 1

FORMAT = "jquant.packed"  # the `format` value in jquant.json
METADATA = "jquant.json"
ARRAYS = "arrays"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
RECIPE = "recipe.yaml"
REPORT = "report.json"

# QArray's pytree children and static fields, from the dataclass itself (one source).
_DATA_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if not f.metadata.get("static"))
_STATIC_FIELDS = tuple(f.name for f in dataclasses.fields(QArray) if f.metadata.get("static"))


def is_packed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a packed checkpoint (perhaps a damaged one).

    True when it holds ``jquant.json`` or an ``arrays/`` folder, so that `load_packed`, not an
    HF importer, explains what is wrong with an incomplete one.
    """
    d = Path(directory).expanduser()
    return (d / METADATA).is_file() or (d / ARRAYS).is_dir()


# ---- saving -----------------------------------------------------------------------------


def check_output_directory(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The absolute target of `save_packed`, after refusing a file or (without
    ``overwrite``) a non-empty directory; callers run it before slow work."""
    target = Path(os.path.abspath(os.path.expanduser(directory)))  # "." and ".." resolved
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; give a directory to write the checkpoint into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"{target} exists and is not empty; pass overwrite=True (--overwrite) to replace "
            "it, or choose another directory"
        )
    return target


def save_packed(
    directory: str | os.PathLike,
    *,
    config: dict[str, Any],
    params: nnx.State,
    tokenizer: Tokenizer | None = None,
    recipe: Recipe | None = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a (quantized) model as a packed checkpoint, atomically.

    Args:
      directory: where to write; it must not exist, or be an empty directory, unless
        ``overwrite``. Missing parent directories are created.
      config: the HF-style config dict (what ``jquant.models.load(..., with_config=True)``
        returns); ``params`` must be this architecture's.
      params: the parameter ``nnx.State``, leaves float arrays or QArrays (e.g.
        ``jquant.quantize(params, recipe)``); stored as they are, dtypes included.
      tokenizer: a `jquant.io.Tokenizer`, or None.
      recipe: the `jquant.Recipe` that quantized ``params``, or None; kept as YAML.
      report: JSON-able notes on the quantization (per-layer errors, time, bits/weight), or None.
      overwrite: replace an existing non-empty ``directory``; the old one stays intact if
        writing fails.

    Returns:
      The checkpoint's path.

    Raises:
      ValueError: ``directory`` is a file or a non-empty directory (without ``overwrite``),
        ``params`` do not match ``config``, or ``config`` / ``report`` is not JSON-able.
    """
    target = check_output_directory(directory, overwrite=overwrite)
    names, tree = _encode_params(params, config)
    tok_meta = None if tokenizer is None else _tokenizer_meta(tokenizer)
    meta = {
        "format": FORMAT,
        "layout_version": LAYOUT_VERSION,
        "jquant_version": _jquant_version(),
        "config": config,
        "params": names,
        "tokenizer": tok_meta,
    }
    _to_json(meta, "config")  # fail on a bad config before touching the disk
    report_text = None if report is None else _to_json(report, "report")

    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 would become the checkpoint's mode after the rename.
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_arrays(tmp / ARRAYS, tree)
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer)
        if recipe is not None:
            (tmp / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
        if report_text is not None:
            (tmp / REPORT).write_text(report_text, encoding="utf-8")
        meta["files"] = _file_sizes(tmp)
        meta["sha256"] = {name: _file_sha256(tmp / name) for name in meta["files"]}
        (tmp / METADATA).write_text(_to_json(meta, "metadata"), encoding="utf-8")
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _encode_params(params: nnx.State, config: dict[str, Any]) -> tuple[dict, dict]:
    """``({path: descriptor}, nested array tree)``, after checking params against config."""
    expected = _expected_shapes(config)
    names, tree = {}, {}
    for keys, var in nnx.to_flat_state(params):
        path = "/".join(map(str, keys))
        value = var.get_value() if isinstance(var, nnx.Variable) else var
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


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _static_to_json(value):
    return np.dtype(value).name if isinstance(value, np.dtype) else value


def _nest(tree: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(str(key), {})
    tree[str(keys[-1])] = value


def _write_arrays(path: Path, tree: dict) -> None:
    ocp = _orbax()
    # Synchronous, so nothing is still writing once save_packed returns or fails; uncompressed,
    # so the files hold the QArray layout byte for byte (zstd would save ~10% on 4-bit codes,
    # at the cost of decoding on every load and sizes no longer saying what is stored).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(tree))


def _tokenizer_meta(tokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "chat_template": tokenizer.chat_template is not None,
        "add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
    }


def _write_tokenizer(directory: Path, tokenizer) -> None:
    tokenizer.backend.save(str(directory / TOKENIZER))
    if tokenizer.chat_template is not None:
        (directory / CHAT_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")


def _file_sizes(directory: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``directory``, to detect truncation."""
    return {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _commit(tmp: Path, target: Path) -> None:
    """Renames the finished ``tmp`` to ``target``, swapping out an old checkpoint last."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:  # Ctrl-C between the renames too: put the old one back
        if old.exists() and not target.exists():
            os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


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


# ---- loading ----------------------------------------------------------------------------


def read_packed(
    directory: str | os.PathLike,
) -> tuple[dict[str, Any], Tokenizer | None, dict[str, Any]]:
    """Reads a packed checkpoint's arrays, quantized weights straight into QArrays.

    `jquant.models.load_packed` (and `jquant.models.load`) build the model around them.

    Args:
      directory: a directory `save_packed` wrote.

    Returns:
      ``(arrays, tokenizer, config)``: ``{parameter path: array or QArray}`` (paths like
      ``layers/0/mlp/up_proj/kernel``, dtypes as stored, on the first local device), the
      `jquant.io.Tokenizer` (or None) and the HF-style config dict.

    Raises:
      ValueError: naming the directory, when it is not a packed checkpoint, was written in
        another layout version, or is truncated or corrupt (missing or short files, a file
        whose sha256 differs from the one recorded, naming the file and the arrays that
        changed, arrays whose shape or dtype disagree with jquant.json).
    """
    d = Path(directory).expanduser()
    meta = _read_metadata(d)
    _check_files(d, meta["files"], meta.get("sha256"))
    config = meta["config"]
    try:
        expected = _expected_shapes(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d}: the model config in {METADATA} is unusable ({e})") from None
    _check_paths(d, set(meta["params"]), set(expected))

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets, abstract = {}, {}
    for path, desc in meta["params"].items():
        target = _abstract(d, desc, path, device)
        if tuple(target.shape) != expected[path]:
            raise ValueError(
                f"{d}: parameter {path} has shape {tuple(target.shape)} in "
                f"{METADATA}, but the config implies {expected[path]}; the checkpoint is corrupt"
            )
        targets[path] = target
        _nest(abstract, tuple(path.split("/")), _as_field_dicts(target))
    arrays = _read_arrays(d, abstract)
    params = {
        path: _fill(target, _get(arrays, tuple(path.split("/"))))
        for path, target in targets.items()
    }
    return params, _read_tokenizer(d, meta["tokenizer"]), config


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


def _read_arrays(d: Path, abstract: dict) -> dict:
    ocp = _orbax()
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


def _get(tree: dict, keys: tuple):
    for key in keys:
        tree = tree[str(key)]
    return tree


def _read_tokenizer(d: Path, meta: dict[str, Any] | None):
    if meta is None:
        return None
    import tokenizers

    from jquant.io.tokenizer import Tokenizer, _adds_bos

    try:
        backend = tokenizers.Tokenizer.from_file(str(d / TOKENIZER))
    except Exception as e:  # tokenizers raises its own exception type
        raise ValueError(
            f"{d}: {TOKENIZER} cannot be read ({e}); the checkpoint is corrupt"
        ) from None
    template = None
    if meta["chat_template"]:
        template = (d / CHAT_TEMPLATE).read_text(encoding="utf-8")
    add_bos = meta.get("add_bos_token")
    if add_bos is None:  # written before the flag was recorded: as the post-processor does
        add_bos = _adds_bos(backend, meta["bos_token_id"])
    return Tokenizer(
        backend,
        bos_token_id=meta["bos_token_id"],
        eos_token_id=meta["eos_token_id"],
        pad_token_id=meta["pad_token_id"],
        chat_template=template,
        add_bos_token=add_bos,
    )


# ---- shared -----------------------------------------------------------------------------


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return param_shapes(LlamaConfig.from_hf(config))


def _jquant_version() -> str:
    import jquant

    return jquant.__version__


def _orbax():
    import orbax.checkpoint as ocp  # ~2 s to import: only when a checkpoint is read or written

    return ocp
