"""`PackedWriter`: a packed checkpoint written part by part, resumably, then committed whole.

The writer owns a hidden sibling of the target, ``.NAME.partial``: ``arrays/PART.safetensors``
for every finished part and ``progress.json``, which records each finished part (its file,
size, sha256 and parameter descriptors, as jquant.json will hold them), the model config and
the caller's fingerprint. A part's file is fsynced and renamed into place before
``progress.json`` (itself replaced atomically) lists it, so after a crash every listed part
whose file still hashes as recorded is whole; a new writer with the same fingerprint and
config continues from there, dropping every other file. `PackedWriter.finish` writes the
tokenizer, recipe and report, jquant.json last (its per-file sha256 taken from what was
recorded at write time, nothing rehashed but the small files), removes ``progress.json`` and
renames the directory to the target. `jquant.io.packed` re-exports the writer and describes
the checkpoint it makes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jquant.io import _packed_v2, _safetensors
from jquant.io._packed_check import _file_sha256
from jquant.io._packed_meta import (
    ARRAYS,
    CHAT_TEMPLATE,
    FORMAT,
    LAYOUT_VERSION,
    METADATA,
    PROGRESS,
    RECIPE,
    REPORT,
    TOKENIZER,
    _array_descs,
    _check_leaf,
    _encode,
    _expected_shapes,
    _to_json,
)
from jquant.tree import unwrap

if TYPE_CHECKING:
    from jquant.io.tokenizer import Tokenizer
    from jquant.recipe import Recipe

_EXTRAS = (TOKENIZER, CHAT_TEMPLATE, RECIPE, REPORT)  # what finish writes besides jquant.json
_PROGRESS_FORMAT = "jquant.packed.progress"
_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # a part name is a file name


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


class PackedWriter:
    """Writes a packed checkpoint part by part, resumably: for models larger than memory.

    Each `write` stores one part's arrays (e.g. one decoder layer's) in
    ``.NAME.partial/arrays/PART.safetensors`` and records it in ``progress.json``; `finish`
    checks that every parameter of the model was written exactly once and makes ``NAME`` a
    checkpoint. A run killed in between is continued by constructing a writer with the same
    ``fingerprint`` again: `done` lists the parts it need not write (`read` gives their
    arrays back), and the finished checkpoint is byte for byte the one an uninterrupted run
    writes.

    Args:
      directory: the checkpoint to write; refused up front as `check_output_directory` does.
      config: the HF-style config dict; every written parameter must be this architecture's.
      fingerprint: JSON-able dict identifying the run (source model, recipe text, calibration
        hash, jquant version, ...); an unfinished output is only continued by a writer with
        an equal fingerprint (and config).
      overwrite: replace a non-empty ``directory`` at `finish` (the old checkpoint stays until
        then), and discard any unfinished output instead of continuing it.
      resume: continue an unfinished output of an earlier run; without it, one is an error
        (unless ``overwrite``).

    Raises:
      ValueError: ``directory`` is refused; ``config`` or ``fingerprint`` is not JSON-able;
        an unfinished output exists without ``resume`` or ``overwrite``, is unreadable, or was
        written with another fingerprint or config (the error names the differing keys).

    >>> w = PackedWriter("out/big", config=config, fingerprint={"recipe": text})  # doctest: +SKIP
    >>> for i in range(n_layers):  # doctest: +SKIP
    ...     part = f"layers.{i:05d}"
    ...     layer = w.read(part) if part in w.done else w.write(part, quantize_layer(i))
    >>> w.write("model", rest); w.finish(tokenizer=tok, recipe=recipe)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        config: dict[str, Any],
        fingerprint: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = True,
    ):
        who = "PackedWriter"
        self.target = check_output_directory(directory, overwrite=overwrite)
        self.partial = self.target.with_name(f".{self.target.name}.partial")
        self._overwrite = overwrite
        self._config = json.loads(_to_json(config, "config", who))
        self._fingerprint = json.loads(_to_json(dict(fingerprint or {}), "fingerprint", who))
        self._expected = _expected_shapes(config)
        self._parts: dict[str, dict] = {}  # part -> {file, size, sha256, params: {path: desc}}
        self._owner: dict[str, str] = {}  # parameter path -> its part
        self._closed = ""  # why no more calls are taken ("finished", "aborted")
        if self.partial.exists() and (overwrite or not resume):
            if not overwrite:
                raise ValueError(
                    f"{who}: {self.partial} holds an unfinished output of an earlier run; pass "
                    "resume=True to continue it, or overwrite=True to start afresh"
                )
            shutil.rmtree(self.partial)
        if self.partial.exists():
            self._resume()
            self._save_progress()
            return
        self.target.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0o700 would become the checkpoint's mode at the rename.
        self.partial.mkdir()
        try:
            (self.partial / ARRAYS).mkdir()
            self._save_progress()
        except BaseException:  # a partial directory without progress.json is no use to anyone
            shutil.rmtree(self.partial, ignore_errors=True)
            raise

    @property
    def done(self) -> frozenset[str]:
        """The parts already written (by this writer or, verified, by an earlier run)."""
        return frozenset(self._parts)

    def write(self, part: str, arrays: Mapping[str, Any]) -> None:
        """Stores ``arrays`` (``{parameter path: array or QArray}``) as part ``part``.

        The file is written to a temporary name, fsynced and renamed into place before
        ``progress.json`` records it; only this part's arrays are copied to the host.

        Raises:
          ValueError: ``part`` is not a file name or is already written; a parameter is not
            the config's, has another shape, a dtype safetensors lacks, or is already in
            another part.
        """
        who = "PackedWriter.write"
        self._check_open(who)
        if not isinstance(part, str) or not _PART.fullmatch(part):
            raise ValueError(
                f"{who}: part name {part!r} must be letters, digits, '.', '_' or '-', not "
                "starting with '.'"
            )
        if part in self._parts:
            raise ValueError(f"{who}: part {part} is already written; read it with read({part!r})")
        if not arrays:
            raise ValueError(f"{who}: part {part} has no arrays")
        for path, value in arrays.items():
            _check_leaf(value, path, self._expected, who)
            if path in self._owner:
                raise ValueError(
                    f"{who}: parameter {path} is already in part {self._owner[path]}; each "
                    "parameter goes into exactly one part"
                )
        file = f"{ARRAYS}/{part}.safetensors"
        order = {path: i for i, path in enumerate(self._expected)}
        params, tensors = {}, []
        for path in sorted(arrays, key=order.__getitem__):  # the same bytes in any dict order
            desc, more = _encode(unwrap(arrays[path]), path)
            params[path] = {"file": file, **desc}
            tensors += more
        tmp = self.partial / ARRAYS / f".{part}.safetensors.tmp"
        try:
            size, sha256, offsets = _safetensors.write_file(tmp, tensors)
            os.replace(tmp, self.partial / file)
            _fsync_dir(self.partial / ARRAYS)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for path, desc in params.items():
            for tensor, array_desc in _array_descs(desc, path).items():
                array_desc["offsets"] = offsets[tensor]
        self._parts[part] = {"file": file, "size": size, "sha256": sha256, "params": params}
        self._owner.update(dict.fromkeys(params, part))
        self._save_progress()

    def read(self, part: str) -> dict[str, Any]:
        """``{parameter path: array or QArray}`` of a written part, on the first local device."""
        self._check_open("PackedWriter.read")
        if part not in self._parts:
            raise ValueError(
                f"PackedWriter.read: part {part!r} is not written (written: "
                f"{', '.join(sorted(self._parts)) or 'none'})"
            )
        record = self._parts[part]
        params = record["params"]
        return _packed_v2.read_file(self.partial, record["file"], params, set(params))

    def finish(
        self,
        tokenizer: Tokenizer | None = None,
        recipe: Recipe | None = None,
        report: dict[str, Any] | None = None,
    ) -> Path:
        """Writes the tokenizer, recipe, report and jquant.json (last), and renames the partial
        directory to the target (swapping out an old checkpoint last, with ``overwrite``).

        Returns:
          The checkpoint's path.

        Raises:
          ValueError: a parameter of the model is in no part, ``report`` is not JSON-able, or
            the target became a file or a non-empty directory (without ``overwrite``).
        """
        who = "PackedWriter.finish"
        self._check_open(who)
        missing = [path for path in self._expected if path not in self._owner]
        if missing:
            raise ValueError(
                f"{who}: {len(missing)} parameter(s) of the model are in no written part, "
                f"e.g. {', '.join(missing[:3])}; write the parts that hold them"
            )
        meta = {
            "format": FORMAT,
            "layout_version": LAYOUT_VERSION,
            "jquant_version": _jquant_version(),
            "config": self._config,
            "params": {p: self._parts[self._owner[p]]["params"][p] for p in self._expected},
            "tokenizer": None if tokenizer is None else _tokenizer_meta(tokenizer),
        }
        report_text = None if report is None else _to_json(report, "report", who)
        check_output_directory(self.target, overwrite=self._overwrite)
        for name in (*_EXTRAS, METADATA):  # left by a finish that failed part way
            (self.partial / name).unlink(missing_ok=True)
        if tokenizer is not None:
            _write_tokenizer(self.partial, tokenizer)
        if recipe is not None:
            (self.partial / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")
        if report_text is not None:
            (self.partial / REPORT).write_text(report_text, encoding="utf-8")
        files = {r["file"]: (r["size"], r["sha256"]) for r in self._parts.values()}
        for name in _EXTRAS:
            if (self.partial / name).is_file():
                path = self.partial / name
                files[name] = path.stat().st_size, _file_sha256(path)
        meta["files"] = {name: files[name][0] for name in sorted(files)}
        meta["sha256"] = {name: files[name][1] for name in sorted(files)}
        _write_atomically(self.partial / METADATA, _to_json(meta, "metadata", who))
        (self.partial / PROGRESS).unlink()
        _commit(self.partial, self.target)
        self._closed = "finished"
        return self.target

    def abort(self) -> None:
        """Removes the partial directory, finished parts and all; the writer takes no more calls."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self._closed = "aborted"

    def _check_open(self, who: str) -> None:
        if self._closed:
            raise ValueError(f"{who}: this writer is {self._closed}; make a new PackedWriter")

    def _resume(self) -> None:
        """Takes over the parts of ``progress.json`` whose files still hash as recorded, and
        removes every other file, so the finished output holds nothing stray."""
        who, progress_path = "PackedWriter", self.partial / PROGRESS
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
            ours = progress["format"] == _PROGRESS_FORMAT
            old = {"layout_version": progress["layout_version"], "config": progress["config"]}
            old_fingerprint, parts = dict(progress["fingerprint"]), dict(progress["parts"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            ours, reason = False, f"{PROGRESS} is unreadable: {e!r}"
        else:
            reason = f"its {PROGRESS} is not a PackedWriter's"
        if not ours:
            raise ValueError(
                f"{who}: {self.partial} is not an unfinished output this writer can continue "
                f"({reason}); pass overwrite=True to start afresh"
            )
        new = {"layout_version": LAYOUT_VERSION, "config": self._config}
        keys = sorted(set(old_fingerprint) | set(self._fingerprint))
        differ = [k for k in new if old[k] != new[k]] + [
            f"fingerprint[{k!r}]" for k in keys
            if old_fingerprint.get(k, ...) != self._fingerprint.get(k, ...)
        ]  # fmt: skip
        if differ:
            raise ValueError(
                f"{who}: {self.partial} was written by another run (differing: "
                f"{', '.join(differ)}), so its {len(parts)} finished part(s) cannot be "
                "continued; pass overwrite=True to start afresh"
            )
        for part, record in parts.items():
            path = self.partial / record["file"]
            if (
                path.is_file()
                and path.stat().st_size == record["size"]
                and _file_sha256(path) == record["sha256"]
            ):
                self._parts[part] = record
                self._owner.update(dict.fromkeys(record["params"], part))
            else:
                warnings.warn(
                    f"{self.partial}: part {part}'s file is missing or changed since it was "
                    "written; it is not done, write it again",
                    stacklevel=3,
                )
        keep = {progress_path} | {self.partial / r["file"] for r in self._parts.values()}
        for path in sorted(self.partial.rglob("*")):
            if path.is_file() and path not in keep:
                path.unlink()
        (self.partial / ARRAYS).mkdir(exist_ok=True)

    def _save_progress(self) -> None:
        progress = {
            "format": _PROGRESS_FORMAT,
            "layout_version": LAYOUT_VERSION,
            "fingerprint": self._fingerprint,
            "config": self._config,
            "parts": self._parts,
        }
        _write_atomically(self.partial / PROGRESS, _to_json(progress, "progress", "PackedWriter"))


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` via a fsynced temporary file and a rename: old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Makes a rename inside ``directory`` durable (a power loss cannot undo it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _jquant_version() -> str:
    import jquant

    return jquant.__version__


def read_written(directory: str | os.PathLike, part: str) -> dict[str, Any]:
    """A finished part of the unfinished output for ``directory``, read without taking the
    output over (what the other processes of a multi-process run read while process 0's
    `PackedWriter` writes)."""
    target = Path(os.path.abspath(os.path.expanduser(directory)))
    partial = target.with_name(f".{target.name}.partial")
    try:
        progress = json.loads((partial / PROGRESS).read_text(encoding="utf-8"))
        record = progress["parts"][part]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{partial}: part {part!r} is not written ({e!r})") from None
    params = record["params"]
    return _packed_v2.read_file(partial, record["file"], params, set(params))
