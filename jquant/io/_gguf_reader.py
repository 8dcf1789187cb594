"""A fast GGUF parser: metadata as plain Python values and tensor records, from one mmap.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value (two per string)
before anything can be read: tens of seconds for a 128k-token vocabulary with 280k merges.
This module walks the same layout with `struct` over a read-only `mmap`, reads string arrays
in one tight loop and numeric arrays with one `np.frombuffer` each. The parse keeps nothing
of that map: `GGUFTensor.read` reads a tensor's bytes with plain file reads into a new array
(what the importer uses, so a lazily loaded checkpoint holds no mapping), and
`GGUFTensor.data` maps the file again for a view.

It returns what `gguf.GGUFReader` would: `GGUFFile.metadata` equals
``{name: field.contents() for name, field in GGUFReader(path).fields.items()}`` (the
``GGUF.version``, ``GGUF.tensor_count`` and ``GGUF.kv_count`` pseudo-fields included, nested
arrays flattened as `contents()` flattens them), and each tensor's `data()` equals
`ReaderTensor.data`: dtype, byte order and shape.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): the magic ``GGUF``;
uint32 version (2 or 3); uint64 tensor count; uint64 key/value count; the key/value pairs
(string key, uint32 value type, value); per tensor: string name, uint32 n_dims, n_dims uint64
dimensions (fastest-first, ggml's ``ne``), uint32 ggml type, uint64 offset into the data
section; then the data section, starting at the next multiple of ``general.alignment``
(default 32). Strings are a uint64 byte length and UTF-8 bytes; arrays a uint32 item type, a
uint64 count and the items. A file written big-endian is recognised as gguf-py does: its
version, read in the host's order, has zero low 16 bits.

Every malformed file (bad magic or version, a read past the end, a count or length beyond the
file, invalid UTF-8, an unknown value or tensor type, a duplicate key or tensor) raises
`GGUFFormatError`, a `ValueError`, naming the byte offset where parsing failed.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from . import _lazy

__all__ = ["GGUFFile", "GGUFFormatError", "GGUFTensor", "read_gguf"]

_VT = gguf.GGUFValueType
_QT = gguf.GGMLQuantizationType
# Fixed-size value types -> numpy dtype (host order; the file's order is applied per file).
_SCALAR_DTYPES = {
    _VT.UINT8: np.uint8, _VT.INT8: np.int8, _VT.UINT16: np.uint16, _VT.INT16: np.int16,
    _VT.UINT32: np.uint32, _VT.INT32: np.int32, _VT.FLOAT32: np.float32, _VT.UINT64: np.uint64,
    _VT.INT64: np.int64, _VT.FLOAT64: np.float64, _VT.BOOL: np.bool_,
}  # fmt: skip
# ggml types gguf-py returns as typed arrays of their elements; all others are uint8 blocks
# shaped (..., bytes per row) (gguf.GGUFReader._build_tensors).
_PLAIN_TENSOR_DTYPES = {
    _QT.F16: np.float16, _QT.F32: np.float32, _QT.F64: np.float64, _QT.I8: np.int8,
    _QT.I16: np.int16, _QT.I32: np.int32, _QT.I64: np.int64,
}  # fmt: skip
_SUPPORTED_VERSIONS = (2, 3)


class GGUFFormatError(ValueError):
    """The file is not GGUF, or it is truncated or corrupt."""


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTensor:
    """One tensor's record (the fields `gguf.ReaderTensor` has, but no data read yet).

    Attributes:
      name: the llama.cpp tensor name.
      tensor_type: its ggml type.
      shape: uint64 dimensions fastest-first, as `ReaderTensor.shape` (a (out, in) matrix
        is ``[in, out]``).
      n_elements: the product of `shape`.
      n_bytes: bytes of data.
      data_offset: absolute byte offset of the data in the file.
    """

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: np.ndarray
    n_elements: int
    n_bytes: int
    data_offset: int
    _dtype: np.dtype = dataclasses.field(repr=False, compare=False)
    _data_shape: tuple[int, ...] = dataclasses.field(repr=False, compare=False)
    _path: Path = dataclasses.field(repr=False, compare=False)

    def data(self) -> np.ndarray:
        """The raw data as `ReaderTensor.data` has it: a read-only view into a memory map of
        the file (mapped for this view, unmapped once it is dropped).

        Plain types (F32, F16, F64, I8..I64) are arrays of their numbers in the file's byte
        order, shaped slowest-first; every other type is uint8 of shape (..., bytes per row),
        what `gguf.quants.dequantize` takes.

        Raises:
          GGUFFormatError: the data ends past the end of the file.
        """
        count = math.prod(self._data_shape)
        with open(self._path, "rb") as f:
            if self.data_offset + count * self._dtype.itemsize > os.fstat(f.fileno()).st_size:
                raise GGUFFormatError(f"tensor {self.name} ends past the end of the file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(buf, self._dtype, count, self.data_offset)
        return view.reshape(self._data_shape)

    def read(self) -> np.ndarray:
        """What `data` gives, read with plain file reads into a new, writable array: after
        the call the file holds no memory of this process.

        Raises:
          ValueError: the data ends past the end of the file (naming the file and tensor).
        """
        raw = _lazy.read_bytes(self._path, self.data_offset, self.n_bytes, tensor=self.name)
        return raw.view(self._dtype).reshape(self._data_shape)


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file.

    Attributes:
      metadata: every key/value pair as plain Python values, in file order, after the
        ``GGUF.version``, ``GGUF.tensor_count`` and ``GGUF.kv_count`` pseudo-fields.
      tensors: the tensor records in file order.
      byte_order: ``"<"`` or ``">"``.
      alignment: ``general.alignment`` or 32.
      header_end: where the last tensor record (or key/value pair) ends.
      data_start: absolute offset of the tensor data section: `header_end` aligned up.
      size: the file's size in bytes.
    """

    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    byte_order: str
    alignment: int
    header_end: int
    data_start: int
    size: int


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header, metadata and tensor records of the GGUF file at `path`.

    No tensor data is read, and the map the header was parsed from is released (once the
    parse's temporaries are gone): tensors are read by `GGUFTensor.read` or `GGUFTensor.data`.

    Raises:
      OSError: the file cannot be opened.
      GGUFFormatError: it is not GGUF, or it is truncated or corrupt.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:  # magic, version and the two counts
            raise GGUFFormatError(f"{size} bytes is too short for a GGUF header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return _Parser(buf, Path(path).absolute()).parse()  # read later, from any directory


class _Parser:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf = buf
        self.path = path
        self.size = len(buf)
        self.pos = 0  # where the value being read started, for messages
        self.alignment_type: int | None = None  # the value type general.alignment has

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"at byte {self.pos}: {what}")

    def parse(self) -> GGUFFile:
        buf = self.buf
        if buf[:4] != b"GGUF":  # written little-endian whatever the file's byte order
            raise GGUFFormatError("GGUF magic invalid")
        host, swapped = ("<", ">") if sys.byteorder == "little" else (">", "<")
        order = host
        (version,) = struct.unpack_from(host + "I", buf, 4)
        if version & 0xFFFF == 0:  # gguf-py's test for a file of the other byte order
            order = swapped
            (version,) = struct.unpack_from(order + "I", buf, 4)
        if version not in _SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"file appears to be version {version}, which is not 2 or 3")
        self.order = order
        self.u32 = struct.Struct(order + "I").unpack_from
        self.u64 = struct.Struct(order + "Q").unpack_from
        self.dtypes = {t: np.dtype(d).newbyteorder(order) for t, d in _SCALAR_DTYPES.items()}
        n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
        meta: dict[str, Any] = {
            "GGUF.version": version,
            "GGUF.tensor_count": n_tensors,
            "GGUF.kv_count": n_kv,
        }
        try:
            off = self.read_kv(24, n_kv, meta)
            off, infos = self.read_tensor_infos(off, n_tensors)
        except struct.error as err:  # a fixed-size read past the end of the file
            raise self.fail(f"the file ends inside the header ({err})") from None
        except UnicodeDecodeError as err:
            raise self.fail(f"a string is not UTF-8 ({err})") from None
        except RecursionError:
            raise self.fail("arrays nested too deeply") from None
        alignment = 32
        if "general.alignment" in meta:
            alignment = meta["general.alignment"]
            if self.alignment_type != _VT.UINT32:
                raise GGUFFormatError("general.alignment is not a uint32")
            if alignment == 0 or alignment & (alignment - 1):
                raise GGUFFormatError(f"alignment {alignment} is not a power of two")
        data_start = off + (-off) % alignment
        tensors = self.build_tensors(infos, data_start)
        return GGUFFile(meta, tensors, order, alignment, off, data_start, self.size)

    # --- strings and metadata -------------------------------------------------------------

    def string(self, off: int) -> tuple[bytes, int]:
        (n,) = self.u64(self.buf, off)
        end = off + 8 + n
        if end > self.size:
            self.pos = off
            raise self.fail(f"a string of {n} bytes runs past the end of the file")
        return self.buf[off + 8 : end], end

    def read_kv(self, off: int, count: int, meta: dict[str, Any]) -> int:
        for _ in range(count):
            self.pos = off
            raw_key, off = self.string(off)
            key = raw_key.decode("utf-8")
            (vtype,) = self.u32(self.buf, off)
            off += 4
            self.pos = off
            if key in meta:
                raise self.fail(f"duplicate key {key}")
            if key == "general.alignment":
                self.alignment_type = vtype
            meta[key], off = self.value(off, vtype)
        return off

    def value_type(self, vtype: int) -> gguf.GGUFValueType:
        try:
            return _VT(vtype)
        except ValueError:
            raise self.fail(f"unknown value type {vtype}") from None

    def value(self, off: int, vtype: int) -> tuple[Any, int]:
        """One value as `ReaderField.contents()` gives it, and the offset after it."""
        vtype = self.value_type(vtype)
        if vtype == _VT.STRING:
            raw, off = self.string(off)
            return raw.decode("utf-8"), off
        if vtype != _VT.ARRAY:
            dtype = self.dtypes[vtype]
            end = off + dtype.itemsize
            if end > self.size:
                raise self.fail("the file ends inside a value")
            return np.frombuffer(self.buf, dtype, 1, off).tolist()[0], end
        off, tail, chunks = self.array(off)
        # contents() reads the leaves as the innermost type of the first element's chain says
        # (gguf-py flattens nested arrays and keeps only the first element's types).
        as_strings = bool(tail) and tail[-1] == _VT.STRING
        out: list[Any] = []
        for kind, chunk in chunks:
            if kind is _VT.STRING:  # a list of raw strings
                if as_strings:
                    out += [s.decode("utf-8") for s in chunk]
                else:  # their bytes, as uint8 numbers
                    for s in chunk:
                        out += s
            elif as_strings:  # (dtype, raw bytes): each number's bytes read as UTF-8
                n = kind.itemsize
                out += [chunk[i : i + n].decode("utf-8") for i in range(0, len(chunk), n)]
            else:
                out += np.frombuffer(chunk, kind).tolist()
        return out, off

    def array(self, off: int) -> tuple[int, list[gguf.GGUFValueType], list[tuple[Any, Any]]]:
        """An array at `off`: the offset after it, the types below ARRAY of its first element's
        chain (gguf-py's ``ReaderField.types[1:]``), and its leaves in chunks: ``(STRING,
        [bytes, ...])`` or ``(dtype, raw bytes)``."""
        self.pos = off
        (itype,) = self.u32(self.buf, off)
        (count,) = self.u64(self.buf, off + 4)
        off += 12
        if count == 0:  # gguf-py does not look at the item type of an empty array
            return off, [], []
        itype = self.value_type(itype)
        if itype == _VT.STRING:
            strings, off = self.strings(off, count)
            return off, [_VT.STRING], [(_VT.STRING, strings)]
        if itype != _VT.ARRAY:
            dtype = self.dtypes[itype]
            end = off + count * dtype.itemsize
            if end > self.size:
                raise self.fail(f"an array of {count} {itype.name} runs past the end of the file")
            return end, [itype], [(dtype, self.buf[off:end])]
        if count * 12 > self.size - off:
            raise self.fail(f"an array of {count} arrays runs past the end of the file")
        tail: list[gguf.GGUFValueType] = []
        chunks: list[tuple[Any, Any]] = []
        for i in range(count):
            off, item_tail, item_chunks = self.array(off)
            if i == 0:
                tail = [_VT.ARRAY, *item_tail]
            chunks += item_chunks
        return off, tail, chunks

    def strings(self, off: int, count: int) -> tuple[list[bytes], int]:
        """`count` raw strings from `off`, and the offset after them (the hot loop: vocabularies
        of 100k+ tokens and merges)."""
        if count * 8 > self.size - off:
            raise self.fail(f"an array of {count} strings runs past the end of the file")
        buf, size, u64 = self.buf, self.size, self.u64
        out: list[bytes] = []
        append = out.append
        for _ in range(count):
            (n,) = u64(buf, off)
            start = off + 8
            off = start + n
            if off > size:
                self.pos = start - 8
                raise self.fail(f"a string of {n} bytes runs past the end of the file")
            append(buf[start:off])
        return out, off

    # --- tensor records ---------------------------------------------------------------------

    def read_tensor_infos(self, off: int, count: int) -> tuple[int, list[tuple]]:
        if count * 24 > self.size - off:  # name length, n_dims, type and offset at least
            self.pos = off
            raise self.fail(f"{count} tensor records run past the end of the file")
        infos = []
        for _ in range(count):
            self.pos = off
            raw_name, off = self.string(off)
            (n_dims,) = self.u32(self.buf, off)
            off += 4
            if off + 8 * n_dims > self.size:
                raise self.fail(f"{n_dims} dimensions run past the end of the file")
            dims = np.frombuffer(self.buf, self.dtypes[_VT.UINT64], n_dims, off)
            off += 8 * n_dims
            (ggml_type,) = self.u32(self.buf, off)
            (rel_offset,) = self.u64(self.buf, off + 4)
            off += 12
            infos.append((self.pos, raw_name.decode("utf-8"), dims, ggml_type, rel_offset))
        return off, infos

    def build_tensors(self, infos: list[tuple], data_start: int) -> list[GGUFTensor]:
        tensors, seen = [], set()
        for pos, name, dims, raw_type, rel_offset in infos:
            self.pos = pos
            if name in seen:
                raise self.fail(f"duplicate tensor {name}")
            seen.add(name)
            try:
                ggml_type = _QT(raw_type)
            except ValueError:
                raise self.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
            shape = dims.astype(np.uint64)  # a native-order copy
            n_elements = math.prod(int(d) for d in shape)
            block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
            n_bytes = n_elements * type_size // block
            data_shape = tuple(int(d) for d in reversed(shape.tolist()))
            if ggml_type in _PLAIN_TENSOR_DTYPES:
                dtype = np.dtype(_PLAIN_TENSOR_DTYPES[ggml_type]).newbyteorder(self.order)
            else:
                dtype = np.dtype(np.uint8)
                if not data_shape or data_shape[-1] % block:
                    raise self.fail(
                        f"tensor {name}: a {ggml_type.name} tensor of shape {data_shape} is not "
                        f"whole blocks of {block}"
                    )
                data_shape = (*data_shape[:-1], data_shape[-1] // block * type_size)
            offset = data_start + rel_offset
            tensors.append(
                GGUFTensor(
                    name, ggml_type, shape, n_elements, n_bytes, offset, dtype, data_shape,
                    self.path,
                )
            )
        return tensors
