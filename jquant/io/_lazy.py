"""`LazyTensors`: a checkpoint's tensors as a mapping that reads each one from disk when asked.

Quantizing a model larger than host memory needs its tensors one at a time: a decoder layer is
read, converted and quantized, then dropped, before the next is read. The importers
(`jquant.io.load_hf_dir`, `jquant.io.load_gguf`, with ``lazy=True``) parse only the file
headers and hand back a `LazyTensors` whose keys, shapes and values are exactly those of the
eager `Checkpoint.tensors` (HF names and layout, float32): the eager loaders are this mapping
materialized, so each format's per-tensor conversion is written once, in its importer.

Reads are plain file reads into a fresh array (`read_bytes`), never a memory map: once a read
returns, the only memory it holds is the returned array.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["LazyTensors", "TensorEntry", "cast", "read_bytes", "shape_of"]

# Largest single read(2) on Linux is just under 2 GiB; bigger tensors take several reads.
_MAX_READ = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    """What an importer knows of one tensor from its file's header, and how to read it."""

    shape: tuple[int, ...]  # HF layout, as the read returns it
    stored_dtype: str  # the file's name for its dtype: "BF16", "F32", "Q4_1", ...
    load: Callable[[np.dtype], np.ndarray]  # reads it from disk, converted, cast to a dtype


class LazyTensors(Mapping[str, np.ndarray]):
    """HF-named tensors of a checkpoint, each read from disk only when looked up.

    Keys are the names the eager `Checkpoint.tensors` has (GGUF names mapped to HF names,
    multimodal Gemma 3 renamed, ignored and tied tensors dropped). `shape` and `stored_dtype`
    come from the file headers; ``lazy[name]`` reads that one tensor and returns what the eager
    loader holds for it: float32 in HF layout (GGUF dequantized, Q/K rows in HF order, Gemma
    norms as ``w``). Nothing is cached: each lookup reads the file again, so drop the array
    to free it. Membership, ``len`` and iteration read no data; ``values()`` and ``items()``
    read every tensor, as does ``dict(lazy)``, which is the eager checkpoint.

    >>> ckpt = jquant.io.load_checkpoint("smollm2-135m", lazy=True)  # doctest: +SKIP
    >>> name = "model.layers.0.mlp.up_proj.weight"
    >>> ckpt.tensors.shape(name)  # doctest: +SKIP
    (1536, 576)
    >>> ckpt.tensors.read(name, ml_dtypes.bfloat16).dtype  # doctest: +SKIP
    dtype(bfloat16)
    """

    def __init__(self, entries: Mapping[str, TensorEntry], source: str):
        """Args:
          entries: ``{hf_name: TensorEntry}``, in the order the eager mapping lists them.
          source: the file or directory, named in errors.
        """
        self._entries = dict(entries)
        self.source = source

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.source} has no tensor {name!r}") from None

    def __getitem__(self, name: str) -> np.ndarray:
        return self._entry(name).load(np.dtype(np.float32))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"LazyTensors({len(self)} tensors from {self.source})"

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF-layout shape of tensor `name`, from the file header (no data read)."""
        return self._entry(name).shape

    def stored_dtype(self, name: str) -> str:
        """How the file stores tensor `name`: a safetensors dtype code (``"BF16"``, ``"F16"``,
        ``"F32"``, ``"F8_E4M3"``, ...) or a ggml type name (``"F32"``, ``"Q4_1"``, ...)."""
        return self._entry(name).stored_dtype

    def read(self, name: str, dtype) -> np.ndarray:
        """Tensor `name` read from disk as numpy `dtype`; equal to ``self[name].astype(dtype)``.

        A tensor stored in `dtype` (a ``"BF16"`` safetensors tensor read as
        `ml_dtypes.bfloat16`) is returned as stored, with no float32 copy made on the way.
        """
        return self._entry(name).load(np.dtype(dtype))


def shape_of(tensors: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """The shape of ``tensors[name]``: for a `LazyTensors`, from the file header, reading
    nothing."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


def cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as `dtype`, by way of float32 unless it already is `dtype`: one rounding, the
    same as the eager float32 tensor cast to `dtype`."""
    if values.dtype == dtype:
        return values
    return values.astype(np.float32, copy=False).astype(dtype, copy=False)


def read_bytes(path: Path, offset: int, nbytes: int, *, tensor: str) -> np.ndarray:
    """`nbytes` bytes of file `path` from `offset`, as a new writable uint8 array.

    Plain file reads, no memory map, so nothing of the file stays mapped or resident in this
    process once the caller drops the array.

    Raises:
      ValueError: the file ends before `offset + nbytes` (it was cut short); names the file
        and `tensor`.
    """
    out = np.empty(nbytes, np.uint8)
    view = memoryview(out)
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < nbytes:
            got = f.readinto(view[done : done + _MAX_READ])
            if not got:
                size = os.fstat(f.fileno()).st_size
                raise ValueError(
                    f"{path} is truncated: tensor {tensor} ends past the end of the file "
                    f"(it needs {offset + nbytes} bytes, the file has {size}); download it again."
                )
            done += got
    return out
