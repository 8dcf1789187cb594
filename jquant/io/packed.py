"""The packed checkpoint: a quantized model saved as it runs, and loaded without float weights.

A packed checkpoint (layout version 2) is a directory::

    jquant.json          metadata: format marker, layout version, jquant version, the HF-style
                         model config, every parameter's descriptor by path (the file holding
                         its arrays; per array: shape, dtype, sha256 of its bytes and byte
                         offsets in that file; a QArray's static fields, a double-quantized
                         scale nesting one more), the tokenizer's special ids, and the size
                         and sha256 of every other file (``files``, ``sha256``)
    arrays/PART.safetensors
                         the arrays, one standard safetensors file per part: ``layers.00003``
                         holds decoder layer 3, ``model`` everything else (when `save_packed`
                         or the CLI names the parts; a `PackedWriter` caller names its own)
    tokenizer.json       the `tokenizers` backend, if the model has a tokenizer
    chat_template.jinja  its chat template, if it has one
    recipe.yaml          the recipe that quantized it (`Recipe.to_yaml`), if given
    report.json          what quantization reported (errors, time, bits/weight), if given

Tensor names inside a safetensors file are the parameter path, plus ``.FIELD`` for a
QArray's array fields: ``layers/3/mlp/up_proj/kernel.qvalue``, ``...kernel.scale``,
``...kernel.zero_point``, and for a double-quantized scale ``...kernel.scale.qvalue`` and
``...kernel.scale.scale``; a float parameter is stored under its path alone
(``norm/scale``). The arrays are stored uncompressed, in the dtypes they have in memory
(bfloat16 and float8 included), so an int4 g128 kernel takes its in-memory 4.125 bits per
weight on disk too, and any safetensors reader can list them; only dtypes safetensors has a
code for can be stored (`jquant.io._safetensors.DTYPE_CODES`). `read_packed` reads the
arrays with plain file reads (no memory map stays behind) straight into QArrays, on the
first local device: no float copy of a quantized weight is ever made. It returns
``{parameter path: array or QArray}``, all of them or those ``only`` selects; building the
model is `jquant.models.load_packed`'s part (this module never imports `jquant.models`).
Layout 1 (the arrays in an orbax-checkpoint under ``arrays/``) still loads
(`jquant.io._packed_v1`); it is no longer written.

Damage is caught before any array is used: a missing or resized file, a file whose bytes no
longer hash to the recorded sha256 (a same-size overwrite, a flipped bit; the error names the
file and which arrays in it changed), or a safetensors header that disagrees with
jquant.json on a tensor's name, dtype, shape or offsets. Hashing reads every file once
(about 1 s per GB). A checkpoint written before checksums were recorded still loads, with a
warning that its damage cannot be detected.

Writing goes through `PackedWriter`, part by part, into a hidden sibling ``.NAME.partial``
that holds the finished parts' files and ``progress.json`` (each finished part's file, size,
sha256 and descriptors, and the writer's fingerprint). Each part is written to a temporary
file, fsynced and renamed into place before ``progress.json`` records it, so a run killed
at any point can be continued by a new `PackedWriter` with the same fingerprint: it keeps the
parts whose files still hash as recorded and writes the others again. `PackedWriter.finish`
writes jquant.json last and renames the partial directory to ``NAME``, so an unfinished
output is never a checkpoint (`read_packed` refuses it). `save_packed` writes a whole
parameter tree through one writer and removes the partial directory on any error or Ctrl-C,
leaving nothing behind (and, with ``overwrite=True``, the old checkpoint intact).

>>> qparams = jquant.quantize(params, "w4a16-rtn-g128")  # doctest: +SKIP
>>> save_packed("out/smollm2-w4", config=config, params=qparams, tokenizer=tok)  # doctest: +SKIP
>>> arrays, tok, config = read_packed("out/smollm2-w4")  # doctest: +SKIP
>>> model, qparams, tok, config = jquant.models.load_packed("out/smollm2-w4")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from flax import nnx

from jquant.io import _packed_v1, _packed_v2
from jquant.io._packed_check import _check_files, _check_paths
from jquant.io._packed_check import _file_sha256 as _file_sha256
from jquant.io._packed_meta import (
    ARRAYS,
    METADATA,
    _abstract,
    _check_leaf,
    _expected_shapes,
    _fill,
    _read_metadata,
    _to_json,
)
from jquant.io._packed_meta import CHAT_TEMPLATE as CHAT_TEMPLATE
from jquant.io._packed_meta import RECIPE as RECIPE
from jquant.io._packed_meta import REPORT as REPORT
from jquant.io._packed_meta import TOKENIZER as TOKENIZER
from jquant.io._packed_writer import PackedWriter as PackedWriter
from jquant.io._packed_writer import _tokenizer_meta as _tokenizer_meta
from jquant.io._packed_writer import _write_tokenizer as _write_tokenizer
from jquant.io._packed_writer import check_output_directory as check_output_directory
from jquant.tree import unwrap

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer
    from jquant.recipe import Recipe


def is_packed(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a packed checkpoint (perhaps a damaged one).

    True when it holds ``jquant.json`` or an ``arrays/`` folder, so that `load_packed`, not an
    HF importer, explains what is wrong with an incomplete one.
    """
    d = Path(directory).expanduser()
    return (d / METADATA).is_file() or (d / ARRAYS).is_dir()


# ---- saving -----------------------------------------------------------------------------


def part_of(path: str) -> str:
    """The part `save_packed` stores a parameter in: ``layers.00003`` for decoder layer 3's
    (``layers/3/...``), ``model`` for the rest."""
    keys = path.split("/")
    if len(keys) > 1 and keys[0] == "layers" and keys[1].isdigit():
        return f"layers.{int(keys[1]):05d}"
    return "model"


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

    One `PackedWriter` writes it, a part per decoder layer (``layers.00003``) and one
    (``model``) for the rest; any error or Ctrl-C removes what was written.

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
      overwrite: replace an existing non-empty ``directory`` (and discard an unfinished
        `PackedWriter` output for it); the old one stays intact if writing fails.

    Returns:
      The checkpoint's path.

    Raises:
      ValueError: ``directory`` is a file or a non-empty directory (without ``overwrite``),
        an unfinished `PackedWriter` output for it exists (without ``overwrite``), ``params``
        do not match ``config`` or hold a dtype safetensors lacks, or ``config`` / ``report``
        is not JSON-able. All are raised before anything is written.
    """
    who = "save_packed"
    target = check_output_directory(directory, overwrite=overwrite)
    expected = _expected_shapes(config)
    leaves = {"/".join(map(str, keys)): unwrap(var) for keys, var in nnx.to_flat_state(params)}
    for path, value in leaves.items():
        _check_leaf(value, path, expected, who)
    missing = [path for path in expected if path not in leaves]
    if missing:
        raise ValueError(
            f"{who}: params lack {len(missing)} parameter(s) of the model, "
            f"e.g. {', '.join(missing[:3])}"
        )
    if report is not None:
        _to_json(report, "report", who)  # fail before touching the disk
    parts: dict[str, dict[str, Any]] = {}
    for path, value in leaves.items():
        parts.setdefault(part_of(path), {})[path] = value
    writer = PackedWriter(target, config=config, overwrite=overwrite, resume=False)
    try:
        for part, arrays in parts.items():
            writer.write(part, arrays)
        return writer.finish(tokenizer=tokenizer, recipe=recipe, report=report)
    except BaseException:
        writer.abort()
        raise


# ---- loading ----------------------------------------------------------------------------


def read_packed(
    directory: str | os.PathLike,
    *,
    only: str | Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], Tokenizer | None, dict[str, Any]]:
    """Reads a packed checkpoint's arrays, quantized weights straight into QArrays.

    `jquant.models.load_packed` (and `jquant.models.load`) build the model around them.

    Args:
      directory: a directory `save_packed` or `PackedWriter` wrote.
      only: read only some parameters: a predicate on parameter paths, or a path prefix
        matched a whole component at a time (``"layers/3"`` selects ``layers/3/...``, not
        ``layers/30/...``). With it, only the files holding those arrays (and the small
        non-array files) are hashed; a layout-1 checkpoint still restores every array.

    Returns:
      ``(arrays, tokenizer, config)``: ``{parameter path: array or QArray}`` (paths like
      ``layers/0/mlp/up_proj/kernel``, dtypes as stored, on the first local device), the
      `jquant.io.Tokenizer` (or None) and the HF-style config dict.

    Raises:
      ValueError: naming the directory, when it is not a packed checkpoint (an unfinished
        `PackedWriter` output included), was written in an unknown layout version, or is
        truncated or corrupt (missing or short files, a file whose sha256 differs from the
        one recorded, naming the file and the arrays that changed, a safetensors header that
        disagrees with jquant.json).
    """
    d = Path(directory).expanduser()
    meta = _read_metadata(d)
    config = meta["config"]
    try:
        expected = _expected_shapes(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d}: the model config in {METADATA} is unusable ({e})") from None
    _check_paths(d, set(meta["params"]), set(expected))
    keep = _selector(only)
    wanted = {path: desc for path, desc in meta["params"].items() if keep(path)}
    layout = meta["layout_version"]
    files = {name for name in meta["files"] if not name.startswith(f"{ARRAYS}/")}
    if layout == 2:
        for path, desc in meta["params"].items():
            if not isinstance(desc, dict) or desc.get("file") not in meta["files"]:
                raise ValueError(
                    f"{d}: {METADATA} names no listed file for parameter {path}; the "
                    "checkpoint is corrupt"
                )
        files |= {desc["file"] for desc in wanted.values()}
    _check_files(d, meta["files"], meta.get("sha256"), None if only is None else files)

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    targets = {}
    for path, desc in wanted.items():
        target = _abstract(d, desc, path, device)
        if tuple(target.shape) != expected[path]:
            raise ValueError(
                f"{d}: parameter {path} has shape {tuple(target.shape)} in "
                f"{METADATA}, but the config implies {expected[path]}; the checkpoint is corrupt"
            )
        targets[path] = target
    if layout == 1:
        everything = {path: _abstract(d, desc, path, device)
                      for path, desc in meta["params"].items()}  # fmt: skip
        arrays = _packed_v1.read_arrays(d, {**everything, **targets})
    else:
        arrays = {}
        for file in sorted({desc["file"] for desc in wanted.values()}):
            in_file = {p: desc for p, desc in meta["params"].items() if desc["file"] == file}
            chosen = set(in_file) & set(wanted)
            arrays.update(_packed_v2.read_file(d, file, in_file, chosen, raw=True))
    params = {path: _fill(target, arrays[path]) for path, target in targets.items()}
    return params, _read_tokenizer(d, meta["tokenizer"]), config


def _selector(only) -> Callable[[str], bool]:
    if only is None:
        return lambda path: True
    if callable(only):
        return only
    if isinstance(only, str):
        prefix = only.rstrip("/")
        return lambda path: path == prefix or path.startswith(prefix + "/")
    raise ValueError(f"read_packed: only= is a {type(only).__name__}; give a path prefix or a "
                     "predicate on parameter paths")  # fmt: skip


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
