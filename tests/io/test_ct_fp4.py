"""compressed-tensors' FP4 formats (nvfp4-pack-quantized, mxfp4-pack-quantized) against the
compressed_tensors library itself: tiny Llama linears quantized by the library's own scale
functions and compressors, read by jquant with the same E2M1 codes and block scales and
dequantizing to the library's decompression; jquant's nvfp4 / mxfp4 exports decompressed by
the library; round trips both ways."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant import qtypes
from jquant.io.compressed_tensors import read_compressed_tensors, write_compressed_tensors
from jquant.qarray import QArray, quantize_array

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationConfig,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

pytestmark = pytest.mark.reference

# jquant qtype: (the library's preset, its format)
CASES = {"nvfp4": ("NVFP4A16", "nvfp4-pack-quantized"),
         "mxfp4": ("MXFP4A16", "mxfp4-pack-quantized")}  # fmt: skip
M = "model.layers.0.mlp.up_proj"


def _ulps_bf16(a, b):
    """|a − b| in units of the bfloat16 spacing at b (both float32 arrays of bf16 values)."""
    spacing = np.spacing(np.abs(b).astype(ml_dtypes.bfloat16)).astype(np.float32)
    return np.abs(a - b) / np.maximum(spacing, np.float32(2.0**-133))


def _compress(w: torch.Tensor, scheme, fmt: str):
    """The library's compressed parts of float weight ``w`` (out, in): scales from its own
    observer math (calculate_qparams, and generate_gparam for NVFP4's global scale)."""
    args = scheme.weights
    blocks = w.reshape(w.shape[0], -1, args.group_size)
    gs = generate_gparam(w.min(), w.max()) if args.strategy == "tensor_group" else None
    scale, _ = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    sd = {"weight": w.to(torch.bfloat16), "weight_scale": scale}
    if gs is not None:
        sd["weight_global_scale"] = gs
    return BaseCompressor.get_value_from_registry(fmt).compress(sd, scheme)


def _write(path, tiny, qtype, preset=None):
    preset_name, fmt = CASES[qtype]
    scheme = preset_name_to_scheme(preset or preset_name, ["Linear"])
    floats = tiny.tensors(tied=False)
    state, parts = {}, {}
    for name, w in floats.items():
        module = name.removesuffix(".weight")
        if w.ndim != 2 or "embed" in name or module == "lm_head":
            state[name] = torch.from_numpy(w)
            continue
        parts[module] = _compress(torch.from_numpy(w), scheme, fmt)
        state.update({f"{module}.{k}": v.contiguous() for k, v in parts[module].items()})
    path.mkdir(exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"],
                            quantization_status="compressed")  # fmt: skip
    config = dict(tiny.config(tied=False), architectures=["LlamaForCausalLM"],
                  quantization_config=qc.model_dump(mode="json"))  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return parts, scheme


def _decompress(part, scheme, fmt):
    return BaseCompressor.get_value_from_registry(fmt).decompress(dict(part), scheme)["weight"]


@pytest.mark.parametrize("qtype", list(CASES))
def test_import_equals_library(tmp_path, tiny, qtype):
    parts, scheme = _write(tmp_path, tiny, qtype)
    fmt = CASES[qtype][1]
    _, tensors, _ = read_compressed_tensors(tmp_path)
    diffs = []
    for module, part in parts.items():
        q = tensors[f"{module}.weight"]
        out, k = part["weight_packed"].shape[0], 2 * part["weight_packed"].shape[1]
        assert isinstance(q, QArray) and q.shape == (k, out) and q.qtype == qtype
        # E2M1 values, signed zeros included, as the library unpacks them.
        lib_values = unpack_fp4_from_uint8(part["weight_packed"], out, k, torch.float32).numpy()
        ours = np.asarray(qtypes.decode(qtype, q.codes()))
        np.testing.assert_array_equal(ours, lib_values)
        np.testing.assert_array_equal(np.signbit(ours), np.signbit(lib_values))
        lib = _decompress(part, scheme, fmt).float().numpy()
        got = np.asarray(q.dequantize_stored(), np.float32)
        assert q.dequantize().dtype == jnp.bfloat16
        if qtype == "mxfp4":
            np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint8),
                                          part["weight_scale"].numpy())  # fmt: skip
            np.testing.assert_array_equal(got, lib)
            continue
        np.testing.assert_array_equal(np.asarray(q.scale.codes()).view(np.uint8),
                                      part["weight_scale"].view(torch.uint8).numpy())  # fmt: skip
        gs = part["weight_global_scale"].numpy()
        assert np.asarray(q.scale.scale).item() == (np.float32(1) / gs).item()
        # The stated bound: each block scale within 1 float32 ulp of the library's, so each
        # value within 1 bfloat16 ulp after both round to bfloat16.
        assert _ulps_bf16(got, lib).max() <= 1
        diffs.append(np.mean(got != lib))
    assert qtype == "mxfp4" or max(diffs) < 0.01  # nearly all equal; the rest 1 ulp


@pytest.mark.parametrize("qtype", list(CASES))
def test_round_trip_library_to_jquant_to_library(tmp_path, tiny, qtype):
    """The library's files → jquant → written again: the same bytes (NVFP4's global scale
    too whenever its reciprocal round-trips, as for every tensor here)."""
    parts, _ = _write(tmp_path / "src", tiny, qtype)
    config, tensors, _ = read_compressed_tensors(tmp_path / "src")
    from jquant.arch import LlamaConfig
    from jquant.models import params_from_hf

    _, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    write_compressed_tensors(params, config, None, tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["quantization_config"]["format"] == CASES[qtype][1]
    compared = 0
    for module, part in parts.items():
        for key, value in part.items():
            if key == "weight_global_scale":
                gs = value.numpy()
                if np.float32(1) / (np.float32(1) / gs) != gs:
                    continue  # documented: fl(1/fl(1/gs)) ≠ gs, gs' is 1 ulp away
                compared += 1
            written = state[f"{module}.{key}"]
            assert written.dtype == value.dtype, (module, key)
            np.testing.assert_array_equal(written.view(torch.uint8).numpy(),
                                          value.contiguous().view(torch.uint8).numpy())
    assert qtype == "mxfp4" or compared > len(parts) // 2


def test_nvfp4_dequantization_bound_over_random_global_scales():
    """jquant's nvfp4 dequantization of a compressed-tensors tensor against the library's
    decompression over 200 random global scales and all 127 positive E4M3 block scales:
    within 1 bfloat16 ulp (the stated bound), equal for nearly all values."""
    from jquant.io._fp4_layout import tensor_scale_of
    from jquant.qarray import from_codes

    rng = np.random.default_rng(1)
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    e4m3 = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)  # all finite > 0
    packed = rng.integers(0, 256, (len(e4m3), 8), dtype=np.uint8)  # one block of 16 a row
    differ = total = 0
    for gs in rng.uniform(1.0, 1e5, 200).astype(np.float32).reshape(-1, 1):
        part = {"weight_packed": torch.from_numpy(packed),
                "weight_scale": torch.from_numpy(e4m3.view(np.uint8).reshape(-1, 1).copy()
                                                 ).view(torch.float8_e4m3fn),
                "weight_global_scale": torch.from_numpy(gs)}  # fmt: skip
        lib = _decompress(part, scheme, "nvfp4-pack-quantized").float().numpy()
        scale = QArray(qvalue=jnp.asarray(e4m3.reshape(-1, 1)),
                       scale=jnp.full((1, 1), tensor_scale_of(gs, "gs")), zero_point=None,
                       qtype="fp8_e4m3", k=1, axis=-1)  # fmt: skip
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(len(e4m3), 16)
        q = from_codes(jnp.asarray(codes), scale, qtype="nvfp4", group_size=16,
                       dtype=jnp.bfloat16)  # fmt: skip
        ours = np.asarray(q.dequantize_stored(), np.float32)
        assert _ulps_bf16(ours, lib).max() <= 1
        differ, total = differ + int(np.sum(ours != lib)), total + lib.size
    print(f"{differ} of {total} values 1 bf16 ulp from the library's")
    assert differ / total < 1e-3


def _jquant_params(tiny, qtype):
    tensors = tiny.tensors(tied=True)
    params = {}
    for name, w in tensors.items():
        path = name.split(".")
        body = path[1:-1] if path[0] == "model" else path[:-1]
        if name.endswith("proj.weight"):
            params["/".join([*body, "kernel"])] = quantize_array(
                w.T, qtype, axis=0, group_size=qtypes.get(qtype).block_size)
        elif "embed" in name:
            params["embed_tokens/embedding"] = w
        else:
            params["/".join([*body, "scale"])] = w
    return params


@pytest.mark.parametrize("qtype", list(CASES))
def test_library_decompresses_jquant_export(tmp_path, tiny, qtype):
    """jquant's own nvfp4 / mxfp4 quantization, exported, decompressed by the library from
    its own parse of the written quantization_config; read back by jquant unchanged."""
    params = _jquant_params(tiny, qtype)
    write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(raw["quantization_config"])
    (scheme,) = qc.config_groups.values()
    fmt = CASES[qtype][1]
    assert (qc.format, scheme.format) == (fmt, fmt)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    _, again, _ = read_compressed_tensors(tmp_path / "out")
    reciprocal_kept = differ = 0
    for path, q in params.items():
        if not isinstance(q, QArray):
            continue
        module = "model." + path.removesuffix("/kernel").replace("/", ".")
        part = {n.rsplit(".", 1)[1]: t for n, t in state.items() if n.rsplit(".", 1)[0] == module}
        lib = _decompress(part, scheme, fmt).float().numpy()
        ours = np.asarray(q.dequantize_stored(jnp.bfloat16), np.float32)
        r = again[module + ".weight"]
        np.testing.assert_array_equal(np.asarray(r.codes()), np.asarray(q.codes()))
        if qtype == "mxfp4":
            np.testing.assert_array_equal(lib, ours)
            np.testing.assert_array_equal(np.asarray(r.scale).view(np.uint8),
                                          np.asarray(q.scale).view(np.uint8))  # fmt: skip
            continue
        assert _ulps_bf16(ours, lib).max() <= 1
        differ += int(np.sum(ours != lib))
        np.testing.assert_array_equal(np.asarray(r.scale.codes()).view(np.uint8),
                                      np.asarray(q.scale.codes()).view(np.uint8))  # fmt: skip
        g = np.float32(np.asarray(q.scale.scale).item())
        gs = part["weight_global_scale"].numpy()
        assert gs.dtype == np.float32 and gs.shape == (1,)
        assert abs(float(gs[0]) - 1 / float(g)) <= 2.5 * np.spacing(np.float32(1) / g)
        if np.float32(1) / gs[0] == g:  # a float32 gs with fl(1/gs) = g exists (most g)
            reciprocal_kept += 1
            assert np.asarray(r.scale.scale).item() == g
    print(f"{differ} values 1 bf16 ulp from the library's; {reciprocal_kept} g kept")
    assert qtype == "mxfp4" or reciprocal_kept > 0


def test_global_scale_of_keeps_the_reciprocal_when_it_can():
    """Over many float32 per-tensor scales: fl(1/gs) = g whenever some float32 gs within 2
    ulps of fl(1/g) has it (searched here by brute force, ±3 ulps), else gs = fl(1/g)."""
    from jquant.io._fp4_layout import global_scale_of

    rng = np.random.default_rng(0)
    gs_kept = 0
    for g in rng.uniform(1e-5, 1e-2, 400).astype(np.float32):
        gs = global_scale_of(g)
        first = np.float32(1) / g
        near = [first]
        for toward in (np.inf, 0):
            c = first
            for _ in range(3):
                c = np.nextafter(c, np.float32(toward), dtype=np.float32)
                near.append(c)
        if any(np.float32(1) / c == g for c in near):
            assert np.float32(1) / gs == g
            gs_kept += 1
        else:
            assert gs == first
    assert 0.8 < gs_kept / 400 < 1.0  # some g have no such gs: the bound in the docs


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({f"{M}.weight_global_scale": torch.zeros(1)}),
     rf"{M}.weight_global_scale must be one positive finite float32"),
    (lambda s: s.update({f"{M}.weight_packed": s[f"{M}.weight_packed"][:, :-1].clone()}),
     rf"tensor {M}.weight_packed has shape \(96, 31\), expected \(96, 32\)"),
    (lambda s: s.update({f"{M}.weight_scale": s[f"{M}.weight_scale"].float()}),
     rf"tensor {M}.weight_scale is F32, expected F8_E4M3"),
])  # fmt: skip
def test_bad_nvfp4_files_are_named(tmp_path, tiny, edit, message):
    _write(tmp_path, tiny, "nvfp4")
    state = load_file(str(tmp_path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        read_compressed_tensors(tmp_path)


def test_mxfp4_nan_scale_is_named(tmp_path, tiny):
    _write(tmp_path, tiny, "mxfp4")
    state = load_file(str(tmp_path / "model.safetensors"))
    state[f"{M}.weight_scale"][3, 1] = 255
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{M}.weight_scale holds the E8M0 code 255 \(NaN"):
        read_compressed_tensors(tmp_path)


def test_w4a4_and_foreign_fp4_schemes_are_refused(tmp_path, tiny):
    _write(tmp_path, tiny, "nvfp4", preset="NVFP4")  # W4A4: FP4 activations, input_global_scale
    with pytest.raises(ValueError, match="jquant cannot quantize activations to FP4"):
        read_compressed_tensors(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    group = raw["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = None
    group["weights"]["group_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"format 'nvfp4-pack-quantized' with weights .* "
                       r"\('float', 4, 'tensor_group', 32, True\) is not jquant's nvfp4"):
        read_compressed_tensors(tmp_path)
    raw["quantization_config"]["format"] = "pack-quantized"  # FP4 weights, an int format
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="float 4 bits as nvfp4-pack-quantized or mxfp4-pack"):
        read_compressed_tensors(tmp_path)


def test_export_refuses_fp4_with_quantized_activations(tmp_path, tiny):
    import dataclasses

    params = _jquant_params(tiny, "nvfp4")
    path = "layers/0/self_attn/q_proj/kernel"
    params[path] = dataclasses.replace(params[path], activation="fp8_e4m3")
    with pytest.raises(ValueError, match=rf"nvfp4: FP4 weights with fp8_e4m3 activations.*{path}"):
        write_compressed_tensors(params, tiny.config(tied=True), None, tmp_path / "out")


@pytest.mark.parametrize("qtype", list(CASES))
def test_transformers_loads_export_with_jquant_logits(tmp_path, tiny, qtype):
    """transformers (compressed-tensors installed) loads jquant's FP4 export on CPU,
    decompressing it to jquant's bfloat16 dequantized weights (NVFP4: within 1 ulp), and its
    forward gives jquant's logits (MXFP4: jquant's own forward on the QArrays)."""
    transformers = pytest.importorskip("transformers")
    from jquant.arch import LlamaConfig
    from jquant.models import forward, params_from_hf

    config = tiny.config(tied=False)
    block = qtypes.get(qtype).block_size
    # bfloat16 throughout, as transformers holds the model (dtype=bfloat16 below, the dtype
    # of the library's FP4 decompression): the float tensors bf16 values, the kernels
    # dequantizing to bfloat16.
    bf16 = {n: w.astype(ml_dtypes.bfloat16).astype(np.float32)
            for n, w in tiny.tensors(tied=False).items()}  # fmt: skip
    tensors = {n: quantize_array(w.T.astype(ml_dtypes.bfloat16), qtype, axis=0, group_size=block)
               if n.endswith("proj.weight") else w for n, w in bf16.items()}  # fmt: skip
    model, params = params_from_hf(tensors, LlamaConfig.from_hf(config))
    write_compressed_tensors(params, config, None, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"),
                                                           dtype=torch.bfloat16)  # fmt: skip
    tokens = np.array([[1, 5, 9, 20, 7, 3, 100, 42]])
    with torch.no_grad():
        hf(torch.from_numpy(tokens))  # the library decompresses on the first call
    for name, q in tensors.items():
        if isinstance(q, QArray):
            lib = hf.get_parameter(name).detach()
            assert lib.dtype == torch.bfloat16  # the library's FP4 decompression dtype
            ours = np.asarray(q.dequantize_stored(jnp.bfloat16), np.float32)
            assert _ulps_bf16(ours, lib.float().numpy()).max() <= (qtype == "nvfp4"), name
    # Decompressed, the weights are plain bfloat16 parameters: upcast exactly (past the guard
    # transformers puts on quantized models' .float()) to run float32 activations as jquant.
    torch.nn.Module.float(hf)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens)).logits.numpy()
    if qtype == "nvfp4":
        # The library rounds NVFP4 weights to bfloat16 (e2m1 · block scale is not a bfloat16
        # value); jquant's forward multiplies in float32. On this tiny random model that moves
        # logits by up to ~1.1 (of ~10): compare with jquant's weights rounded as the library's.
        dense = {n: np.asarray(q.dequantize(jnp.bfloat16), np.float32).T
                 if isinstance(q, QArray) else q for n, q in tensors.items()}  # fmt: skip
        model, params = params_from_hf(dense, LlamaConfig.from_hf(config))
    ours = np.asarray(forward(model, params, jnp.asarray(tokens))[0])
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
