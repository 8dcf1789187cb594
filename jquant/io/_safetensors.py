"""The safetensors file format, written and read with NumPy alone (no torch, no mmap).

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{tensor name: {"dtype": code, "shape": [...], "data_offsets": [begin, end]}}``, offsets
relative to the first byte after the header), then the tensors' raw C-order bytes back to
back. `write_file` pads the header with spaces to a multiple of 8 bytes (the format allows
trailing whitespace) and stores the tensors in the order given, with no gaps, which is what
``safetensors.safe_open`` and other readers check. ``jquant.io.packed`` keeps its arrays
in these files; this module knows nothing of parameters or QArrays.

Only the dtypes of `DTYPE_CODES` can be stored: the format has no code for the others
(int4, float8_e4m3fnuz, ...), so they are refused rather than written in a form no other
tool reads the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

#: NumPy dtype name -> safetensors dtype code, for every dtype a file can hold.
DTYPE_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "uint32": "U32",
    "int32": "I32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",  # MXFP4's power-of-two scales
}
_DTYPES = {code: np.dtype(getattr(ml_dtypes, name, name)) for name, code in DTYPE_CODES.items()}

# A header longer than this is damage, not a file we wrote (100 MB of JSON is ~1M tensors).
_MAX_HEADER = 100_000_000
_CHUNK = 64 << 20  # bytes written (and hashed) per call, so a huge array is not copied whole


def dtype_code(dtype) -> str | None:
    """The safetensors code of ``dtype``, or None when the format has none."""
    return DTYPE_CODES.get(np.dtype(dtype).name)


def header_of(tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
              ) -> tuple[bytes, dict[str, list[int]]]:  # fmt: skip
    """The header bytes (length prefix included) of a file holding ``tensors`` in order (and
    the format's ``__metadata__``, strings to strings, when given), and each tensor's
    ``[begin, end]`` byte offsets in the whole file."""
    entries, spans, pos = {}, {}, 0
    if metadata is not None:
        entries["__metadata__"] = dict(metadata)
    for name, array in tensors:
        code = dtype_code(array.dtype)
        if code is None:
            raise ValueError(f"tensor {name} has dtype {array.dtype.name}, which safetensors lacks")
        entries[name] = {"dtype": code, "shape": list(array.shape),
                         "data_offsets": [pos, pos + array.nbytes]}  # fmt: skip
        spans[name] = pos, pos + array.nbytes
        pos += array.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    offsets = {name: [start + b, start + e] for name, (b, e) in spans.items()}
    return struct.pack("<Q", len(text)) + text, offsets


def write_file(
    path: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None
) -> tuple[int, str, dict[str, list[int]]]:
    """Writes ``tensors`` (and ``metadata``) to ``path`` and fsyncs it; returns the file's
    bytes and sha256 (hashed as it is written: nothing is read back) and each tensor's
    offsets in it."""
    header, offsets = header_of(tensors, metadata)
    digest = hashlib.sha256(header)
    size = len(header)
    with open(path, "wb") as f:
        f.write(header)
        for _, array in tensors:
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            for i in range(0, flat.size, _CHUNK):
                chunk = flat[i : i + _CHUNK]
                f.write(chunk)
                digest.update(chunk)
            size += flat.size
        f.flush()
        os.fsync(f.fileno())
    return size, digest.hexdigest(), offsets


def read_header(path: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype": np.dtype, "shape": tuple, "offsets": (begin, end)}}`` of a
    file, offsets in the whole file; ValueError when the header cannot be what it claims."""
    return read_header_and_metadata(path)[0]


def read_header_and_metadata(path: Path) -> tuple[dict[str, dict], object]:
    """`read_header`'s entries and the file's ``__metadata__`` as its JSON holds it (the
    format says strings to strings; None when it has none)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise ValueError(f"header length {length} does not fit the file's {size} bytes")
        text = f.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    out, start = {}, 8 + length
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (start + int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"header entry of {name} is malformed ({e!r})") from None
        out[name] = {"dtype": dtype, "shape": shape, "offsets": (begin, end)}
    return out, metadata


def read_tensor(f, dtype: np.dtype, shape: tuple[int, ...], begin: int, end: int) -> np.ndarray:
    """The array stored at bytes ``[begin, end)`` of the open file ``f``, read into a fresh
    buffer (not a memory map, so nothing of the file stays mapped)."""
    f.seek(begin)
    data = np.fromfile(f, dtype=np.uint8, count=end - begin)
    if data.size != end - begin:
        raise ValueError(f"bytes {begin}..{end} run past the end of the file")
    return data.view(dtype).reshape(shape)
