"""Packed quantized checkpoints: bit-identical round trips, no float copy on load, bits on disk,
atomic writes, one clear error per kind of damage, and layout 1 (orbax) still loading.

`PackedWriter`'s part-by-part, resumable writing is tests/io/test_packed_writer.py's."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jquant
from jquant import models
from jquant.io import _packed_meta, _packed_writer, _safetensors, packed
from jquant.models import LlamaConfig, abstract_model, forward
from jquant.qarray import QArray

# Small, but every case the layout has to carry: K=200 gives g128 a short last group and g64 a
# short one of 8; the untied head, float attention and bf16 norms are float leaves of two dtypes.
# Only the MLP is quantized: two kernel shapes, so two compilations per format.
HF_CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=200,
                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip

CASES = {
    "int4-g128": {"weight": "int4", "group_size": 128},
    "uint4-g64": {"weight": "uint4", "group_size": 64, "clip": "minmax"},
    "nf4-double-quant": {"weight": "nf4", "group_size": 64, "double_quant": True},
    "int8-a8": {"weight": "int8", "activation": "int8"},
    "fp8": {"weight": "fp8_e4m3"},
    "mxfp4": {"weight": "mxfp4", "group_size": 32},
    "nvfp4": {"weight": "nvfp4", "group_size": 16},
}


def _recipe(name: str) -> jquant.Recipe:
    rule = {"pattern": "mlp/.*/kernel$", **CASES[name]}
    return jquant.Recipe.from_dict({"name": name, "rules": [rule]})


def _float_params(config=HF_CONFIG):
    """Random parameters (NumPy draws: no per-op compilation as in eager init)."""
    _, state = nnx.split(abstract_model(LlamaConfig.from_hf(config)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        # bf16 norms: float leaves must come back in their own dtype, not the model's default.
        dtype = jnp.bfloat16 if "layernorm" in str(path) else x.dtype
        return jnp.asarray(0.05 * rng.standard_normal(x.shape, np.float32), dtype)

    return jax.tree.map_with_path(draw, state)


def _quantized(name: str, config=HF_CONFIG):
    return jquant.quantize(_float_params(config), _recipe(name))


def _leaves(params) -> dict:
    """``{path: leaf}`` with QArrays whole."""
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(params)}


def _assert_bit_identical(got, want):
    got, want = _leaves(got), _leaves(want)
    assert set(got) == set(want)
    for path, w in want.items():
        g = got[path]
        # The treedef holds QArray static fields (nested double-quant scale included).
        assert jax.tree.structure(g) == jax.tree.structure(w), path
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
            assert isinstance(a, jax.Array), path
            assert (a.dtype, a.shape) == (b.dtype, b.shape), path
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path


def _logits(model, params, tokens=None):
    if tokens is None:
        tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, HF_CONFIG["vocab_size"],
                                    jnp.int32)  # fmt: skip
    # Restored arrays are committed to a device; commit the others too, so both runs share
    # one compilation (a second one would only cost time).
    return forward(model, jax.device_put(params, jax.local_devices()[0]), tokens)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A packed int4-g128 checkpoint with a recipe and a report, and the params it holds."""
    params = _quantized("int4-g128")
    path = packed.save_packed(
        tmp_path_factory.mktemp("packed") / "ckpt", config=HF_CONFIG, params=params,
        tokenizer=None, recipe=_recipe("int4-g128"), report={"time_s": 1.5},
    )  # fmt: skip
    return path, params


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved checkpoint, to damage."""
    return shutil.copytree(saved[0], tmp_path / "ckpt")


# ---- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_bit_identical(tmp_path, name):
    params = _quantized(name)
    down = _leaves(params)["layers/0/mlp/down_proj/kernel"]
    # Each case carries what it is named for (a planted layout bug must drop it).
    carries = {
        "int4-g128": lambda: down.k % down.group_size != 0,
        "uint4-g64": lambda: down.zero_point is not None and down.k % down.group_size != 0,
        "nf4-double-quant": lambda: isinstance(down.scale, QArray),
        "int8-a8": lambda: down.activation == "int8",
        "fp8": lambda: down.qvalue.dtype == jnp.float8_e4m3fn,
        "mxfp4": lambda: down.scale.dtype == jnp.float8_e8m0fnu,  # safetensors' F8_E8M0
        "nvfp4": lambda: isinstance(down.scale, QArray) and down.scale.qtype == "fp8_e4m3",
    }
    assert carries[name]()
    recipe = _recipe(name)
    report = {"rows": [{"path": "a", "rel_error": 0.01}], "time_s": 2.0}
    path = packed.save_packed(tmp_path / "m", config=HF_CONFIG, params=params, recipe=recipe,
                              report=report)  # fmt: skip
    model, loaded, tokenizer, config = models.load_packed(path, dtype=jnp.float32)
    _assert_bit_identical(loaded, params)
    assert config == HF_CONFIG and tokenizer is None
    assert jquant.Recipe.from_yaml((path / packed.RECIPE).read_text()) == recipe
    assert json.loads((path / packed.REPORT).read_text()) == report
    np.testing.assert_array_equal(_logits(model, loaded), _logits(model, params))
    _assert_bit_identical(nnx.state(model), params)  # the module holds the loaded params


def test_models_load_reads_a_packed_directory(tmp_path, tiny_gguf):
    model, params, tokenizer, config = models.load(tiny_gguf[0], with_config=True)
    qparams = jquant.quantize(params, "w4a16-rtn-g128")
    path = packed.save_packed(tmp_path / "q", config=config, params=qparams, tokenizer=tokenizer)
    assert packed.is_packed(path)
    model2, params2, tok2, config2 = models.load(path, with_config=True)
    assert len(models.load(str(path))) == 3
    _assert_bit_identical(params2, qparams)
    assert config2 == json.loads(json.dumps(config))
    text = "hello world <|im_end|>"
    assert tok2.encode(text) == tokenizer.encode(text)
    assert tok2.decode(tok2.encode(text)) == text
    assert (tok2.bos_token_id, tok2.eos_token_id, tok2.pad_token_id, tok2.chat_template) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
        tokenizer.chat_template,
    )  # fmt: skip
    tokens = jnp.asarray([tokenizer.encode("hello world")], jnp.int32)
    np.testing.assert_array_equal(_logits(model2, params2, tokens),
                                  _logits(model, qparams, tokens))  # fmt: skip


@pytest.mark.parametrize("add_bos", [True, False])
def test_packed_tokenizer_keeps_add_bos_token(tmp_path, tiny, add_bos):
    # The flag as configured, even where the backend's post-processor adds no BOS (a Llama 3
    # GGUF that omits tokenizer.ggml.add_bos_token: llama.cpp's default is True).
    tok = models.load(tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors()))[2]
    tok.add_bos_token = add_bos
    d = tmp_path / "p"
    d.mkdir()
    packed._write_tokenizer(d, tok)
    meta = json.loads(json.dumps(packed._tokenizer_meta(tok)))
    assert packed._read_tokenizer(d, meta).add_bos_token is add_bos
    # Written before the flag was recorded: as the post-processor does (none here).
    del meta["add_bos_token"]
    assert packed._read_tokenizer(d, meta).add_bos_token is False


def test_hf_directory_still_loads_as_floats(tmp_path, tiny):
    tensors = tiny.tensors(tied=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny.config(tied=True)))
    save_file(tensors, str(hf / "model.safetensors"))
    assert not packed.is_packed(hf)
    _, params, _ = models.load(hf)
    kernel = _leaves(params)["layers/1/mlp/up_proj/kernel"]
    np.testing.assert_array_equal(kernel, tensors["model.layers.1.mlp.up_proj.weight"].T)


# ---- no float weights on load ---------------------------------------------------------------


def test_load_never_materializes_float_weights(saved, monkeypatch):
    path, params = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("load_packed must not go through the float import path")

    monkeypatch.setattr(importlib.import_module("jquant.models.convert"), "params_from_hf",
                        forbidden)  # fmt: skip
    monkeypatch.setattr(importlib.import_module("jquant.models.load"), "params_from_hf",
                        forbidden)  # fmt: skip
    monkeypatch.setattr(jquant.io, "load_checkpoint", forbidden)
    monkeypatch.setattr(jquant.models, "init_model", forbidden)
    monkeypatch.setattr(importlib.import_module("jquant.models.llama"), "init_model", forbidden)
    monkeypatch.setattr(QArray, "dequantize", forbidden)
    monkeypatch.setattr(QArray, "dequantize_stored", forbidden)
    quantized = {p: q.shape for p, q in _leaves(params).items() if isinstance(q, QArray)}
    float_shapes = {s for s in quantized.values()} | {s[::-1] for s in quantized.values()}
    before = jax.live_arrays()  # held, so no id is reused below
    seen = {id(a) for a in before}

    _, loaded, _ = models.load(path)

    leaves = _leaves(loaded)
    assert {p for p, v in leaves.items() if isinstance(v, QArray)} == set(quantized)
    new = [a for a in jax.live_arrays() if id(a) not in seen]
    floats = [a.shape for a in new if jnp.issubdtype(a.dtype, jnp.floating)
              and a.shape in float_shapes]  # fmt: skip
    assert floats == []
    # Nothing else is kept alive either: the new arrays are exactly the loaded params.
    loaded_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded))
    assert sum(a.nbytes for a in new) == loaded_bytes


# ---- bits on disk ---------------------------------------------------------------------------


def test_int4_g128_stays_packed_on_disk(tmp_path):
    # Wide kernels and a tiny vocabulary, so the quantized kernels dominate the file sizes.
    config = {**HF_CONFIG, "vocab_size": 8, "hidden_size": 512, "intermediate_size": 1536,
              "num_key_value_heads": 4, "head_dim": 128}  # fmt: skip
    params = jquant.quantize(_float_params(config), "w4a16-rtn-g128")
    path = packed.save_packed(tmp_path / "m", config=config, params=params)
    on_disk = sum(p.stat().st_size for p in (path / packed.ARRAYS).rglob("*") if p.is_file())
    assert sorted(os.listdir(path / packed.ARRAYS)) == ["layers.00000.safetensors",
                                                        "model.safetensors"]  # fmt: skip
    leaves = _leaves(params)
    kernels = [q for k, q in leaves.items() if isinstance(q, QArray) and k.startswith("layers/")]
    tables = [q for k, q in leaves.items() if isinstance(q, QArray) and not k.startswith("layers/")]
    weights = sum(q.size for q in kernels)
    floats = sum(x.nbytes for x in leaves.values() if not isinstance(x, QArray))
    assert 8 * sum(q.nbytes for q in kernels) / weights == pytest.approx(4.125)
    # The table and head: int8 per row, one bfloat16 scale per 512-wide row.
    table_bytes = sum(q.nbytes for q in tables)
    assert 8 * table_bytes / sum(q.size for q in tables) == pytest.approx(8 + 16 / 512)
    bits = 8 * (on_disk - floats - table_bytes) / weights  # the kernels, overhead too
    print(f"int4 g128 on disk: {bits:.3f} bits/weight ({on_disk} bytes)")
    assert 4.125 < bits < 4.13  # two safetensors headers (~4 KB) on ~1.6 MB


# ---- atomic writes --------------------------------------------------------------------------


def _raise_after(fn, exc):
    def step(*args, **kwargs):
        fn(*args, **kwargs)
        raise exc

    return step


def _raise_instead(exc):
    def step(*args, **kwargs):
        raise exc

    return step


# The first part's file, the writer's first progress.json (in its constructor), the rename.
STEPS = {
    "write_file": (_safetensors, _raise_after),
    "_write_atomically": (_packed_writer, _raise_after),
    "_commit": (_packed_writer, lambda fn, exc: _raise_instead(exc)),
}


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError("disk full")])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, step, exc):
    params = _quantized("int8-a8")
    module, fail = STEPS[step]
    monkeypatch.setattr(module, step, fail(getattr(module, step), exc))
    with pytest.raises(type(exc)):
        packed.save_packed(tmp_path / "m", config=HF_CONFIG, params=params)
    assert os.listdir(tmp_path) == []


def test_existing_directory(tmp_path, saved, monkeypatch):
    old_params = saved[1]
    new_params = _quantized("int8-a8")
    target = shutil.copytree(saved[0], tmp_path / "m")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        packed.save_packed(target, config=HF_CONFIG, params=new_params)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        packed.save_packed(tmp_path / "file", config=HF_CONFIG, params=new_params)
    (tmp_path / "empty").mkdir()
    packed.save_packed(tmp_path / "empty", config=HF_CONFIG, params=new_params)
    _assert_bit_identical(models.load_packed(tmp_path / "empty")[1], new_params)
    (tmp_path / "plain").mkdir()  # the checkpoint gets the mode of any new directory
    assert (tmp_path / "empty").stat().st_mode == (tmp_path / "plain").stat().st_mode
    (tmp_path / "plain").rmdir()

    # A failed overwrite keeps the old checkpoint, whole.
    with monkeypatch.context() as m:
        m.setattr(_packed_writer, "_commit", _raise_instead(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            packed.save_packed(target, config=HF_CONFIG, params=new_params, overwrite=True)
    _assert_bit_identical(models.load_packed(target)[1], old_params)
    assert (target / packed.RECIPE).is_file()

    packed.save_packed(target, config=HF_CONFIG, params=new_params, overwrite=True)
    _assert_bit_identical(models.load_packed(target)[1], new_params)
    assert not (target / packed.RECIPE).exists()  # replaced, not merged
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "m"]


def test_bad_input_is_refused_before_writing(tmp_path):
    params = _quantized("int8-a8")
    with pytest.raises(ValueError, match="report cannot be written as JSON"):
        packed.save_packed(tmp_path / "m", config=HF_CONFIG, params=params,
                           report={"f": object()})  # fmt: skip
    with pytest.raises(ValueError, match="down_proj/kernel has shape"):
        packed.save_packed(tmp_path / "m", config={**HF_CONFIG, "intermediate_size": 128},
                           params=params)  # fmt: skip
    assert os.listdir(tmp_path) == []


# ---- damaged checkpoints --------------------------------------------------------------------


def _edit_metadata(path, edit):
    meta = json.loads((path / packed.METADATA).read_text())
    edit(meta)
    (path / packed.METADATA).write_text(json.dumps(meta))


def _largest_array_file(path):
    return max((p for p in (path / packed.ARRAYS).rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip


def _qvalue(meta):
    return meta["params"]["layers/0/mlp/down_proj/kernel"]["qvalue"]


def _set_layout(meta):
    meta["layout_version"] = 3


def _set_format(meta):
    meta["format"] = "something-else"


def _set_qvalue_dtype(meta):
    _qvalue(meta)["dtype"] = "int8"


def _set_qvalue_shape(meta):
    _qvalue(meta)["shape"][-1] //= 2


def _set_norm_shape(meta):
    meta["params"]["norm/scale"]["shape"] = [32]


def _drop_param(meta):
    del meta["params"]["norm/scale"]


@pytest.mark.parametrize(
    "edit, message",
    [
        (_set_layout, r"written by jquant layout 3 \(jquant 0\.1\.0\); this jquant reads "
                      r"layouts 1, 2"),
        (_set_format, "not a jquant packed checkpoint"),
        (
            _set_qvalue_dtype,
            r"file arrays/layers\.00000\.safetensors stores tensor layers/0/mlp/down_proj/"
            r"kernel\.qvalue as uint8\[64, 100\].* says int8\[64, 100\]",
        ),
        (
            _set_qvalue_shape,
            # jquant.json's own QArray no longer agrees with its k: refused as it is read.
            r"down_proj/kernel badly .*qvalue has shape \(64, 50\), expected \(64, 100\)",
        ),
        (_set_norm_shape, r"norm/scale has shape \(32,\).*config implies \(64,\)"),
        (_drop_param, "missing: norm/scale"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_metadata_disagreements(copy, edit, message):
    _edit_metadata(copy, edit)
    with pytest.raises(ValueError, match=message) as e:
        models.load_packed(copy)
    assert str(copy) in str(e.value)


def test_missing_or_damaged_files(copy):
    data = _largest_array_file(copy)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match=rf"{data.name} has {size // 2} bytes.*says {size}"):
        models.load_packed(copy)
    data.unlink()
    with pytest.raises(ValueError, match=rf"{data.name} is missing"):
        models.load(copy)
    (copy / packed.METADATA).write_text((copy / packed.METADATA).read_text()[:100])
    with pytest.raises(ValueError, match="jquant.json is not valid JSON"):
        models.load_packed(copy)
    (copy / packed.METADATA).unlink()
    assert packed.is_packed(copy)  # so models.load explains, instead of an HF error
    with pytest.raises(ValueError, match="jquant.json is missing.*incomplete") as e:
        models.load(copy)
    assert str(copy) in str(e.value)


def test_damage_behind_a_matching_manifest_is_still_a_clear_error(copy):
    # jquant.json's sizes agree with the damaged file: the header check must still refuse it.
    data = _largest_array_file(copy)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    name = data.relative_to(copy).as_posix()

    def match(meta):  # size and checksum both agree with the damaged file
        meta["files"][name] = data.stat().st_size
        meta["sha256"][name] = packed._file_sha256(data)

    _edit_metadata(copy, match)
    with pytest.raises(ValueError, match=rf"file {name} stores tensor .* of the file's "
                       rf"{data.stat().st_size}; the checkpoint is corrupt") as e:  # fmt: skip
        models.load_packed(copy)
    assert str(copy) in str(e.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert not packed.is_packed(tmp_path)
    with pytest.raises(ValueError, match="not a jquant packed checkpoint") as e:
        models.load_packed(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- checksums ------------------------------------------------------------------------------


def _flip_byte(path, offset=None):
    """Flips one byte of ``path`` in place (the middle one by default): the size stays."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_an_array_file_names_the_file_and_the_array(copy):
    data = _largest_array_file(copy)
    size = data.stat().st_size
    _flip_byte(data)
    assert data.stat().st_size == size  # the sizes alone would not notice
    name = data.relative_to(copy).as_posix()
    with pytest.raises(ValueError, match=rf"file {name} does not match its sha256") as e:
        models.load_packed(copy)
    assert str(copy) in str(e.value)
    # A file holds many arrays: the error names the one whose bytes hold the flipped byte.
    middle = data.stat().st_size // 2
    meta = json.loads((copy / packed.METADATA).read_text())
    held = [t for p, d in meta["params"].items() if d["file"] == name
            for t, a in _packed_meta._array_descs(d, p).items()
            if a["offsets"][0] <= middle < a["offsets"][1]]  # fmt: skip
    assert len(held) == 1 and held[0].startswith("layers/0/")
    assert f"changed arrays: {held[0]};" in str(e.value), str(e.value)


def test_a_flipped_byte_in_a_header_says_so(copy):
    data = _largest_array_file(copy)
    _flip_byte(data, 20)  # inside the JSON header
    with pytest.raises(ValueError, match=r"does not match its sha256.*changed arrays: none "
                       r"\(the change is in its header\)"):  # fmt: skip
        models.load_packed(copy)


def test_a_file_without_its_checksum_is_refused(copy):
    # Dropping a damaged file's checksum from jquant.json must not turn the check off.
    data = _largest_array_file(copy)
    _flip_byte(data)
    name = data.relative_to(copy).as_posix()
    _edit_metadata(copy, lambda meta: meta["sha256"].pop(name))
    with pytest.raises(ValueError, match=rf"jquant\.json has no sha256 for file {name}"):
        models.load_packed(copy)


def test_a_flipped_byte_in_another_file_names_it(copy):
    _flip_byte(copy / packed.RECIPE, 0)
    with pytest.raises(ValueError, match=rf"file {packed.RECIPE} does not match its sha256"):
        models.load_packed(copy)


def test_a_checkpoint_without_checksums_still_loads_with_a_warning(saved, copy):
    def strip(desc):
        desc.pop("sha256", None)
        for value in desc.values():
            if isinstance(value, dict):
                strip(value)

    def old(meta):  # as written before checksums were recorded
        del meta["sha256"]
        for desc in meta["params"].values():
            strip(desc)

    _edit_metadata(copy, old)
    assert "sha256" not in (copy / packed.METADATA).read_text()
    with pytest.warns(UserWarning, match="written without checksums"):
        _, params, _, _ = models.load_packed(copy)
    _assert_bit_identical(params, saved[1])


# ---- the safetensors files ------------------------------------------------------------------


def test_array_files_are_standard_safetensors(saved):
    from safetensors import safe_open

    path, params = saved
    meta = json.loads((path / packed.METADATA).read_text())
    names = {}
    for p, desc in meta["params"].items():
        for tensor, array in _packed_meta._array_descs(desc, p).items():
            names.setdefault(desc["file"], {})[tensor] = array
    assert sorted(names) == ["arrays/layers.00000.safetensors", "arrays/model.safetensors"]
    down = _leaves(params)["layers/0/mlp/down_proj/kernel"]
    for file, arrays in names.items():
        with safe_open(path / file, framework="numpy") as f:
            assert set(f.keys()) == set(arrays)
            for tensor, array in arrays.items():
                assert f.get_slice(tensor).get_shape() == array["shape"], tensor
        if file.startswith("arrays/layers"):
            with safe_open(path / file, framework="numpy") as f:
                codes = f.get_tensor("layers/0/mlp/down_proj/kernel.qvalue")
            np.testing.assert_array_equal(codes, np.asarray(down.qvalue))
            assert "layers/0/input_layernorm/scale" in arrays  # a float leaf: its path alone


def test_a_dtype_safetensors_lacks_is_refused_naming_the_parameter(tmp_path):
    params = _float_params()
    norm = params["norm"]["scale"]
    norm.set_value(jnp.zeros(norm.get_value().shape, jnp.int4))
    with pytest.raises(ValueError, match=r"parameter norm/scale has dtype int4, which a packed "
                       r"checkpoint cannot store"):  # fmt: skip
        packed.save_packed(tmp_path / "m", config=HF_CONFIG, params=params)
    assert os.listdir(tmp_path) == []


def _rewrite_header(path, edit):
    """Edits a safetensors file's header in place, keeping its length (so no offset moves)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    path.write_bytes(data[:8] + text + b" " * (n - len(text)) + data[8 + n :])


def _swap_shape(header):
    entry = header["layers/0/mlp/down_proj/kernel.qvalue"]
    entry["shape"] = entry["shape"][::-1]  # the same bytes, read as another shape


def _move_offsets(header):
    a, b = (header[f"layers/0/mlp/{m}_proj/kernel.scale"] for m in ("gate", "up"))
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]


def _rename_tensor(header):
    header["layers/0/mlp/down_proj/kernel.qvalues"] = header.pop(
        "layers/0/mlp/down_proj/kernel.qvalue")


@pytest.mark.parametrize(
    "edit, message",
    [
        (_swap_shape, r"stores tensor layers/0/mlp/down_proj/kernel\.qvalue as uint8\[100, 64\]"
                      r".* says uint8\[64, 100\]"),
        (_move_offsets, r"stores tensor layers/0/mlp/gate_proj/kernel\.scale as .* at bytes "
                        r"\[\d+, \d+\], but jquant\.json says .* at bytes"),
        (_rename_tensor, r"holds other tensors than jquant\.json lists \(missing: "
                         r"layers/0/mlp/down_proj/kernel\.qvalue; unexpected: .*kernel\.qvalues\)"),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)  # fmt: skip
def test_a_header_disagreeing_with_the_metadata_is_refused(copy, edit, message):
    # Checksums updated to match: only the header check stands between it and a wrong read.
    data = copy / "arrays/layers.00000.safetensors"
    _rewrite_header(data, edit)

    def match(meta):
        meta["sha256"]["arrays/layers.00000.safetensors"] = packed._file_sha256(data)

    _edit_metadata(copy, match)
    with pytest.raises(ValueError, match=message) as e:
        models.load_packed(copy)
    assert str(copy) in str(e.value) and "the checkpoint is corrupt" in str(e.value)


# ---- layout 1 (orbax) -----------------------------------------------------------------------


def _v1_descriptor(x):
    """A leaf's layout-1 descriptor and its orbax arrays (a QArray as ``{field: arrays}``)."""
    if isinstance(x, QArray):
        desc = {"qarray": {f: _packed_meta._static_to_json(getattr(x, f))
                           for f in _packed_meta._STATIC_FIELDS}}  # fmt: skip
        arrays = {}
        for f in _packed_meta._DATA_FIELDS:
            value = getattr(x, f)
            desc[f] = None
            if value is not None:
                desc[f], arrays[f] = _v1_descriptor(value)
        return desc, arrays
    desc = {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name,
            "sha256": _packed_meta._sha256(x)}  # fmt: skip
    return desc, x


def _save_layout_1(directory, config, params):
    """A checkpoint as jquant wrote it before layout 2: the arrays in an orbax-checkpoint."""
    import orbax.checkpoint as ocp

    names, tree = {}, {}
    for keys, var in nnx.to_flat_state(params):
        node = tree
        for key in map(str, keys[:-1]):
            node = node.setdefault(key, {})
        names["/".join(map(str, keys))], node[str(keys[-1])] = _v1_descriptor(var.get_value())
    directory.mkdir()
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save((directory / "arrays").absolute(), args=ocp.args.PyTreeSave(tree))
    files = {p.relative_to(directory).as_posix(): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip
    meta = {"format": "jquant.packed", "layout_version": 1, "jquant_version": "0.1.0",
            "config": config, "params": names, "tokenizer": None, "files": files,
            "sha256": {name: packed._file_sha256(directory / name) for name in files}}  # fmt: skip
    (directory / packed.METADATA).write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def layout_1(tmp_path_factory):
    params = _quantized("nf4-double-quant")
    return _save_layout_1(tmp_path_factory.mktemp("v1") / "m", HF_CONFIG, params), params


def test_a_layout_1_checkpoint_still_loads(layout_1):
    path, params = layout_1
    assert json.loads((path / packed.METADATA).read_text())["layout_version"] == 1
    assert not list(path.rglob("*.safetensors"))
    _, loaded, _, config = models.load_packed(path)
    _assert_bit_identical(loaded, params)
    assert config == HF_CONFIG
    arrays, _, _ = packed.read_packed(path, only="layers/0/mlp")
    assert sorted(arrays) == [f"layers/0/mlp/{m}_proj/kernel" for m in ("down", "gate", "up")]


def test_a_flipped_byte_in_a_layout_1_file_names_the_array(layout_1, tmp_path):
    copy = shutil.copytree(layout_1[0], tmp_path / "m")
    data = _largest_array_file(copy)
    _flip_byte(data)
    # Which array the flipped byte lands in depends on how orbax packed the file.
    with pytest.raises(ValueError, match=r"does not match its sha256.*changed arrays: "
                       r"(layers/\d+/|lm_head/|embed_tokens/|norm/)[\w/]+(\.\w+)*;"):  # fmt: skip
        models.load_packed(copy)


# ---- act-order (QArray.perm) ----------------------------------------------------------------


def _with_perms(params):
    """``params`` with every quantized kernel given a random input permutation (act-order)."""
    rng = np.random.default_rng(3)

    def permuted(x):
        if not isinstance(x, QArray):
            return x
        perm = rng.permutation(x.k).astype(np.int32)
        return dataclasses.replace(x, perm=jax.device_put(perm))

    return jax.tree.map(permuted, params, is_leaf=lambda x: isinstance(x, QArray))


def test_act_order_perm_round_trips_and_older_files_load_without_it(tmp_path):
    params = _with_perms(_quantized("uint4-g64"))
    down = _leaves(params)["layers/0/mlp/down_proj/kernel"]
    assert down.perm is not None and down.k % down.group_size != 0
    path = packed.save_packed(tmp_path / "m", config=HF_CONFIG, params=params)
    meta = json.loads((path / packed.METADATA).read_text())
    assert meta["params"]["layers/0/mlp/down_proj/kernel"]["perm"]["dtype"] == "int32"
    model, loaded, _, _ = models.load_packed(path, dtype=jnp.float32)
    _assert_bit_identical(loaded, params)  # perm included: it is a leaf
    np.testing.assert_array_equal(_logits(model, loaded), _logits(model, params))
    # A file written before QArrays had a perm has no "perm" entry: it loads, perm None.
    plain = packed.save_packed(tmp_path / "p", config=HF_CONFIG, params=_quantized("int4-g128"))
    meta = json.loads((plain / packed.METADATA).read_text())
    for desc in meta["params"].values():
        desc.pop("perm", None)
    (plain / packed.METADATA).write_text(json.dumps(meta))
    arrays, _, _ = packed.read_packed(plain)
    assert arrays["layers/0/mlp/down_proj/kernel"].perm is None
