"""Every GGUF tensor type the installed `gguf` can dequantize loads as its float weights.

For each `gguf.GGMLQuantizationType` that `gguf.quants.dequantize` supports (K-quants, I-quants,
ternary and FP4 types included), a tiny llama GGUF stores its matrices in that type as random
raw blocks, and `load_gguf` must give exactly what `gguf.quants.dequantize` gives for those
bytes, in HF (out, in) layout, with Q/K rows back in HF order. The types the installed gguf
cannot dequantize are listed here, so that a gguf upgrade that changes them fails a test instead
of passing silently.

So that this is not only gguf checked against itself, Q8_0 and the K-quants (Q2_K ... Q6_K) are
also dequantized by NumPy code written here from ggml's block layouts (ggml-quants.c,
`dequantize_row_q4_K` etc.), not by calling gguf.
"""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

import jquant
from jquant import io as jio

Q = gguf.GGMLQuantizationType

# The tiny model: rows (in-features) are multiples of 256, the K-/I-quant super-block.
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 2, 4, 2, 64, 320

# What `gguf.quants.dequantize` of the installed gguf (0.19.0) raises NotImplementedError for.
EXPECTED_UNSUPPORTED = {Q.Q8_1, Q.Q8_K, Q.Q1_0, Q.I8, Q.I16, Q.I32, Q.I64, Q.F64}

# Byte offsets, inside one block, of the float16 scales of each supported type (ggml-common.h
# block structs); every other byte is random. None: the type is itself a float (F32, F16, BF16)
# or its scales are not float16 (IQ1_M, MXFP4, NVFP4): `random_blocks` handles those.
HALF_FIELDS: dict[Q, tuple[int, ...] | None] = {
    Q.F32: None, Q.F16: None, Q.BF16: None,
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),  # scales[16] qs[64] d dmin
    Q.Q3_K: (108,),  # hmask[32] qs[64] scales[12] d
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),  # d dmin scales[12] (qh[32]) qs[128]
    Q.Q6_K: (208,),  # ql[128] qh[64] scales[16] d
    Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,), Q.IQ3_XXS: (0,), Q.IQ3_S: (0,),
    Q.IQ1_S: (0,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,),
    Q.IQ1_M: None,  # d is split over the top nibbles of the four uint16 scales at bytes 48..55
    Q.TQ1_0: (52,),  # qs[48] qh[4] d
    Q.TQ2_0: (64,),  # qs[64] d
    Q.MXFP4: None,  # one E8M0 exponent byte, then 16 bytes of E2M1 pairs
    Q.NVFP4: None,  # four UE4M3 scale bytes, then 32 bytes of E2M1 pairs
}  # fmt: skip


def _dequantizes(qtype: Q) -> bool:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


SUPPORTED = [q for q in Q if _dequantizes(q)]
UNSUPPORTED = [q for q in Q if q not in SUPPORTED]


def _halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` float16 scales, finite and modest: magnitude in [1e-3, 1e-2], either sign."""
    d = rng.uniform(1e-3, 1e-2, n) * rng.choice([-1.0, 1.0], n)
    return d.astype(np.float16)


def random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """`n_blocks` random blocks of `qtype`, uint8 (n_blocks, type_size), all scales modest."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (Q.F32, Q.F16, Q.BF16):  # one value per "block"
        x = (0.1 * rng.standard_normal(n_blocks)).astype(np.float32)
        if qtype == Q.F16:
            x = x.astype(np.float16)
        elif qtype == Q.BF16:
            x = (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16: the top half
        return x.view(np.uint8).reshape(n_blocks, type_size)
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype] or ():
        blocks[:, offset : offset + 2] = _halves(rng, n_blocks).view(np.uint8).reshape(-1, 2)
    if qtype == Q.IQ1_M:
        d = _halves(rng, n_blocks).view(np.uint16)
        scales = blocks[:, 48:56].copy().view("<u2")  # (n_blocks, 4)
        for k in range(4):
            nibble = (d >> np.uint16(4 * k)) & np.uint16(0xF)
            scales[:, k] = (scales[:, k] & np.uint16(0x0FFF)) | (nibble << np.uint16(12))
        blocks[:, 48:56] = scales.view(np.uint8)
    elif qtype == Q.MXFP4:
        blocks[:, 0] = rng.integers(117, 128, n_blocks)  # E8M0 e, halved: scale 2^(e-128)
    elif qtype == Q.NVFP4:
        blocks[:, :4] = rng.integers(0, 0x40, (n_blocks, 4))  # exponent <= 7: at most ~0.94
    return blocks


def random_rows(qtype: Q, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Raw bytes of a (rows, cols) tensor in `qtype`: uint8 (rows, bytes per row)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    assert cols % block_size == 0, (qtype.name, shape)
    blocks = random_blocks(qtype, rows * cols // block_size, rng)
    return blocks.reshape(rows, cols // block_size * type_size)


# --- the tiny model -----------------------------------------------------------------------------


def tensor_table() -> list[tuple[str, str, tuple[int, ...]]]:
    """(llama.cpp name, HF name, HF shape) of every tensor of the tiny llama (tied: no
    `output.weight`)."""
    table = [
        ("token_embd.weight", "model.embed_tokens.weight", (VOCAB, HIDDEN)),
        ("output_norm.weight", "model.norm.weight", (HIDDEN,)),
    ]
    per_layer = [
        ("attn_norm", "input_layernorm", (HIDDEN,)),
        ("ffn_norm", "post_attention_layernorm", (HIDDEN,)),
        ("attn_q", "self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)),
        ("attn_k", "self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
        ("attn_v", "self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
        ("attn_output", "self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
        ("ffn_gate", "mlp.gate_proj", (FFN, HIDDEN)),
        ("ffn_up", "mlp.up_proj", (FFN, HIDDEN)),
        ("ffn_down", "mlp.down_proj", (HIDDEN, FFN)),
    ]
    for i in range(LAYERS):
        for gg, hf, shape in per_layer:
            table.append((f"blk.{i}.{gg}.weight", f"model.layers.{i}.{hf}.weight", shape))
    return table


MATRICES = [hf for _, hf, shape in tensor_table() if len(shape) == 2]


def write_model(
    path, qtypes: dict[str, Q], *, seed: int = 0, raw: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Write the tiny llama GGUF; matrices named (HF names) in `qtypes` are stored in that type
    as random raw blocks (or as `raw[name]`, bytes given), the rest as float32. Returns
    {HF name: raw uint8 bytes as stored}.

    The blocks are written as they are: in the file, Q/K rows are in llama.cpp's (permuted)
    order, as a converter would have left them.
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(VOCAB)
    raws = {}
    for name, hf, shape in tensor_table():
        if hf in qtypes:
            given = (raw or {}).get(hf)
            raws[hf] = random_rows(qtypes[hf], shape, rng) if given is None else given
            w.add_tensor(name, raws[hf], raw_dtype=qtypes[hf])
        elif len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
        else:
            w.add_tensor(name, (0.05 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raws


def gguf_order(hf: str, w: np.ndarray, permute) -> np.ndarray:
    """An HF-layout tensor with its rows in the file's order (llama.cpp permutes Q and K)."""
    if ".q_proj." in hf:
        return permute(w, HEADS)
    if ".k_proj." in hf:
        return permute(w, KV_HEADS)
    return w


# --- independent NumPy dequantizers, from ggml-quants.c -----------------------------------------


def _half(b: np.ndarray) -> np.float32:
    return np.frombuffer(b[:2].tobytes(), "<f2")[0].astype(np.float32)


def ref_q8_0(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q8_0: block_q8_0 {half d; int8 qs[32]}; y = qs[j] * d."""
    out = []
    for b in blocks:
        d = _half(b[0:2])
        out.append(b[2:34].view(np.int8).astype(np.float32) * d)
    return np.concatenate(out)


def ref_q2_k(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q2_K: {uint8 scales[16]; uint8 qs[64]; half d; half dmin}."""
    out = []
    for b in blocks:
        scales, qs, d, dmin = b[0:16].tolist(), b[16:80], _half(b[80:82]), _half(b[82:84])
        is_ = 0
        for n in range(0, 256, 128):
            q = qs[n // 4 : n // 4 + 32]
            for shift in (0, 2, 4, 6):
                for half in (q[0:16], q[16:32]):
                    sc = scales[is_]
                    is_ += 1
                    dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                    out.append(dl * ((half >> shift) & 3).astype(np.float32) - ml)
    return np.concatenate(out)


def ref_q3_k(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q3_K: {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d}."""
    kmask1, kmask2 = 0x03030303, 0x0F0F0F0F
    out = []
    for b in blocks:
        hm, qs, d_all = b[0:32], b[32:96], _half(b[108:110])
        aux = np.frombuffer(b[96:108].tobytes(), "<u4").tolist()
        tmp = aux[2]
        aux = [
            (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4),
            (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4),
            ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
            ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
        ]
        scales = np.array(aux, "<u4").view(np.int8).tolist()
        is_, m = 0, 1
        for n in range(0, 256, 128):
            q = qs[n // 4 : n // 4 + 32]
            for shift in (0, 2, 4, 6):
                for lo in (0, 16):
                    dl = d_all * np.float32(scales[is_] - 32)
                    is_ += 1
                    low = ((q[lo : lo + 16] >> shift) & 3).astype(np.int8)
                    high = np.where(hm[lo : lo + 16] & m, 0, 4).astype(np.int8)
                    out.append(dl * (low - high).astype(np.float32))
                m <<= 1
    return np.concatenate(out)


def _scale_min_k4(j: int, q: list[int]) -> tuple[int, int]:
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j from scales[12]."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q4_K: {half d; half dmin; uint8 scales[12]; uint8 qs[128]}."""
    out = []
    for b in blocks:
        d, dmin, scales, qs = _half(b[0:2]), _half(b[2:4]), b[4:16].tolist(), b[16:144]
        for is_, j in zip(range(0, 8, 2), range(0, 256, 64)):
            q = qs[j // 2 : j // 2 + 32]
            sc, m = _scale_min_k4(is_, scales)
            out.append(d * np.float32(sc) * (q & 0xF).astype(np.float32) - dmin * np.float32(m))
            sc, m = _scale_min_k4(is_ + 1, scales)
            out.append(d * np.float32(sc) * (q >> 4).astype(np.float32) - dmin * np.float32(m))
    return np.concatenate(out)


def ref_q5_k(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q5_K: {half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}."""
    out = []
    for b in blocks:
        d, dmin, scales = _half(b[0:2]), _half(b[2:4]), b[4:16].tolist()
        qh, ql = b[16:48], b[48:176]
        u1, u2 = 1, 2
        for is_, j in zip(range(0, 8, 2), range(0, 256, 64)):
            q = ql[j // 2 : j // 2 + 32]
            sc, m = _scale_min_k4(is_, scales)
            v = (q & 0xF).astype(np.float32) + np.where(qh & u1, 16, 0).astype(np.float32)
            out.append(d * np.float32(sc) * v - dmin * np.float32(m))
            sc, m = _scale_min_k4(is_ + 1, scales)
            v = (q >> 4).astype(np.float32) + np.where(qh & u2, 16, 0).astype(np.float32)
            out.append(d * np.float32(sc) * v - dmin * np.float32(m))
            u1, u2 = u1 << 2, u2 << 2
    return np.concatenate(out)


def ref_q6_k(blocks: np.ndarray) -> np.ndarray:
    """dequantize_row_q6_K: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d}."""
    out = []
    l = np.arange(32)  # noqa: E741 (ggml's loop variable)
    is_ = l // 16
    for b in blocks:
        d = _half(b[208:210])
        y = np.empty(256, np.float32)
        for n in range(0, 256, 128):
            ql, qh = b[n // 2 : n // 2 + 64], b[128 + n // 4 : 128 + n // 4 + 32]
            sc = b[192 + n // 16 : 192 + n // 16 + 8].view(np.int8).astype(np.float32)
            q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)).astype(np.int8) - 32
            q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)).astype(np.int8) - 32
            q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)).astype(np.int8) - 32
            q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)).astype(np.int8) - 32
            y[n + l] = d * sc[is_ + 0] * q1.astype(np.float32)
            y[n + l + 32] = d * sc[is_ + 2] * q2.astype(np.float32)
            y[n + l + 64] = d * sc[is_ + 4] * q3.astype(np.float32)
            y[n + l + 96] = d * sc[is_ + 6] * q4.astype(np.float32)
        out.append(y)
    return np.concatenate(out)


REFERENCE = {
    Q.Q8_0: ref_q8_0,
    Q.Q2_K: ref_q2_k,
    Q.Q3_K: ref_q3_k,
    Q.Q4_K: ref_q4_k,
    Q.Q5_K: ref_q5_k,
    Q.Q6_K: ref_q6_k,
}


def reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    """Our own dequantization of raw (rows, bytes per row) data: (rows, elements per row)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.shape[0]
    return REFERENCE[qtype](raw.reshape(-1, type_size)).reshape(rows, -1)


# --- the tests ----------------------------------------------------------------------------------


def test_unsupported_types_are_the_expected_ones():
    """A gguf upgrade that adds (or drops) a dequantizer shows up here: update the lists."""
    assert set(UNSUPPORTED) == EXPECTED_UNSUPPORTED, sorted(q.name for q in UNSUPPORTED)
    assert set(SUPPORTED) == set(HALF_FIELDS), sorted(q.name for q in SUPPORTED)
    assert {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ2_XXS} <= set(SUPPORTED)


@pytest.mark.parametrize("qtype", list(REFERENCE), ids=lambda q: q.name)
def test_reference_dequantizers_agree_with_gguf(qtype):
    """Our ggml-derived dequantizers and gguf's agree bit for bit on random blocks."""
    blocks = random_blocks(qtype, 24, np.random.default_rng(int(qtype)))
    want = REFERENCE[qtype](blocks)
    got = gguf.quants.dequantize(blocks, qtype).reshape(-1)
    assert want.dtype == np.float32 and want.shape == (24 * gguf.GGML_QUANT_SIZES[qtype][0],)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_every_supported_type_loads_as_its_dequantized_values(tmp_path, tiny, qtype):
    """All 15 matrices stored in `qtype` load as gguf's dequantization of their bytes, HF
    (out, in), Q/K rows in HF order; for Q8_0 and the K-quants, also as our own decoder's."""
    path = tmp_path / f"{qtype.name}.gguf"
    raws = write_model(path, dict.fromkeys(MATRICES, qtype), seed=int(qtype))
    ckpt = jio.load_gguf(path, tokenizer=False)
    shapes = {hf: shape for _, hf, shape in tensor_table()}
    assert set(ckpt.tensors) == set(shapes)
    for hf, raw in raws.items():
        got = ckpt.tensors[hf]
        assert got.dtype == np.float32 and got.shape == shapes[hf], hf  # HF (out, in)
        want = gguf.quants.dequantize(raw, qtype)
        assert want.shape == shapes[hf], hf  # GGUF rows are HF's out-features
        assert np.isfinite(want).all() and 0 < np.abs(want).max() < 1e3, hf
        np.testing.assert_array_equal(gguf_order(hf, got, tiny.permute), want, err_msg=hf)
    if qtype in REFERENCE:  # and the loaded values are ggml's, by our own decoder
        for hf in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            want = reference(raws[hf], qtype)
            np.testing.assert_array_equal(gguf_order(hf, ckpt.tensors[hf], tiny.permute), want)


# Plain numbers gguf reads but has no "dequantizer" for: jquant loads them as their values.
PLAIN = {Q.I8: np.int8, Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64, Q.F64: np.float64}


@pytest.mark.parametrize("qtype", list(PLAIN), ids=lambda q: q.name)
def test_plain_number_types_load_as_their_values(tmp_path, qtype):
    name = "model.layers.1.mlp.up_proj.weight"
    values = np.random.default_rng(0).integers(-100, 100, (FFN, HIDDEN)).astype(PLAIN[qtype])
    path = tmp_path / f"{qtype.name}.gguf"
    write_model(path, {name: qtype}, raw={name: values})
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert stored["blk.1.ffn_up.weight"] == qtype
    got = jio.load_gguf(path, tokenizer=False).tensors[name]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32))


@pytest.mark.parametrize("qtype", sorted(EXPECTED_UNSUPPORTED - set(PLAIN)), ids=lambda q: q.name)
def test_unsupported_type_is_one_clear_error(tmp_path, qtype):
    """A file with a type gguf cannot dequantize fails with one ValueError naming the tensor."""
    name = "model.layers.1.mlp.up_proj.weight"
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    # Any bytes will do: no value is computed from them.
    raw = np.random.default_rng(0).integers(
        0, 256, (FFN, HIDDEN // block_size * type_size), dtype=np.uint8
    )
    path = tmp_path / f"{qtype.name}.gguf"
    write_model(path, {name: qtype}, raw={name: raw})
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert stored["blk.1.ffn_up.weight"] == qtype
    with pytest.raises(ValueError, match=rf"blk\.1\.ffn_up\.weight has type {qtype.name}, .*"
                                         "cannot dequantize"):  # fmt: skip
        jio.load_gguf(path, tokenizer=False)


def _kquant_mix() -> dict[str, Q]:
    """Q4_K_M-like: Q6_K for the embedding, V and down projections, Q4_K for the rest."""
    six = ("embed_tokens", "v_proj", "down_proj")
    return {hf: Q.Q6_K if any(s in hf for s in six) else Q.Q4_K for hf in MATRICES}


@pytest.fixture(scope="module")
def kquant_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kquant") / "tiny-Q4_K_M.gguf"
    raws = write_model(path, _kquant_mix(), seed=7)
    return path, raws


def test_truncated_kquant_file_is_one_clear_error(kquant_file, tmp_path):
    path, _ = kquant_file
    data = path.read_bytes()
    reader = gguf.GGUFReader(path)
    last = max(reader.tensors, key=lambda t: t.data_offset + t.n_bytes)
    assert last.tensor_type in (Q.Q4_K, Q.Q6_K)
    end = int(last.data_offset + last.n_bytes)
    del reader
    # Inside the last K-quant tensor (1 byte, one block, half of it short), inside the tensor
    # data, and inside the header.
    for cut_at in (end - 1, end - 144, end - last.n_bytes // 2, len(data) // 2, 40):
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(data[:cut_at])
        with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
            jio.load_gguf(cut, tokenizer=False)


def test_kquant_model_runs_with_finite_logits(kquant_file):
    path, raws = kquant_file
    model, params, tokenizer = jquant.models.load(str(path))
    assert tokenizer is None  # the file has no tokenizer metadata
    tokens = np.array([[1, 5, 99, 300, 7, 42]], np.int32)
    logits, _ = jquant.models.forward(model, params, tokens)
    logits = np.asarray(jax.device_get(logits))
    assert logits.shape == (1, tokens.shape[1], VOCAB)
    assert np.isfinite(logits).all() and np.abs(logits).max() > 0
    # The model holds the dequantized K-quant weights; its kernels are (in, out), HF's transpose.
    embed = np.asarray(params["embed_tokens"]["embedding"][...])
    np.testing.assert_array_equal(embed, reference(raws["model.embed_tokens.weight"], Q.Q6_K))
    down = np.asarray(params["layers"][1]["mlp"]["down_proj"]["kernel"][...])
    raw = raws["model.layers.1.mlp.down_proj.weight"]
    assert down.shape == (FFN, HIDDEN)
    np.testing.assert_array_equal(down, reference(raw, Q.Q6_K).T)
    np.testing.assert_array_equal(down, gguf.quants.dequantize(raw, Q.Q6_K).T)
