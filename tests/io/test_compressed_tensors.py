"""compressed-tensors checkpoints against the compressed_tensors library itself: tiny Llama
linears compressed by its own compressors (pack-, int-, float-quantized), read by jquant with
the same integer codes and scales and dequantizing to the library's own decompression; and
jquant's exports decompressed by the library to jquant's floats."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jquant.io.compressed_tensors import read_compressed_tensors, write_compressed_tensors
from jquant.qarray import QArray, quantize_array

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import (  # noqa: E402
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
    NaiveQuantizationCompressor,
    PackedQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
)
from compressed_tensors.utils.match import match_targets  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.reference

COMPRESSORS = {"pack-quantized": PackedQuantizationCompressor,
               "int-quantized": IntQuantizationCompressor,
               "float-quantized": FloatQuantizationCompressor,
               "naive-quantized": NaiveQuantizationCompressor}  # fmt: skip
ACT = {"int8": dict(num_bits=8, type="int", strategy="token", dynamic=True),
       "fp8": dict(num_bits=8, type="float", strategy="token", dynamic=True)}  # fmt: skip
# name: (format, weight args, input activation args, scale dtype, jquant qtype and activation)
CASES = {
    "w4a16_g32": ("pack-quantized", dict(num_bits=4, strategy="group", group_size=32), None,
                  torch.float32, "int4", None),
    "w4a16_asym_g32": ("pack-quantized", dict(num_bits=4, symmetric=False, strategy="group",
                       group_size=32), None, torch.bfloat16, "uint4", None),
    "w8a16_channel": ("pack-quantized", dict(num_bits=8, strategy="channel"), None,
                      torch.bfloat16, "int8", None),
    "w4a16_asym_channel": ("pack-quantized", dict(num_bits=4, symmetric=False,
                           strategy="channel"), None, torch.float32, "uint4", None),
    "w8_asym_tensor": ("pack-quantized", dict(num_bits=8, symmetric=False, strategy="tensor"),
                       None, torch.float32, "uint8", None),
    "w8a8_int": ("int-quantized", dict(num_bits=8, strategy="channel"), ACT["int8"],
                 torch.float32, "int8", "int8"),
    "fp8_tensor": ("float-quantized", dict(num_bits=8, type="float", strategy="tensor"),
                   None, torch.bfloat16, "fp8_e4m3", None),
    "fp8_dynamic": ("float-quantized", dict(num_bits=8, type="float", strategy="channel"),
                    ACT["fp8"], torch.float32, "fp8_e4m3", "fp8_e4m3"),
    "fp8_naive_channel": ("naive-quantized", dict(num_bits=8, type="float", strategy="channel"),
                          None, torch.bfloat16, "fp8_e4m3", None),
}  # fmt: skip


def _scales(w: torch.Tensor, args: QuantizationArgs, dtype):
    """Per-group min/max scales (and signed zero points) as an observer would choose them."""
    out, k = w.shape
    g = {"group": args.group_size, "channel": k}.get(args.strategy, out * k)
    blocks = w.reshape(out, k // g, g) if args.strategy != "tensor" else w.reshape(1, 1, -1)
    if args.type == "float":
        return (blocks.abs().amax(-1) / 448.0).to(dtype), None
    half = 1 << (args.num_bits - 1)
    if args.symmetric:
        return (blocks.abs().amax(-1) / (half - 1)).to(dtype), None
    lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (2 * half - 1)).to(dtype)
    zp = torch.round(-lo / scale.float()) - half
    return scale, zp.clamp(-half, half - 1).to(torch.int8)


def _write(path, tiny, case, ignore=("lm_head",), arch="llama", targets=("Linear",)):
    """A compressed-tensors directory of the tiny untied ``arch`` model, linears matching
    ``targets`` compressed by the library's compressor for ``case``; returns the float
    tensors, the library's parts and the scheme."""
    fmt, wargs, aargs, dtype, *_ = CASES[case]
    scheme = QuantizationScheme(targets=list(targets), weights=QuantizationArgs(**wargs),
                                input_activations=aargs and QuantizationArgs(**aargs))  # fmt: skip
    floats = tiny.tensors(tied=False, arch=arch)
    state, parts = {}, {}
    for name, w in floats.items():
        module = name.removesuffix(".weight")
        picked = any(t == "Linear" or re.match(t.removeprefix("re:"), module) for t in targets)
        if w.ndim != 2 or "embed" in name or module in ignore or not picked:
            state[name] = torch.from_numpy(w)
            continue
        scale, zp = _scales(torch.from_numpy(w), scheme.weights, dtype)
        sd = {"weight": torch.from_numpy(w).to(dtype), "weight_scale": scale}
        if zp is not None:
            sd["weight_zero_point"] = zp
        parts[module] = COMPRESSORS[fmt].compress(sd, scheme)
        state.update({f"{module}.{k}": v.contiguous() for k, v in parts[module].items()})
    path.mkdir(exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=list(ignore),
                            quantization_status="compressed")  # fmt: skip
    config = dict(tiny.config(tied=False, arch=arch), architectures=["LlamaForCausalLM"],
                  quantization_config=qc.model_dump(mode="json"))  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return floats, parts, scheme


def _library_codes(part, scheme, shape):
    if "weight_packed" in part:
        return unpack_from_int32(part["weight_packed"], scheme.weights.num_bits, shape)
    return part["weight"]


@pytest.mark.parametrize("case", list(CASES))
def test_import_equals_library(tmp_path, tiny, case):
    floats, parts, scheme = _write(tmp_path, tiny, case)
    fmt, _, _, dtype, qtype, activation = CASES[case]
    config, tensors, tok = read_compressed_tensors(tmp_path)
    assert tok is None and config["num_hidden_layers"] == tiny.shape["layers"]
    np.testing.assert_array_equal(tensors["lm_head.weight"], floats["lm_head.weight"])
    for module, part in parts.items():
        q = tensors[f"{module}.weight"]
        out, k = floats[f"{module}.weight"].shape
        assert isinstance(q, QArray) and q.shape == (k, out)
        assert (q.qtype, q.activation) == (qtype, activation)
        codes = np.asarray(q.codes())
        want = _library_codes(part, scheme, (out, k))
        if scheme.weights.type == "float":
            np.testing.assert_array_equal(codes.view(np.uint8), want.view(torch.uint8).numpy())
        else:
            shift = 1 << (scheme.weights.num_bits - 1) if qtype.startswith("u") else 0
            np.testing.assert_array_equal(codes.astype(np.int32) - shift, want.numpy())
        scale = part["weight_scale"].float().numpy()
        np.testing.assert_array_equal(np.asarray(q.scale, np.float32).reshape(scale.shape), scale)
        lib = COMPRESSORS[fmt].decompress(dict(part), scheme)["weight"]
        # Both in the scale dtype: the library rounds (q − zp)·s to it, as jquant does.
        assert q.dequantize().dtype == jnp.dtype(str(dtype).removeprefix("torch."))
        np.testing.assert_array_equal(np.asarray(q.dequantize_stored(), np.float32),
                                      lib.float().numpy())  # fmt: skip


def test_regex_targets_leave_biases_and_other_linears_float(tmp_path, tiny):
    floats, parts, _ = _write(tmp_path, tiny, "w4a16_g32", arch="qwen2",
                              targets=["re:.*self_attn\\.[qk]_proj$"])  # fmt: skip
    _, tensors, _ = read_compressed_tensors(tmp_path)
    assert sorted(parts) == sorted(n.removesuffix(".weight") for n, v in tensors.items()
                                   if isinstance(v, QArray))  # fmt: skip
    assert len(parts) == 4
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.1.mlp.up_proj.weight"):
        np.testing.assert_array_equal(tensors[name], floats[name])


def test_target_precedence_is_the_librarys():
    """Which group a module falls in: exact name, then regexes (sorted), then class names, a
    target listed twice belonging to the later group; against the library's match_targets."""
    from jquant.io._ct_scheme import Schemes

    targets = ["Linear", "re:.*proj", "re:.*mlp.*", "model.layers.0.mlp.up_proj", "re:.*q_"]
    groups = {f"g{i}": {"targets": [t], "weights": {"num_bits": 4}} for i, t in enumerate(targets)}
    groups["g5"] = {"targets": ["Linear"], "weights": {"num_bits": 8}}
    schemes = Schemes({"quant_method": "compressed-tensors", "format": "pack-quantized",
                       "config_groups": groups, "ignore": ["lm_head"]}, "test")  # fmt: skip
    owner = {t: f"g{i}" for i, t in enumerate(targets)} | {"Linear": "g5"}
    linear = torch.nn.Linear(1, 1)
    for module in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                   "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):
        first = match_targets(module, linear, targets)[0]
        assert schemes.of(module, "Linear").group == owner[first]
    assert schemes.of("lm_head", "Linear") is None


def _library_decompress(path):
    """Every quantized weight of an exported directory, decompressed by the library from its
    own parse of the written quantization_config."""
    raw = json.loads((path / "config.json").read_text())
    qc = QuantizationConfig.model_validate(raw["quantization_config"])
    state = load_file(str(path / "model.safetensors"))
    out = {}
    for scheme in qc.config_groups.values():
        fmt = scheme.format or qc.format
        for target in scheme.targets:
            modules = {n.rsplit(".", 1)[0] for n in state if n.endswith(".weight_scale")}
            for module in modules if target == "Linear" else [target]:
                part = {n.split(".")[-1]: t for n, t in state.items()
                        if n.rsplit(".", 1)[0] == module}  # fmt: skip
                out[module] = COMPRESSORS[fmt].decompress(part, scheme)["weight"]
    return out, raw


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_and_library_reads_export(tmp_path, tiny, case):
    _write(tmp_path / "src", tiny, case)
    config, tensors, _ = read_compressed_tensors(tmp_path / "src")
    params = _params(tensors)
    write_compressed_tensors(params, config, None, tmp_path / "out")
    _, again, _ = read_compressed_tensors(tmp_path / "out")
    lib, raw = _library_decompress(tmp_path / "out")
    assert raw["quantization_config"]["ignore"] == ["lm_head"]
    for name, q in tensors.items():
        if not isinstance(q, QArray):
            np.testing.assert_array_equal(again[name], q)
            continue
        r = again[name]
        assert (r.qtype, r.group_size, r.activation, r.dtype) == (q.qtype, q.group_size,
                                                                 q.activation, q.dtype)
        np.testing.assert_array_equal(np.asarray(r.codes()), np.asarray(q.codes()))
        np.testing.assert_array_equal(np.asarray(r.scale), np.asarray(q.scale))
        if q.zero_point is not None:
            np.testing.assert_array_equal(np.asarray(r.zero_point), np.asarray(q.zero_point))
        np.testing.assert_array_equal(lib[name.removesuffix(".weight")].float().numpy(),
                                      np.asarray(q.dequantize_stored(), np.float32))  # fmt: skip


def _path(hf: str) -> str:
    """The jquant path of an HF name (the test's own mapping)."""
    parts = hf.split(".")
    leaf = {"embed_tokens": "embedding", "lm_head": "kernel"}.get(parts[-2], "kernel")
    if parts[-2].endswith("norm") or parts[-2] == "norm":
        leaf = "scale"
    body = parts[1:-1] if parts[0] == "model" else parts[:-1]
    return "/".join([*body, leaf])


def _params(tensors):
    """jquant paths and layouts of HF-named tensors (float kernels transposed)."""
    kernel = lambda n, v: not isinstance(v, QArray) and _path(n).endswith("kernel")
    return {_path(n): v.T if kernel(n, v) else v for n, v in tensors.items()}


def test_export_of_jquant_quantization_is_read_by_library(tmp_path, tiny):
    """jquant's own int4/uint4 codes (zero points integers) as the library decompresses them."""
    tensors = tiny.tensors(tied=True)
    params = {}
    for name, w in tensors.items():
        path = _path(name)
        if name.endswith("proj.weight"):
            qtype = "uint4" if "mlp" in name else "int4"
            params[path] = quantize_array(w.T, qtype, axis=0, group_size=32,
                                          scale_dtype=jnp.float32)  # fmt: skip
        else:
            params[path] = w
    write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")
    lib, raw = _library_decompress(tmp_path / "out")
    assert raw["quantization_config"]["format"] == "pack-quantized"
    assert len(raw["quantization_config"]["config_groups"]) == 2
    _, again, _ = read_compressed_tensors(tmp_path / "out")
    for name in tensors:
        if name.endswith("proj.weight"):
            q = params[_path(name)]
            np.testing.assert_array_equal(lib[name.removesuffix(".weight")].numpy(),
                                          np.asarray(q.dequantize_stored(jnp.float32)))
            assert again[name].qtype == q.qtype
            np.testing.assert_array_equal(np.asarray(again[name].codes()), np.asarray(q.codes()))


def _edit_config(path, fn):
    raw = json.loads((path / "config.json").read_text())
    fn(raw["quantization_config"]["config_groups"]["group_0"])
    (path / "config.json").write_text(json.dumps(raw))


def _edit_tensors(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


M = "model.layers.0.mlp.up_proj"
Q = "model.layers.0.self_attn.q_proj"  # the first module read


@pytest.mark.parametrize("edit, message", [
    (lambda d: _edit_config(d, lambda g: g["weights"].update(num_bits=7)),
     r"num_bits=7 have no jquant format"),
    (lambda d: _edit_config(d, lambda g: g["weights"].update(strategy="block",
                                                             block_structure=[2, 32])),
     rf"{Q} \(config group 'group_0', strategy 'block' \[2, 32\]\) does not map"),
    (lambda d: _edit_config(d, lambda g: g["weights"].update(group_size=48)),
     rf"{Q} \(config group 'group_0', strategy 'group'\) does not map onto jquant's QArray"),
    (lambda d: _edit_config(d, lambda g: g.update(input_activations=dict(
        num_bits=8, type="int", strategy="tensor", dynamic=False))),
     r"input_activations .* are not supported; jquant quantizes activations dynamically"),
    (lambda d: _edit_tensors(d, lambda s: s.pop(f"{M}.weight_scale")),
     rf"tensor {M}.weight_scale is missing"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_shape": torch.tensor([96, 63])})),
     rf"tensor {M}.weight_shape is \[96, 63\], the config implies \[96, 64\]"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_packed":
                                                    s[f"{M}.weight_packed"][:, :-1].clone()})),
     rf"tensor {M}.weight_packed has shape \(96, 7\), expected \(96, 8\)"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_scale":
                                                    s[f"{M}.weight_scale"][:, :1].clone()})),
     rf"tensor {M}.weight_scale has shape \(96, 1\), expected \(96, 2\)"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_g_idx":
                                                    torch.arange(64, dtype=torch.int32) % 2})),
     rf"tensor {M}.weight_g_idx holds activation-order group indices"),
])  # fmt: skip
def test_bad_files_are_named(tmp_path, tiny, edit, message):
    _write(tmp_path, tiny, "w4a16_g32")
    edit(tmp_path)
    with pytest.raises(ValueError, match=message):
        read_compressed_tensors(tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("quant_method", "gptq", r"quant_method 'gptq', not 'compressed-tensors'"),
    ("sparsity_config", {"format": "sparse-24-bitmask"}, r"sparsity format 'sparse-24-bitmask'"),
    ("transform_config", {"config_groups": {"u": {}}}, r"a transform_config"),
    ("kv_cache_scheme", {"num_bits": 8, "type": "float"}, r"a kv_cache_scheme"),
    ("format", "marlin-24", r"format 'marlin-24' is not supported"),
])  # fmt: skip
def test_what_jquant_does_not_apply_is_refused(tmp_path, tiny, key, value, message):
    _write(tmp_path, tiny, "w4a16_g32")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["quantization_config"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        read_compressed_tensors(tmp_path)


def test_trivial_g_idx_is_accepted(tmp_path, tiny):
    _write(tmp_path, tiny, "w4a16_g32")
    _edit_tensors(tmp_path, lambda s: s.update({f"{M}.weight_g_idx":
                                                torch.arange(64, dtype=torch.int32) // 32}))
    _, tensors, _ = read_compressed_tensors(tmp_path)
    assert tensors[f"{M}.weight"].qtype == "int4"


def test_export_refuses_what_does_not_map(tmp_path, tiny):
    tensors = tiny.tensors(tied=True)
    params = _params(tensors)
    q_path = "layers/0/self_attn/q_proj/kernel"
    params[q_path] = quantize_array(params[q_path], "nf4", axis=0, group_size=32)
    up = quantize_array(params[_path(M + ".weight")], "uint4", axis=0, group_size=32)
    params[_path(M + ".weight")] = QArray(up.qvalue, up.scale, up.zero_point + 0.5,
                                          qtype="uint4", k=64, group_size=32)  # fmt: skip
    params["embed_tokens/embedding"] = quantize_array(params["embed_tokens/embedding"], "int8",
                                                      axis=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"compressed-tensors cannot hold 3 tensor\(s\)") as err:
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")
    assert "nf4: no compressed-tensors format: layers/0/self_attn/q_proj/kernel" in str(err.value)
    assert "uint4: zero points not integers in [0, 15]: layers/0/mlp/up_proj/kernel" in str(
        err.value)
    assert "int8: not a linear layer's weight: embed_tokens/embedding" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# transformers 5.25 builds its empty model with compressed_tensors' meta-device compress(),
# which leaves an asymmetric zero point unpacked ((out, G)), while compress() on real weights
# packs it ((ceil(out·b/32), G)), as the library's own decompress() expects and jquant writes:
# any asymmetric pack-quantized checkpoint, llm-compressor's included, then fails to load.
_ASYM_UPSTREAM = pytest.mark.xfail(strict=True, reason="transformers/compressed-tensors load "
                                   "of asymmetric pack-quantized zero points")  # fmt: skip


@pytest.mark.parametrize("qtype", ["int4", pytest.param("uint4", marks=_ASYM_UPSTREAM),
                                   "fp8_e4m3"])  # fmt: skip
def test_transformers_loads_export_with_jquant_logits(tmp_path, tiny, qtype):
    """transformers (compressed-tensors installed) decompresses jquant's export to jquant's
    dequantized weights, and its forward gives jquant's logits."""
    transformers = pytest.importorskip("transformers")
    from jquant.arch import LlamaConfig
    from jquant.models import forward, params_from_hf

    config = tiny.config(tied=False)
    group = None if qtype == "fp8_e4m3" else 32
    tensors = {n: quantize_array(w.T, qtype, axis=0, group_size=group, scale_dtype=jnp.float32)
               if n.endswith("proj.weight") else w
               for n, w in tiny.tensors(tied=False).items()}  # fmt: skip
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    write_compressed_tensors(params, config, None, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.float32)  # fmt: skip
    tokens = np.array([[1, 5, 9, 20, 7, 3, 100, 42]])
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()  # decompresses on the first call
    for name, q in tensors.items():
        if isinstance(q, QArray):
            np.testing.assert_array_equal(hf.get_parameter(name).detach().numpy(),
                                          np.asarray(q.dequantize_stored()))  # fmt: skip
    ours = np.asarray(forward(model, params, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())


def test_tokenizer_round_trips(tmp_path, tiny):
    from jquant import io as jio

    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors(tied=True)))
    params = _params(ckpt.tensors)
    write_compressed_tensors(params, ckpt.config, ckpt.tokenizer, tmp_path / "out")
    _write(tmp_path / "out", tiny, "w4a16_g32")  # the same tokenizer files beside CT weights
    config, _, tok = read_compressed_tensors(tmp_path / "out")
    text = "hello world <|im_end|>"
    assert tok.encode(text) == ckpt.tokenizer.encode(text)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template", "add_bos_token"):
        assert getattr(tok, key) == getattr(ckpt.tokenizer, key), key


def test_export_is_atomic(tmp_path, tiny, monkeypatch):
    from jquant.io import compressed_tensors as ct_io

    params = _params(tiny.tensors(tied=True))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("old")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")

    def dies(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ct_io, "write_file", dies)
    with pytest.raises(KeyboardInterrupt):
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out",
                                 overwrite=True)  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep", "out"]
    monkeypatch.undo()
    write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out",
                             overwrite=True)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                    "model.safetensors"]
