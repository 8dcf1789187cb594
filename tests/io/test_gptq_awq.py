"""GPTQ / AWQ checkpoints: import with the file's integer codes, export as GPTQ v1 and v2.

Always-on tests pin vectors worked by hand from the packers' documented layouts, round-trip
jquant → GPTQ → jquant on the tiny model, and name every bad-file error. The `reference`
tests judge the layouts with GPTQModel 7.7.0's own packing and dequantization code (its
pure-torch modules, loaded from the unpacked sdist named by ``JQUANT_GPTQMODEL_SRC``).
"""

import json

import numpy as np
import pytest

from jquant.io import _gptq_layout as layout
from jquant.io._int32_pack import pack_int32
from jquant.io.gptq_awq import read_gptq_awq, write_gptq
from jquant.models import forward, params_from_hf
from jquant.models.config import LlamaConfig
from jquant.qarray import QArray, from_codes, quantize_array

KERNELS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def _words(*values) -> np.ndarray:
    return np.array(values, np.uint32).view(np.int32)


# ---- hand-worked vectors -------------------------------------------------------------------


def _gptq_parts(n_in, n_out, bits, qzero_word, *, codes_word=0):
    return {
        "qweight": np.full((n_in * bits // 32, n_out), codes_word, np.uint32).view(np.int32),
        "qzeros": np.full((1, n_out * bits // 32), qzero_word, np.uint32).view(np.int32),
        "scales": np.full((1, n_out), 0.5, np.float16),
        "g_idx": np.zeros(n_in, np.int32),
    }


def test_symmetric_4bit_v1_zeros_0x77777777_are_8():
    parts = _gptq_parts(8, 8, 4, 0x77777777, codes_word=0x76543210)
    codes, scale, zero = layout.gptq_to_codes("m", parts, bits=4, group_size=None, version=1)
    np.testing.assert_array_equal(zero, np.full((8, 1), 8))
    # qweight packs the inputs of one output, lowest nibble first: input i holds code i.
    np.testing.assert_array_equal(codes, np.tile(np.arange(8), (8, 1)))
    assert scale.dtype == np.float16
    # v2 stores the zero point itself.
    _, _, zero2 = layout.gptq_to_codes(
        "m", _gptq_parts(8, 8, 4, 0x88888888), bits=4, group_size=None, version=2
    )
    np.testing.assert_array_equal(zero2, np.full((8, 1), 8))


def test_gptq_3bit_code_straddling_two_words():
    # Input 10 occupies stream bits 30..32: bits 30-31 of word 0 and bit 0 of word 1.
    qweight = _words(0b11 << 30, 0b1, 0).reshape(3, 1)
    parts = {"qweight": qweight, "qzeros": _words(0, 0, 0).reshape(1, 3),
             "scales": np.ones((1, 1), np.float16), "g_idx": np.zeros(32, np.int32)}  # fmt: skip
    # 1 output needs only ceil(3/32) = 1 qzeros word: the 3-word row above is the wrong length.
    with pytest.raises(ValueError, match=r"m\.qzeros has shape \(1, 3\), expected \(1, 1\)"):
        layout.gptq_to_codes("m", parts, bits=3, group_size=None, version=2)
    parts["qzeros"] = _words(0).reshape(1, 1)
    codes, _, _ = layout.gptq_to_codes("m", parts, bits=3, group_size=None, version=2)
    want = np.zeros(32, np.uint8)
    want[10] = 7
    np.testing.assert_array_equal(codes[0], want)


def test_awq_interleave_on_a_hand_worked_word():
    # Outputs 0..7 hold codes 0..7; nibble i (lowest first) holds output AWQ_ORDER[i]:
    # nibbles 0,2,4,6,1,3,5,7 → 0x75316420.
    parts = {"qweight": _words(0x75316420).reshape(1, 1),
             "qzeros": _words(0x75316420).reshape(1, 1),
             "scales": np.ones((1, 8), np.float16)}  # fmt: skip
    codes, _, zero = layout.awq_to_codes("m", parts, group_size=None)
    np.testing.assert_array_equal(codes[:, 0], np.arange(8))
    np.testing.assert_array_equal(zero[:, 0], np.arange(8))


# ---- tiny model directories ----------------------------------------------------------------


def _quantized_tensors(tiny, qtype, group_size, *, rng_seed=0, zero_low=0):
    """The tiny model's HF tensors with every linear a QArray of ``qtype`` whose scales
    float16 holds exactly and whose zero points lie in ``[zero_low, 2^b − 1]``."""
    rng = np.random.default_rng(rng_seed)
    tensors = tiny.tensors(tied=False)
    bits = int(qtype.lstrip("uint"))
    for layer in range(tiny.shape["layers"]):
        for module in KERNELS:
            name = f"model.layers.{layer}.{module}.weight"
            n_out, n_in = tensors[name].shape
            groups = 1 if group_size is None else n_in // group_size
            scale = (rng.uniform(0.01, 0.1, (n_out, groups))).astype(np.float16)
            if qtype.startswith("u"):
                codes = rng.integers(0, 1 << bits, (n_out, n_in)).astype(np.uint8)
                zero = rng.integers(zero_low, 1 << bits, (n_out, groups)).astype(np.float16)
            else:
                half = 1 << (bits - 1)
                codes = rng.integers(-half, half, (n_out, n_in)).astype(np.int8)
                zero = None
            tensors[name] = from_codes(codes, scale, zero, qtype=qtype, group_size=group_size)
    tensors.pop("lm_head.weight")
    return tensors


def _tiny_config(tiny):
    return tiny.config(tied=True)


def _logits(tensors, config):
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    return model, params, np.asarray(forward(model, params, np.array([[3, 7, 11, 5]]))[0])


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "qtype,group_size",
    [("uint4", 32), ("uint4", None), ("uint3", 32), ("uint2", 32), ("uint8", 32),
     ("int4", 32), ("int8", None)],
)  # fmt: skip
def test_round_trip_keeps_codes_scales_and_logits(tiny, tmp_path, version, qtype, group_size):
    config = _tiny_config(tiny)
    tensors = _quantized_tensors(tiny, qtype, group_size, zero_low=version == 1)
    _, params, logits = _logits(tensors, config)
    write_gptq(params, config, None, tmp_path / "gptq", version=version)
    written = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert written["checkpoint_format"] == ("gptq_v2" if version == 2 else "gptq")
    assert written["sym"] == qtype.startswith("int")
    got_config, got, tok = read_gptq_awq(tmp_path / "gptq")
    assert got_config == config and tok is None
    bits = int(qtype.lstrip("uint"))
    for name, q in tensors.items():
        if not isinstance(q, QArray):
            np.testing.assert_array_equal(got[name], q)
            continue
        back = got[name]
        assert back.qtype == f"uint{bits}" and back.group_size == group_size
        shift = 0 if qtype.startswith("u") else 1 << (bits - 1)
        np.testing.assert_array_equal(back.codes(), np.asarray(q.codes()).astype(int) + shift)
        np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(q.scale))
        want_zero = np.full(q.scale.shape, shift) if shift else np.asarray(q.zero_point)
        np.testing.assert_array_equal(np.asarray(back.zero_point), want_zero)
    _, _, again = _logits(got, got_config)
    np.testing.assert_array_equal(again, logits)


def _write_dir(path, tensors, config, quant):
    """A checkpoint directory written by hand (safetensors + config.json)."""
    from safetensors.numpy import save_file

    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    return path
