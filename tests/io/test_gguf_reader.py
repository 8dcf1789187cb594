"""jquant's own GGUF parser (`jquant.io._gguf_reader`) against `gguf.GGUFReader`.

For every GGUF these tests can make (tiny llama-family models with quantized tensors, files of
every metadata value type, nested and empty arrays, a custom alignment, big-endian files,
hand-assembled files for what gguf's writer refuses to write) and the real SmolLM2 file, the
metadata must equal ``{k: f.contents() for k, f in GGUFReader(p).fields.items()}`` value for
value and type for type, and every tensor's name, type, shape, offsets and raw data must equal
GGUFReader's. Truncated and corrupted files must each be one clear ValueError.
"""

from __future__ import annotations

import functools
import math
import struct

import gguf
import numpy as np
import pytest

from jquant import io as jio
from jquant.io import _gguf_reader as R
from jquant.io import gguf as jgguf

VT = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType
UNREADABLE = r"not a readable GGUF file .*truncated or corrupt"


def same(a, b) -> bool:
    """Equal values of identical types, recursively (bool is not int, NaN equals NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def assert_matches_gguf_reader(path) -> R.GGUFFile:
    """The new parser gives GGUFReader's metadata and tensors for `path`."""
    got = R.read_gguf(path)
    ref = gguf.GGUFReader(path)
    want = {name: field.contents() for name, field in ref.fields.items()}
    assert list(got.metadata) == list(want)
    for key, value in want.items():
        assert same(got.metadata[key], value), (key, got.metadata[key], value)
    assert got.alignment == ref.alignment and got.data_start == ref.data_offset
    assert [t.name for t in got.tensors] == [t.name for t in ref.tensors]
    for t, r in zip(got.tensors, ref.tensors):
        assert t.tensor_type == r.tensor_type and type(t.tensor_type) is Q, t.name
        np.testing.assert_array_equal(t.shape, r.shape, err_msg=t.name)
        assert (t.n_elements, t.n_bytes, t.data_offset) == (r.n_elements, r.n_bytes, r.data_offset)
        data = t.data()
        assert data.dtype == r.data.dtype and data.shape == r.data.shape, t.name
        np.testing.assert_array_equal(data, r.data, err_msg=t.name)
        with np.errstate(invalid="ignore", over="ignore"):  # random blocks: NaN scales
            try:
                want_values = gguf.quants.dequantize(r.data, r.tensor_type)
            except NotImplementedError:
                continue
            got_values = gguf.quants.dequantize(data, t.tensor_type)
        np.testing.assert_array_equal(got_values, want_values, err_msg=t.name)
    return got


# --- files written with gguf's writer ------------------------------------------------------------

# Tensor types and shapes (slowest-first) of the kitchen-sink file; quantized ones get random
# bytes, so their dequantized values may be NaN.
KINDS = [
    (Q.F32, (3, 5)), (Q.F32, (7,)), (Q.F32, (2, 3, 4)), (Q.F16, (4, 8)), (Q.BF16, (2, 16)),
    (Q.F64, (3, 3)), (Q.I8, (5, 3)), (Q.I16, (6,)), (Q.I32, (2, 2)), (Q.I64, (3,)),
    (Q.Q4_0, (3, 64)), (Q.Q4_1, (2, 32)), (Q.Q5_0, (1, 32)), (Q.Q5_1, (2, 32)), (Q.Q8_0, (4, 64)),
    (Q.Q2_K, (2, 256)), (Q.Q3_K, (1, 256)), (Q.Q4_K, (3, 256)), (Q.Q5_K, (1, 512)),
    (Q.Q6_K, (2, 256)), (Q.IQ4_NL, (2, 32)), (Q.IQ4_XS, (1, 256)), (Q.IQ2_XXS, (1, 256)),
    (Q.TQ2_0, (1, 256)), (Q.Q8_1, (2, 32)),
]  # fmt: skip
PLAIN_NP = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
            Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}  # fmt: skip


def write_kitchen_sink(path, *, endianess=gguf.GGUFEndian.LITTLE, alignment=None, tensors=True):
    """Every metadata value type, nested arrays, odd strings, and tensors of many ggml types."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="llama", endianess=endianess)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 1e-5)
    w.add_float32("t.f32.nan", float("nan"))
    w.add_float32("t.f32.inf", float("-inf"))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ✓ 🦙")
    w.add_string("t.empty", "")
    w.add_string("t.nul", "a\x00b")
    w.add_array("t.strings", ["a", "", "Ġworld", "<|im_end|>", "日本", "\n"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25, 1e-5])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.bytes", b"\x00\x01\xff")
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.nested.strings", [["a", "bc"], ["d"]])
    w.add_array("t.nested.mixed", [["ab", "c"], [1, 2]])  # contents(): strings, and then?
    w.add_array("t.nested.mixed2", [[7], ["hi"]])
    w.add_array("t.deep", [[[1.5], [2.5, 3.5]], [[4.5]]])
    w.add_key_value("t.u16s", [1, 2, 65535], VT.ARRAY, sub_type=VT.UINT16)
    w.add_key_value("t.i64s", [-(2**63), 2**63 - 1], VT.ARRAY, sub_type=VT.INT64)
    w.add_key_value("t.f64s", [0.1, -2.5], VT.ARRAY, sub_type=VT.FLOAT64)
    w.add_key_value("t.u8s", [0, 200], VT.ARRAY, sub_type=VT.UINT8)
    w.add_token_list([f"tok{i}" for i in range(300)])
    w.add_token_scores([float(-i) for i in range(300)])
    w.add_token_types([1 + i % 6 for i in range(300)])
    w.add_token_merges(
        ["t o", "to k", "Ġ t", "1 0"] * 10
    )  # a string array last, as in vocabularies
    raws = {}
    if tensors:
        for i, (qtype, shape) in enumerate(KINDS):
            name = f"t{i}.{qtype.name.lower()}.weight"
            if qtype in PLAIN_NP:
                data = (rng.standard_normal(shape) * 50).astype(PLAIN_NP[qtype])
                w.add_tensor(name, data)
            else:
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block * size), np.uint8)
                w.add_tensor(name, data, raw_dtype=qtype)
            raws[name] = data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, raws


ENDIANS = [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG]


@pytest.mark.parametrize("endianess", ENDIANS, ids=lambda e: e.name)
@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_kitchen_sink_matches_gguf_reader(tmp_path, endianess, alignment):
    path, raws = write_kitchen_sink(tmp_path / "k.gguf", endianess=endianess, alignment=alignment)
    got = assert_matches_gguf_reader(path)
    assert got.byte_order == ("<" if endianess == gguf.GGUFEndian.LITTLE else ">")
    assert got.alignment == (alignment or 32) and got.data_start % got.alignment == 0
    # Not only equal to GGUFReader: the values written.
    meta = got.metadata
    assert meta["GGUF.version"] == 3 and meta["GGUF.tensor_count"] == len(KINDS)
    assert meta["t.u64"] == 2**64 - 1 and meta["t.i64"] == -(2**63)
    assert meta["t.true"] is True and meta["t.false"] is False
    assert meta["t.f32"] == float(np.float32(1e-5)) and type(meta["t.f32"]) is float
    assert meta["t.str"] == "héllo ✓ 🦙" and meta["t.nul"] == "a\x00b"
    assert meta["t.strings"] == ["a", "", "Ġworld", "<|im_end|>", "日本", "\n"]
    assert meta["t.bools"] == [True, False, True] and meta["t.bytes"] == [0, 1, 255]
    assert meta["t.nested"] == [1, 2, 3] and meta["t.nested.strings"] == ["a", "bc", "d"]
    assert meta["t.deep"] == [1.5, 2.5, 3.5, 4.5]
    assert meta["tokenizer.ggml.tokens"][299] == "tok299"
    for t in got.tensors:
        data = t.data()
        want = raws[t.name]
        assert data.shape == want.shape
        np.testing.assert_array_equal(data, want, err_msg=t.name)
        assert not data.flags.writeable


def test_vocabulary_only_file(tmp_path):
    path, _ = write_kitchen_sink(tmp_path / "v.gguf", tensors=False)
    got = assert_matches_gguf_reader(path)
    assert got.tensors == [] and got.metadata["GGUF.tensor_count"] == 0
    # Cut anywhere before the end of its last value (the merges, a string array): there is no
    # tensor data to find short, so the parser itself must notice.
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for at in range(0, got.header_end, 3):
        cut.write_bytes(data[:at])
        _expect_unreadable(cut)


ARCHS = ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_match_gguf_reader(tmp_path, tiny, arch):
    quantize = {
        "model.layers.0.self_attn.q_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.up_proj.weight": Q.Q4_1,
        "model.layers.0.mlp.down_proj.weight": Q.Q5_0,
    }
    path = tiny.write_gguf(tmp_path / f"{arch}.gguf", tiny.tensors(arch=arch), arch=arch,
                           quantize=quantize)  # fmt: skip
    got = assert_matches_gguf_reader(path)
    assert jgguf.read_metadata(path) == got.metadata


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_big_endian_model_loads_as_the_little_endian_one(tmp_path, tiny, monkeypatch, arch):
    tensors = tiny.tensors(arch=arch)
    little = jio.load_gguf(tiny.write_gguf(tmp_path / "le.gguf", tensors, arch=arch))
    big_writer = functools.partial(gguf.GGUFWriter, endianess=gguf.GGUFEndian.BIG)
    monkeypatch.setattr(gguf, "GGUFWriter", big_writer)
    path = tiny.write_gguf(tmp_path / "be.gguf", tensors, arch=arch)
    monkeypatch.undo()
    assert R.read_gguf(path).byte_order == ">"
    assert_matches_gguf_reader(path)
    big = jio.load_gguf(path)
    assert big.config == little.config
    assert set(big.tensors) == set(little.tensors)
    for name, value in little.tensors.items():
        np.testing.assert_array_equal(big.tensors[name], value, err_msg=name)
        assert big.tensors[name].dtype == np.float32 and big.tensors[name].dtype.isnative


def test_load_gguf_does_not_use_gguf_reader(tmp_path, tiny, monkeypatch):
    path = tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors(),
                           quantize={"model.layers.1.mlp.up_proj.weight": Q.Q8_0})  # fmt: skip

    def no_reader(*args, **kwargs):
        raise AssertionError("gguf.GGUFReader is not to be used")

    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    ckpt = jio.load_gguf(path)
    assert ckpt.tokenizer is not None and "model.embed_tokens.weight" in ckpt.tensors
    assert jgguf.read_metadata(path)["general.architecture"] == "llama"


@pytest.mark.slow
def test_smollm_matches_gguf_reader(smollm_path):
    got = assert_matches_gguf_reader(smollm_path)
    assert len(got.metadata["tokenizer.ggml.tokens"]) == 49152
    assert {t.tensor_type for t in got.tensors} >= {Q.Q4_1, Q.F32}


# --- hand-assembled files: what gguf's writer will not write ------------------------------------


def _s(b: bytes, o: str = "<") -> bytes:
    return struct.pack(o + "Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes, o: str = "<") -> bytes:
    return _s(key.encode(), o) + struct.pack(o + "I", vtype) + payload


def _arr(itype: int, count: int, items: bytes, o: str = "<") -> bytes:
    return struct.pack(o + "IQ", itype, count) + items


def assemble(kvs, tensors=(), data=b"", *, o="<", version=3, n_kv=None, n_tensors=None,
             align=32) -> bytes:  # fmt: skip
    """A GGUF file from encoded key/values and tensor records; the counts may be overridden."""
    n_tensors = len(tensors) if n_tensors is None else n_tensors
    n_kv = len(kvs) if n_kv is None else n_kv
    head = b"GGUF" + struct.pack(o + "IQQ", version, n_tensors, n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\x00" * ((-len(body)) % align) + data


def _tensor(name: str, dims: list[int], qtype: int, offset: int, o: str = "<") -> bytes:
    dims_bytes = struct.pack(f"{o}{len(dims)}Q", *dims)
    return (
        _s(name.encode(), o)
        + struct.pack(o + "I", len(dims))
        + dims_bytes
        + struct.pack(o + "IQ", qtype, offset)
    )


def _odd_kvs(o: str) -> list[bytes]:
    u32 = lambda *v: struct.pack(f"{o}{len(v)}I", *v)
    empty_strings = _arr(VT.STRING, 0, b"", o)
    return [
        _kv("empty.ints", VT.ARRAY, _arr(VT.INT32, 0, b"", o), o),
        _kv("empty.bad_type", VT.ARRAY, _arr(99, 0, b"", o), o),  # gguf-py ignores the type
        _kv(
            "empty.first",
            VT.ARRAY,
            _arr(VT.ARRAY, 2, empty_strings + _arr(VT.UINT32, 2, u32(5, 6), o), o),
            o,
        ),
        _kv(
            "empty.first.strings",
            VT.ARRAY,
            _arr(
                VT.ARRAY,
                2,
                _arr(VT.INT8, 0, b"", o) + _arr(VT.STRING, 2, _s(b"hi", o) + _s(b"\xc3\xa9", o), o),
                o,
            ),
            o,
        ),
        _kv(
            "ints.then.strings",
            VT.ARRAY,
            _arr(
                VT.ARRAY,
                2,
                _arr(VT.UINT8, 2, b"\x41\x42", o) + _arr(VT.STRING, 1, _s(b"xyz", o), o),
                o,
            ),
            o,
        ),
        _kv(
            "strings.then.u16",
            VT.ARRAY,
            _arr(
                VT.ARRAY,
                2,
                _arr(VT.STRING, 1, _s(b"q", o), o)
                + _arr(VT.UINT16, 1, struct.pack(o + "H", 0x4142), o),
                o,
            ),
            o,
        ),
        _kv("bool.two", VT.BOOL, b"\x02", o),
        _kv("bools.odd", VT.ARRAY, _arr(VT.BOOL, 3, b"\x00\x01\x07", o), o),
        _kv("empty.key.next", VT.STRING, _s(b"", o), o),
        _kv("", VT.UINT32, u32(1), o),  # an empty key
    ]


@pytest.mark.parametrize("o", ["<", ">"])
def test_odd_arrays_match_gguf_reader(tmp_path, o):
    """Empty arrays, nested arrays whose first element is empty or of another type than the
    rest: gguf-py flattens them by the first element's types; so must we."""
    path = tmp_path / "odd.gguf"
    f32 = np.arange(12, dtype=np.float32).reshape(3, 4).astype(o + "f4")
    tensors = [_tensor("a", [4, 3], Q.F32, 0, o), _tensor("scalar", [], Q.F32, 64, o),
               _tensor("empty", [0, 3], Q.F32, 64, o)]  # fmt: skip
    data = f32.tobytes() + b"\x00" * 16 + np.array([2.5], o + "f4").tobytes()
    path.write_bytes(assemble(_odd_kvs(o), tensors, data, o=o))
    got = assert_matches_gguf_reader(path)
    meta = got.metadata
    assert meta["empty.ints"] == [] and meta["empty.bad_type"] == []
    assert meta["empty.first"] == [5, 6]
    assert meta["empty.first.strings"] == [104, 105, 0xC3, 0xA9]  # bytes, as gguf-py gives
    assert meta["ints.then.strings"] == [0x41, 0x42, 120, 121, 122]
    assert meta["bool.two"] is True and meta[""] == 1
    a, scalar, empty = got.tensors
    np.testing.assert_array_equal(a.data(), f32)
    assert scalar.data().shape == () and scalar.data() == 2.5 and empty.data().shape == (3, 0)


def test_version_2_file(tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(assemble([_kv("general.architecture", VT.STRING, _s(b"llama"))],
                              version=2))  # fmt: skip
    assert assert_matches_gguf_reader(path).metadata["GGUF.version"] == 2


# --- truncated and corrupt files -----------------------------------------------------------------


def _expect_unreadable(path, match=UNREADABLE):
    with pytest.raises(ValueError, match=match) as info:
        jgguf.read_metadata(path)
    return info


def test_every_cut_is_one_clear_error(tmp_path):
    """Cut inside the header, any key, string array, tensor record, padding or tensor data: one
    ValueError, naming the tensor when the header is whole."""
    path, _ = write_kitchen_sink(tmp_path / "k.gguf")
    data = path.read_bytes()
    whole = R.read_gguf(path)
    header_end = whole.header_end
    assert whole.data_start - whole.alignment < header_end <= whole.data_start
    last_end = max(t.data_offset + t.n_bytes for t in whole.tensors)
    cut = tmp_path / "cut.gguf"
    cuts = list(range(whole.data_start + 1)) + list(range(whole.data_start + 1, last_end, 7))
    for at in cuts:
        cut.write_bytes(data[:at])
        with pytest.raises(ValueError, match=r"cut\.gguf.*(not a readable GGUF|truncated)") as e:
            jgguf.read_metadata(cut)
        if at >= header_end:  # the records are whole: the tensor is named
            assert "is truncated: tensor t" in str(e.value), at
        else:
            assert "not a readable GGUF" in str(e.value), at
    # The tensor named is one that really ends past the cut.
    cut.write_bytes(data[: last_end - 1])
    last = max(whole.tensors, key=lambda t: t.data_offset + t.n_bytes)
    _expect_unreadable(cut, rf"cut\.gguf is truncated: tensor {last.name} ends past")
    with pytest.raises(ValueError, match=f"{last.name} ends past the end"):
        [t for t in R.read_gguf(cut).tensors if t.name == last.name][0].data()


def test_truncated_model_fails_to_load(tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors())
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for at in (10, 100, 1000, len(data) // 2, len(data) - 1):
        cut.write_bytes(data[:at])
        with pytest.raises(ValueError, match=r"cut\.gguf.*(not a readable GGUF|truncated)"):
            jio.load_gguf(cut)


ARCH_KV = _kv("general.architecture", VT.STRING, _s(b"llama"))
BIG = 2**63 + 5
CORRUPT = {
    "bad magic": b"GGUG" + assemble([ARCH_KV])[4:],
    "version 1": assemble([ARCH_KV], version=1),
    "version 4": assemble([ARCH_KV], version=4),
    "too short": b"GGUF\x03\x00\x00\x00",
    "n_kv beyond the file": assemble([ARCH_KV], n_kv=BIG),
    "n_kv one too many": assemble([ARCH_KV], n_kv=2, align=1),
    "n_tensors beyond the file": assemble([ARCH_KV], n_tensors=BIG),
    "key length beyond the file": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, BIG) + b"key",
    "key length one past the end": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 4) + b"key",
    "string length beyond the file": assemble([_kv("s", VT.STRING, struct.pack("<Q", BIG))]),
    "string length past the end": assemble(
        [_kv("s", VT.STRING, struct.pack("<Q", 40) + b"ab")], align=1
    ),
    "string array count beyond the file": assemble([_kv("a", VT.ARRAY, _arr(VT.STRING, BIG, b""))]),
    "string array count one too many": assemble(
        [_kv("a", VT.ARRAY, _arr(VT.STRING, 3, _s(b"x") + _s(b"y")))], align=1
    ),
    "last string of the last array cut short": assemble(
        [_kv("a", VT.ARRAY, _arr(VT.STRING, 2, _s(b"x") + struct.pack("<Q", 5) + b"ab"))], align=1
    ),
    "last value cut short": assemble([_kv("a", VT.UINT64, b"\x01\x02")], align=1),
    "string array item length": assemble(
        [_kv("a", VT.ARRAY, _arr(VT.STRING, 2, _s(b"x") + struct.pack("<Q", BIG) + b"y"))]
    ),
    "int array count beyond the file": assemble([_kv("a", VT.ARRAY, _arr(VT.INT32, BIG, b""))]),
    "int array count a bit too big": assemble(
        [_kv("a", VT.ARRAY, _arr(VT.INT32, 5, b"\x00" * 16))], align=1
    ),
    "nested array count": assemble([_kv("a", VT.ARRAY, _arr(VT.ARRAY, BIG, b""))]),
    "unknown value type": assemble([_kv("a", 13, b"\x00" * 8)]),
    "unknown array item type": assemble([_kv("a", VT.ARRAY, _arr(42, 1, b"\x00" * 8))]),
    "bad utf-8 key": assemble([_s(b"\xff\xfe") + struct.pack("<I", VT.UINT8) + b"\x01"]),
    "bad utf-8 value": assemble([_kv("s", VT.STRING, _s(b"a\xc3"))]),
    "bad utf-8 in a string array": assemble(
        [_kv("a", VT.ARRAY, _arr(VT.STRING, 2, _s(b"ok") + _s(b"\x80")))]
    ),
    "duplicate key": assemble([ARCH_KV, ARCH_KV]),
    "key named like a pseudo-field": assemble([_kv("GGUF.version", VT.UINT32, b"\x03\0\0\0")]),
    "alignment zero": assemble([_kv("general.alignment", VT.UINT32, b"\0\0\0\0")]),
    "alignment not a power of two": assemble([_kv("general.alignment", VT.UINT32, b"\3\0\0\0")]),
    "alignment not a uint32": assemble([_kv("general.alignment", VT.UINT64, b"\x20" + b"\0" * 7)]),
    "n_dims beyond the file": assemble([ARCH_KV], [_s(b"t") + struct.pack("<I", 2**32 - 1)]),
    "unknown tensor type": assemble([ARCH_KV], [_tensor("t", [4], 77, 0)], b"\0" * 16),
    "duplicate tensor": assemble(
        [ARCH_KV], [_tensor("t", [4], 0, 0), _tensor("t", [4], 0, 16)], b"\0" * 32
    ),
    "bad utf-8 tensor name": assemble(
        [ARCH_KV], [_s(b"\xff") + struct.pack("<IQIQ", 1, 4, 0, 0)], b"\0" * 16
    ),
    "partial quant block": assemble([ARCH_KV], [_tensor("t", [48], Q.Q8_0, 0)], b"\0" * 64),
    "quant scalar": assemble([ARCH_KV], [_tensor("t", [], Q.Q8_0, 0)], b"\0" * 64),
    "deeply nested arrays": assemble(
        [_kv("a", VT.ARRAY, struct.pack("<IQ", VT.ARRAY, 1) * 200_000)]
    ),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_file_is_one_clear_error(tmp_path, name):
    path = tmp_path / "bad.gguf"
    path.write_bytes(CORRUPT[name])
    info = _expect_unreadable(path, r"bad\.gguf is not a readable GGUF file \(GGUFFormatError: ")
    assert isinstance(info.value.__cause__, R.GGUFFormatError)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        jio.load_gguf(path)


def test_tensor_past_the_end_is_named(tmp_path):
    path = tmp_path / "bad.gguf"
    tensors = [_tensor("blk.0.attn_q.weight", [4, 4], Q.F32, 0), _tensor("far", [4], Q.F32, BIG)]
    path.write_bytes(assemble([ARCH_KV], tensors, b"\0" * 64))
    _expect_unreadable(path, r"bad\.gguf is truncated: tensor far ends past the end of the file")
    with pytest.raises(ValueError, match="tensor far ends past the end of the file"):
        R.read_gguf(path).tensors[1].data()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        jgguf.read_metadata(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        jgguf.read_metadata(tmp_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_unreadable(empty)
