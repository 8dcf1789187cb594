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

This module writes and reads the directory; jquant.json's descriptors are
`jquant.io._packed_meta`'s, the damage checks `jquant.io._packed_check`'s.

>>> qparams = jquant.quantize(params, "w4a16-rtn-g128")  # doctest: +SKIP
>>> save_packed("out/smollm2-w4", config=config, params=qparams, tokenizer=tok)  # doctest: +SKIP
>>> arrays, tok, config = read_packed("out/smollm2-w4")  # doctest: +SKIP
>>> model, qparams, tok, config = jquant.models.load_packed("out/smollm2-w4")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from jquant.io._packed_check import _check_files, _check_paths, _compare, _file_sha256, _file_sizes
from jquant.io._packed_meta import (
    ARRAYS,
    FORMAT,
    LAYOUT_VERSION,
    METADATA,
    _abstract,
    _as_field_dicts,
    _encode_params,
    _expected_shapes,
    _fill,
    _get,
    _nest,
    _read_metadata,
    _to_json,
)

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer
    from jquant.recipe import Recipe

TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
RECIPE = "recipe.yaml"
REPORT = "report.json"


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


def _jquant_version() -> str:
    import jquant

    return jquant.__version__


def _orbax():
    import orbax.checkpoint as ocp  # ~2 s to import: only when a checkpoint is read or written

    return ocp
