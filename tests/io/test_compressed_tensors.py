"""compressed-tensors checkpoints against the compressed_tensors library itself: tiny Llama
linears compressed by its own compressors (pack-, int-, float-quantized), read by jquant with
the same integer codes and scales and dequantizing to the library's own decompression; and
jquant's exports decompressed by the library to jquant's floats."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

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
    # [1, 48] blocks: in_features 64 is one block and a short one of 16 (padded by the library).
    "w4a16_block_1x48": ("pack-quantized", dict(num_bits=4, strategy="block",
                         block_structure=[1, 48]), None, torch.float32, "int4", None),
    "w4a16_asym_block_1x48": ("pack-quantized", dict(num_bits=4, symmetric=False,
                              strategy="block", block_structure=[1, 48]), None, torch.bfloat16,
                              "uint4", None),
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
    if args.strategy == "block":  # [1, G]: a short last block padded with zeros
        g = args.block_structure[1]
        w = torch.nn.functional.pad(w, (0, -k % g))
        k = w.shape[1]
    else:
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
    qc = raw["quantization_config"]
    if "block" in case:  # K=96 is whole 48-blocks (a group scheme), K=64 is not (a block one)
        assert sorted(g["weights"]["strategy"] for g in qc["config_groups"].values()) == [
            "block", "group"] and qc["ignore"] == []  # fmt: skip
    else:  # one scheme targets Linear and ignores the float head
        assert len(qc["config_groups"]) == 1 and qc["ignore"] == ["lm_head"]
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
                                                    torch.full((64,), 2, dtype=torch.int32)})),
     rf"tensor {M}.weight_g_idx holds group indices in \[2, 2\], outside \[0, 1\]"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_g_idx":
                                                    torch.zeros(64, dtype=torch.int32)})),
     rf"tensor {M}.weight_g_idx: group 0 holds 64 inputs, expected 32"),
    (lambda d: _edit_tensors(d, lambda s: s.update({f"{M}.weight_g_idx":
                                                    torch.zeros(63, dtype=torch.int32)})),
     rf"tensor {M}.weight_g_idx has shape \(63,\) \(int32\), expected 64 integer group"),
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


def test_actorder_weight_changes_nothing_in_the_file(tmp_path, tiny):
    """actorder "weight" reorders calibration only (0.20.1's ActivationOrdering docstring):
    no weight_g_idx, the file reads as without it."""
    _write(tmp_path, tiny, "w4a16_g32")
    _, plain, _ = read_compressed_tensors(tmp_path)
    _edit_config(tmp_path, lambda g: g["weights"].update(actorder="weight"))
    QuantizationArgs(**json.loads((tmp_path / "config.json").read_text())
                     ["quantization_config"]["config_groups"]["group_0"]["weights"])  # valid
    _, tensors, _ = read_compressed_tensors(tmp_path)
    assert tensors[f"{M}.weight"].perm is None
    np.testing.assert_array_equal(tensors[f"{M}.weight"].codes(), plain[f"{M}.weight"].codes())


@pytest.mark.parametrize("g_idx", [torch.arange(64, dtype=torch.int32) // 32,
                                   torch.full((64,), -1, dtype=torch.int64)])  # fmt: skip
def test_trivial_g_idx_is_accepted_without_a_perm(tmp_path, tiny, g_idx):
    """Inputs in group order, or all -1 (the library's initial value: column order)."""
    _write(tmp_path, tiny, "w4a16_g32")
    _edit_tensors(tmp_path, lambda s: s.update({f"{M}.weight_g_idx": g_idx}))
    _, tensors, _ = read_compressed_tensors(tmp_path)
    assert tensors[f"{M}.weight"].qtype == "int4" and tensors[f"{M}.weight"].perm is None


def test_export_refuses_what_does_not_map(tmp_path, tiny):
    tensors = tiny.tensors(tied=True)
    params = _params(tensors)
    q_path = "layers/0/self_attn/q_proj/kernel"
    params[q_path] = quantize_array(params[q_path], "nf4", axis=0, group_size=32)
    up = quantize_array(params[_path(M + ".weight")], "uint4", axis=0, group_size=32)
    params[_path(M + ".weight")] = QArray(up.qvalue, up.scale, up.zero_point + 0.5,
                                          qtype="uint4", k=64, group_size=32)  # fmt: skip
    with pytest.raises(ValueError, match=r"compressed-tensors cannot hold 2 tensor\(s\)") as err:
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")
    assert "nf4: no compressed-tensors format: layers/0/self_attn/q_proj/kernel" in str(err.value)
    assert "uint4: zero points not integers in [0, 15]: layers/0/mlp/up_proj/kernel" in str(
        err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    # An act-order perm: compressed-tensors 0.20 has no actorder "group" to write it as.
    down = "layers/1/mlp/down_proj/kernel"
    q = quantize_array(_params(tensors)[down], "int4", axis=0, group_size=32)
    params = {**_params(tensors), down: dataclasses.replace(q, perm=jnp.arange(q.k)[::-1])}
    with pytest.raises(ValueError, match=r"int4: act-order perm \(compressed-tensors 0\.20 "
                       rf"removed actorder 'group' .*\): {down}"):  # fmt: skip
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


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


# ---- act-order (actorder "group", weight_g_idx), judged by compressed-tensors 0.12.2 ---------
# 0.20 removed actorder "group": its config validation refuses it and its compressors neither
# write nor read weight_g_idx. Files written before are judged by 0.12.2, the last release line
# with it (`.ci/compressed_tensors_legacy.sh` installs it apart; JQUANT_CT_LEGACY_PATH names
# it), run in a subprocess: its `dequantize(..., g_idx)` makes each weight from random codes,
# `PackedQuantizationCompressor.compress_weight(..., g_idx)` packs it, `decompress_weight`
# (symmetric only in 0.12.2) unpacks it back to floats.

_LEGACY_SCRIPT = r"""
import json, sys
import numpy as np
import torch
import compressed_tensors
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                             QuantizationScheme)
from compressed_tensors.quantization.lifecycle.forward import dequantize

assert compressed_tensors.__version__ == "0.12.2", compressed_tensors.__version__
inp, out = dict(np.load(sys.argv[1])), {}
wargs = json.loads(sys.argv[3])
args = QuantizationArgs(**wargs)
comp = PackedQuantizationCompressor()
for module in sorted({k.rsplit("/", 1)[0] for k in inp}):
    get = lambda p: torch.from_numpy(inp[f"{module}/{p}"])
    codes, scale, g_idx = get("codes"), get("scale"), get("g_idx")
    zp = get("zero_point") if f"{module}/zero_point" in inp else None
    weight = dequantize(codes, scale, zp, args=args, g_idx=g_idx)
    parts = comp.compress_weight(weight, scale, args, zero_point=zp, g_idx=g_idx)
    for name, value in parts.items():
        out[f"{module}/{name}"] = value.numpy()
    if args.symmetric:
        data = {**parts, "weight_scale": scale, "weight_g_idx": g_idx}
        out[f"{module}/decompressed"] = comp.decompress_weight(data, args).float().numpy()
np.savez(sys.argv[2], **out)
scheme = QuantizationScheme(targets=["Linear"], weights=args)
qc = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                        ignore=["lm_head"], quantization_status="compressed")
print(json.dumps(qc.model_dump(mode="json")))
"""

LEGACY = {"sym": dict(num_bits=4, strategy="group", group_size=32, actorder="group"),
          "asym": dict(num_bits=4, symmetric=False, strategy="group", group_size=32,
                       actorder="group"),
          "sym8": dict(num_bits=8, strategy="group", group_size=32, actorder="group")}  # fmt: skip


def _legacy_dir(path, tiny, case):
    """A tiny act-order compressed-tensors directory written by compressed-tensors 0.12.2, and
    ``{module: (codes (out, in) signed, scale, zero point or None, g_idx, library floats)}``."""
    paths = os.environ.get("JQUANT_CT_LEGACY_PATH")
    if not paths:
        reason = ("JQUANT_CT_LEGACY_PATH (compressed-tensors 0.12.2 installed apart; "
                  "`bash .ci/compressed_tensors_legacy.sh` prints it) is unset")
        if os.environ.get("JQUANT_REQUIRE_REFERENCE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    wargs = LEGACY[case]
    half = 1 << (wargs["num_bits"] - 1)
    rng = np.random.default_rng(11)
    floats = tiny.tensors(tied=False)
    inp, state = {}, {}
    for name, w in floats.items():
        module = name.removesuffix(".weight")
        if w.ndim != 2 or "embed" in name or module == "lm_head":
            state[name] = w
            continue
        out, k = w.shape
        inp[f"{module}/codes"] = rng.integers(-half, half, (out, k)).astype(np.int8)
        inp[f"{module}/scale"] = rng.uniform(0.01, 0.1, (out, k // 32)).astype(np.float32)
        inp[f"{module}/g_idx"] = rng.permutation(np.arange(k) // 32).astype(np.int32)
        if not wargs.get("symmetric", True):
            inp[f"{module}/zero_point"] = rng.integers(-half, half, (out, k // 32)).astype(np.int8)
    np.savez(path / "in.npz", **inp)
    (path / "run.py").write_text(_LEGACY_SCRIPT)
    env = {**os.environ, "PYTHONPATH": paths}
    done = subprocess.run([sys.executable, str(path / "run.py"), str(path / "in.npz"),
                           str(path / "out.npz"), json.dumps(wargs)], env=env, cwd=path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lib = dict(np.load(path / "out.npz"))
    qc = json.loads(done.stdout.strip().splitlines()[-1])
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    modules = {}
    for key in inp:
        module, part = key.rsplit("/", 1)
        if part != "codes":
            continue
        for p in ("weight_packed", "weight_shape", "weight_zero_point"):
            if f"{module}/{p}" in lib:
                state[f"{module}.{p}"] = lib[f"{module}/{p}"]
        state[f"{module}.weight_scale"] = inp[f"{module}/scale"]
        state[f"{module}.weight_g_idx"] = inp[f"{module}/g_idx"]
        modules[module] = (inp[key], inp[f"{module}/scale"], inp.get(f"{module}/zero_point"),
                           inp[f"{module}/g_idx"], lib.get(f"{module}/decompressed"))  # fmt: skip
    from safetensors.numpy import save_file as save_numpy

    (path / "ckpt").mkdir()
    save_numpy({k: np.ascontiguousarray(v) for k, v in state.items()},
               str(path / "ckpt" / "model.safetensors"))
    config = dict(tiny.config(tied=False), quantization_config=qc)
    (path / "ckpt" / "config.json").write_text(json.dumps(config))
    return path / "ckpt", modules


@pytest.mark.parametrize("case", list(LEGACY))
def test_act_order_import_equals_legacy_library(tmp_path, tiny, case):
    from jquant import ops

    path, modules = _legacy_dir(tmp_path, tiny, case)
    _, tensors, _ = read_compressed_tensors(path)
    bits = LEGACY[case]["num_bits"]
    half = 1 << (bits - 1)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    for module, (codes, scale, zp, g_idx, lib) in modules.items():
        q = tensors[f"{module}.weight"]
        assert q.perm is not None
        perm = np.asarray(q.perm)
        np.testing.assert_array_equal(g_idx[perm], np.arange(g_idx.size) // 32)  # by group
        shift = 0 if zp is None else half
        np.testing.assert_array_equal(np.asarray(q.codes()).astype(int) - shift, codes[:, perm])
        np.testing.assert_array_equal(np.asarray(q.scale), scale)
        # The g_idx formula in input order (NumPy), and the library's own decompression.
        z = 0.0 if zp is None else zp.astype(np.float64)[:, g_idx]
        want = (codes - z) * scale.astype(np.float64)[:, g_idx]
        got = np.asarray(q.dequantize_stored(jnp.float32))[:, np.argsort(perm)]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)).T, got)
        if lib is not None:
            np.testing.assert_array_equal(got, lib)
        if module.endswith("mlp.up_proj"):  # in = hidden = 64: x @ w through jquant.ops
            y = np.asarray(ops.qdot(jnp.asarray(x), q))
            np.testing.assert_allclose(y, x.astype(np.float64) @ want.T, rtol=1e-5, atol=1e-5)
