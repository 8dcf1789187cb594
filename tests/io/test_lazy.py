"""Lazy loading: `LazyTensors` from a sharded HF directory and from GGUF files, read one tensor
at a time, and a model built a decoder layer at a time from it.

References: the tensors the test wrote (independent of jquant's readers), and the eager
checkpoint and `params_from_hf` (what lazy loading must reproduce exactly).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jquant import io as jio
from jquant.io import _lazy
from jquant.io._checkpoint import check_tensors
from jquant.models.config import LlamaConfig
from jquant.models.convert import global_params_from_hf, layer_params_from_hf, params_from_hf

Q = gguf.GGMLQuantizationType
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _hf_config(tiny, tied: bool) -> dict:
    c = tiny.config(tied=tied)
    raw = {k: c[k] for k in c if k not in ("rope_scaling", "sliding_window")}
    raw.pop("attention_bias")
    return dict(raw, hidden_act="silu")


def _stored(name: str):
    """The dtype the sharded directory stores `name` in: bf16 for the MLP and norms, f32 else."""
    return ml_dtypes.bfloat16 if (".mlp." in name or "norm" in name) else np.float32


def write_sharded(path, tiny, *, tied: bool = False) -> dict[str, np.ndarray]:
    """Two shards and an index, each shard holding bf16 and f32 tensors; returns what each HF
    name must read as (float32), the ignored `rotary_emb.inv_freq` buffer left out."""
    tensors = tiny.tensors(tied=tied)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(_hf_config(tiny, tied)))
    names = sorted(tensors)
    stored = {n: tensors[n].astype(_stored(n)) for n in names}
    stored["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    weight_map = {}
    for s, shard in enumerate(SHARDS):
        part = {n: stored[n] for n in sorted(stored)[s::2]}
        save_file(part, str(path / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return {n: stored[n].astype(np.float32) for n in names}


@pytest.fixture
def sharded(tmp_path, tiny):
    path = tmp_path / "m"
    return path, write_sharded(path, tiny)


@pytest.fixture
def reads(monkeypatch):
    """Every low-level tensor read (`_lazy.read_bytes`), as the file's tensor names, in order."""
    seen: list[str] = []
    real = _lazy.read_bytes

    def counting(path, offset, nbytes, *, tensor):
        seen.append(tensor)
        return real(path, offset, nbytes, tensor=tensor)

    monkeypatch.setattr(_lazy, "read_bytes", counting)
    return seen


def _gguf_files(tmp_path, tiny):
    """Tiny GGUFs covering every per-tensor conversion: Q/K unpermuted (llama), a quantized
    tensor dequantized, Gemma norms less 1 (gemma2), biases (qwen2)."""
    out = {}
    for arch, tied in (("llama", False), ("gemma2", True), ("qwen2", False)):
        tensors = tiny.tensors(arch=arch, tied=tied)
        quant = {"model.layers.1.mlp.down_proj.weight": Q.Q8_0} if arch == "llama" else None
        path = tiny.write_gguf(tmp_path / f"{arch}.gguf", tensors, arch=arch, quantize=quant)
        out[arch] = path, tensors
    return out


def _assert_same_mapping(lazy: jio.LazyTensors, eager: dict[str, np.ndarray]) -> None:
    assert list(lazy) == list(eager)
    for name, want in eager.items():
        got = lazy[name]
        assert got.dtype == np.float32 and lazy.shape(name) == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert lazy.read(name, ml_dtypes.bfloat16).tobytes() == want.astype(
            ml_dtypes.bfloat16
        ).tobytes(), name


# --- values: lazy == eager == what was written ------------------------------------------------


def test_sharded_hf_lazy_equals_eager_and_the_written_tensors(sharded):
    path, want = sharded
    lazy = jio.load_checkpoint(path, lazy=True)
    eager = jio.load_checkpoint(path)
    assert isinstance(lazy.tensors, jio.LazyTensors) and isinstance(eager.tensors, dict)
    assert lazy.config == eager.config
    assert set(lazy.tensors) == set(want)  # inv_freq ignored, as eagerly
    _assert_same_mapping(lazy.tensors, eager.tensors)
    for name, value in want.items():
        np.testing.assert_array_equal(lazy.tensors[name], value, err_msg=name)
        assert lazy.tensors.stored_dtype(name) == ("BF16" if _stored(name) != np.float32 else "F32")
    assert lazy.num_parameters == eager.num_parameters


def test_tied_lm_head_is_dropped_lazily(tmp_path, tiny):
    path = tmp_path / "m"
    write_sharded(path, tiny, tied=False)
    config = _hf_config(tiny, tied=True)  # the file has lm_head.weight; the config ties it
    (path / "config.json").write_text(json.dumps(config))
    lazy = jio.load_hf_dir(path, lazy=True).tensors
    assert "lm_head.weight" not in lazy and "lm_head.weight" not in list(lazy)
    assert set(lazy) == set(jio.load_hf_dir(path).tensors)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_gguf_lazy_equals_eager_and_the_written_tensors(tmp_path, tiny, arch):
    path, written = _gguf_files(tmp_path, tiny)[arch]
    lazy = jio.load_gguf(path, lazy=True)
    eager = jio.load_gguf(path)
    assert lazy.config == eager.config
    _assert_same_mapping(lazy.tensors, eager.tensors)
    quantized = "model.layers.1.mlp.down_proj.weight" if arch == "llama" else None
    for name, value in written.items():
        if name == quantized:
            assert lazy.tensors.stored_dtype(name) == "Q8_0"
            np.testing.assert_allclose(lazy.tensors[name], value, atol=0.05)
        elif name in lazy.tensors:  # (a tied file has no lm_head)
            assert lazy.tensors.stored_dtype(name) == "F32"
            np.testing.assert_allclose(lazy.tensors[name], value, rtol=0, atol=1e-6, err_msg=name)


def test_bf16_read_as_bf16_is_the_bytes_read_with_no_float32_copy(sharded, monkeypatch):
    path, want = sharded
    lazy = jio.load_hf_dir(path, lazy=True).tensors
    name = "model.layers.0.mlp.up_proj.weight"
    assert lazy.stored_dtype(name) == "BF16"
    buffers = []
    real = _lazy.read_bytes
    monkeypatch.setattr(_lazy, "read_bytes", lambda *a, **k: buffers.append(real(*a, **k)) or
                        buffers[-1])  # fmt: skip
    got = lazy.read(name, ml_dtypes.bfloat16)
    assert got.dtype == ml_dtypes.bfloat16
    assert got.base is buffers[0]  # a view of what was read: nothing converted, nothing copied
    np.testing.assert_array_equal(got.astype(np.float32), want[name])


# --- shapes without reads, and no mapping left behind -----------------------------------------


def test_loading_and_checking_read_no_tensor(sharded, tmp_path, tiny, reads):
    path, want = sharded
    gguf_path, _ = _gguf_files(tmp_path, tiny)["llama"]
    for ckpt in (jio.load_hf_dir(path, lazy=True), jio.load_gguf(gguf_path, lazy=True)):
        lazy = ckpt.tensors
        check_tensors(lazy, ckpt.config, ckpt.source)
        assert ckpt.num_parameters > 0 and len(lazy) == len(list(lazy))
        assert all(n in lazy for n in lazy) and "nope" not in lazy
        shapes = {n: lazy.shape(n) for n in lazy}
        assert shapes == jio.expected_shapes(ckpt.config)
    assert reads == []
    with pytest.raises(KeyError, match="has no tensor 'nope'"):
        lazy.shape("nope")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_file_stays_mapped(sharded, tmp_path, tiny):
    path, _ = sharded
    gguf_path, _ = _gguf_files(tmp_path, tiny)["llama"]
    held = [jio.load_hf_dir(path, lazy=True).tensors, jio.load_gguf(gguf_path, lazy=True).tensors]
    values = [lazy[n] for lazy in held for n in lazy]  # every tensor read, and kept
    assert values
    maps = Path("/proc/self/maps").read_text()
    for file in (gguf_path, *(path / s for s in SHARDS)):
        assert str(file.resolve()) not in maps, f"{file} is still memory-mapped"


# --- one layer at a time ----------------------------------------------------------------------


def _gguf_file_names(lazy_names, arch):
    from jquant.io.gguf import gguf_name

    return sorted(gguf_name(n, arch) for n in lazy_names)


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_a_layer_reads_exactly_its_tensors(sharded, tmp_path, tiny, reads, source):
    if source == "hf":
        ckpt = jio.load_hf_dir(sharded[0], lazy=True)
        file_name = lambda names: sorted(names)
    else:
        ckpt = jio.load_gguf(_gguf_files(tmp_path, tiny)["llama"][0], lazy=True)
        file_name = lambda names: _gguf_file_names(names, "llama")
    config = LlamaConfig.from_hf(ckpt.config)
    for layer in range(config.num_layers):
        reads.clear()
        layer_params_from_hf(ckpt.tensors, config, layer)
        mine = [n for n in ckpt.tensors if n.startswith(f"model.layers.{layer}.")]
        assert len(mine) == 9
        assert sorted(reads) == file_name(mine)  # each once, and nothing else
    reads.clear()
    global_params_from_hf(ckpt.tensors, config)
    assert sorted(reads) == file_name(["lm_head.weight", "model.embed_tokens.weight",
                                       "model.norm.weight"])  # fmt: skip
    for part, name in (("embed_tokens", "model.embed_tokens.weight"),
                       ("norm", "model.norm.weight"), ("lm_head", "lm_head.weight")):
        reads.clear()
        state = global_params_from_hf(ckpt.tensors, config, part=part)
        assert list(state) == [part]
        assert sorted(reads) == file_name([name])  # that group alone


@pytest.mark.parametrize("param_dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("source", ["hf", "gguf-llama", "gguf-gemma2", "gguf-qwen2"])
def test_parts_equal_params_from_hf(sharded, tmp_path, tiny, source, param_dtype):
    if source == "hf":
        path, load = sharded[0], jio.load_hf_dir
    else:
        path, load = _gguf_files(tmp_path, tiny)[source.split("-")[1]][0], jio.load_gguf
    lazy, eager = load(path, lazy=True), load(path)
    config = LlamaConfig.from_hf(eager.config)
    _, params = params_from_hf(eager.tensors, config, param_dtype=param_dtype)

    def same(got, want):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == w.dtype == param_dtype
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    for layer in range(config.num_layers):
        same(layer_params_from_hf(lazy.tensors, config, layer, param_dtype=param_dtype),
             params["layers"][layer])  # fmt: skip
    rest = {k: v for k, v in params.items() if k != "layers"}
    same(dict(global_params_from_hf(lazy.tensors, config, param_dtype=param_dtype)), rest)
    same(params_from_hf(lazy.tensors, config, param_dtype=param_dtype)[1], params)


def test_part_errors(sharded, tiny):
    path, _ = sharded
    lazy = jio.load_hf_dir(path, lazy=True)
    config = LlamaConfig.from_hf(lazy.config)
    with pytest.raises(ValueError, match="layer=2 is out of range: the model has 2 layers"):
        layer_params_from_hf(lazy.tensors, config, 2)
    tensors = dict(lazy.tensors)
    tensors["model.layers.1.mlp.up_proj.bias"] = np.zeros(96, np.float32)
    layer_params_from_hf(tensors, config, 0)  # another layer's extra tensor is not layer 0's
    with pytest.raises(ValueError, match="not part of this llama model, e.g. model.layers.1.mlp"):
        layer_params_from_hf(tensors, config, 1)
    del tensors["model.layers.1.mlp.up_proj.bias"], tensors["model.norm.weight"]
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        global_params_from_hf(tensors, config)


# --- damaged files ----------------------------------------------------------------------------


def test_shard_truncated_after_loading_fails_on_read_naming_the_file(sharded):
    path, want = sharded
    lazy = jio.load_hf_dir(path, lazy=True).tensors
    shard = path / SHARDS[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    with pytest.raises(ValueError, match=rf"{SHARDS[1]} is truncated: tensor {last} ends past"):
        lazy[last]
    first_shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    intact = next(n for n, s in first_shard.items() if s == SHARDS[0] and n in want)
    np.testing.assert_array_equal(lazy[intact], want[intact])  # the other shard still reads


@pytest.mark.parametrize("lazy", [False, True])
def test_damaged_shards_are_the_eager_errors(sharded, lazy):
    path, _ = sharded
    shard = path / SHARDS[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{SHARDS[1]} is not a readable safetensors file"):
        jio.load_hf_dir(path, lazy=lazy)
    shard.unlink()
    with pytest.raises(ValueError, match=f"lists shard {SHARDS[1]}, which is missing"):
        jio.load_hf_dir(path, lazy=lazy)


def test_gguf_truncated_after_loading_fails_on_read_naming_the_file(tmp_path, tiny):
    path, _ = _gguf_files(tmp_path, tiny)["llama"]
    lazy = jio.load_gguf(path, lazy=True).tensors
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"llama\.gguf is truncated: tensor blk\.1\.\w+\.weight"):
        for name in lazy:
            lazy[name]


def test_hub_lazy(tmp_path, tiny, monkeypatch):
    import huggingface_hub

    path = tmp_path / "snapshot"
    write_sharded(path, tiny)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(path))
    ckpt = jio.load_checkpoint("someorg/tiny", lazy=True)
    assert isinstance(ckpt.tensors, jio.LazyTensors) and ckpt.source == "someorg/tiny"
