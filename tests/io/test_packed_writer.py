"""`PackedWriter`: part-by-part writing, resuming after a crash to the same bytes, refusing a
run it cannot continue, and never leaving an unfinished output that loads."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import models
from jquant.io import packed
from jquant.models import LlamaConfig, abstract_model
from jquant.qarray import QArray

# test_packed.py's model with two decoder layers, so there are three parts: layers.00000,
# layers.00001 and model. (Test modules cannot import each other under --import-mode=importlib.)
CONFIG = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=200,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
FINGERPRINT = {"source": "tiny", "recipe": "nf4-double-quant", "calibration": "none"}
# A double-quantized scale (a QArray in a QArray) and bf16 float leaves: the deepest nesting.
RECIPE = jquant.Recipe.from_dict({"name": "nf4-dq", "rules": [
    {"pattern": "mlp/.*/kernel$", "weight": "nf4", "group_size": 64, "double_quant": True}]})


@pytest.fixture(scope="module")
def params():
    _, state = nnx.split(abstract_model(LlamaConfig.from_hf(CONFIG)))
    rng = np.random.default_rng(0)

    def draw(path, x):
        dtype = jnp.bfloat16 if "layernorm" in str(path) else x.dtype
        return jnp.asarray(0.05 * rng.standard_normal(x.shape, np.float32), dtype)

    return jquant.quantize(jax.tree.map_with_path(draw, state), RECIPE)


def _leaves(params) -> dict:
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(params)}


def _bits(leaf):
    """A leaf's tree structure (QArray static fields included) and every array's bytes."""
    arrays = [np.asarray(a) for a in jax.tree.leaves(leaf)]
    return jax.tree.structure(leaf), [(a.dtype, a.shape, a.tobytes()) for a in arrays]


def _assert_bit_identical(got, want):
    got = got if isinstance(got, dict) else _leaves(got)
    want = want if isinstance(want, dict) else _leaves(want)
    assert {p: _bits(v) for p, v in got.items()} == {p: _bits(v) for p, v in want.items()}


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _parts(params) -> dict[str, dict]:
    parts = {}
    for path, value in _leaves(params).items():
        parts.setdefault(packed.part_of(path), {})[path] = value
    assert sorted(parts) == ["layers.00000", "layers.00001", "model"]
    return parts


def _writer(directory, **kwargs):
    return packed.PackedWriter(directory, config=CONFIG, fingerprint=FINGERPRINT, **kwargs)


def _finish(writer):
    return writer.finish(recipe=RECIPE, report={"time_s": 1.0})


def _files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


def _uninterrupted(directory, params):
    writer = _writer(directory)
    for part, arrays in _parts(params).items():
        writer.write(part, arrays)
    return _finish(writer)


def test_a_resumed_run_writes_the_same_bytes_as_an_uninterrupted_one(tmp_path, params):
    parts = _parts(params)
    whole = _uninterrupted(tmp_path / "whole", params)

    writer = _writer(tmp_path / "resumed")
    writer.write("layers.00000", parts["layers.00000"])
    writer.write("model", parts["model"])
    partial = writer.partial
    del writer  # the run is killed: nothing is finished or cleaned up
    # Killed again inside the next part's write, before progress.json recorded it.
    (partial / "arrays/.layers.00001.safetensors.tmp").write_bytes(b"half a file")
    (partial / "arrays/layers.00001.safetensors").write_bytes(b"renamed, not yet recorded")

    writer = _writer(tmp_path / "resumed")
    assert writer.done == {"layers.00000", "model"}
    _assert_bit_identical(writer.read("layers.00000"), parts["layers.00000"])
    writer.write("layers.00001", parts["layers.00001"])
    resumed = _finish(writer)

    assert _files(resumed) == _files(whole)  # jquant.json included: nothing time-dependent
    assert not partial.exists()
    _assert_bit_identical(models.load_packed(resumed)[1], params)


def test_parts_are_stored_in_model_order_whatever_the_dict_order(tmp_path, params):
    whole = _uninterrupted(tmp_path / "whole", params)
    writer = _writer(tmp_path / "reversed")
    for part, arrays in reversed(_parts(params).items()):
        writer.write(part, dict(reversed(arrays.items())))
    assert _files(_finish(writer)) == _files(whole)


def test_another_fingerprint_or_config_is_refused(tmp_path, params):
    writer = _writer(tmp_path / "m")
    writer.write("model", _parts(params)["model"])
    other = {**FINGERPRINT, "recipe": "int4-g128", "jquant": "0.2"}
    with pytest.raises(ValueError, match=r"written by another run \(differing: "
                       r"fingerprint\['jquant'\], fingerprint\['recipe'\]\).*1 finished part.*"
                       r"overwrite=True"):  # fmt: skip
        packed.PackedWriter(tmp_path / "m", config=CONFIG, fingerprint=other)
    with pytest.raises(ValueError, match=r"differing: config\)"):
        packed.PackedWriter(tmp_path / "m", config={**CONFIG, "rms_norm_eps": 1e-6},
                            fingerprint=FINGERPRINT)  # fmt: skip
    assert _writer(tmp_path / "m").done == {"model"}  # the refusals changed nothing
    fresh = packed.PackedWriter(tmp_path / "m", config=CONFIG, fingerprint=other, overwrite=True)
    assert fresh.done == set()
    assert os.listdir(fresh.partial / packed.ARRAYS) == []


def test_without_resume_an_unfinished_output_is_an_error(tmp_path, params):
    _writer(tmp_path / "m").write("model", _parts(params)["model"])
    with pytest.raises(ValueError, match=r"\.m\.partial holds an unfinished output.*resume=True"):
        _writer(tmp_path / "m", resume=False)
    with pytest.raises(ValueError, match=r"\.m\.partial holds an unfinished output"):
        packed.save_packed(tmp_path / "m", config=CONFIG, params=params)
    assert _writer(tmp_path / "m", resume=False, overwrite=True).done == set()


def test_a_damaged_part_is_written_again(tmp_path, params):
    parts = _parts(params)
    writer = _writer(tmp_path / "m")
    for part in ("layers.00000", "layers.00001"):
        writer.write(part, parts[part])
    _flip_byte(writer.partial / "arrays/layers.00000.safetensors")
    (writer.partial / "arrays/layers.00001.safetensors").unlink()
    with pytest.warns(UserWarning, match="file is missing or changed") as warned:
        writer = _writer(tmp_path / "m")
    assert sorted(str(w.message).split("part ")[1][:12] for w in warned) == [
        "layers.00000", "layers.00001"]  # fmt: skip
    assert writer.done == set()
    for part, arrays in parts.items():
        writer.write(part, arrays)
    _assert_bit_identical(models.load_packed(_finish(writer))[1], params)


def test_an_unfinished_output_never_loads(tmp_path, params):
    target = tmp_path / "m"
    writer = _writer(target)
    for part, arrays in _parts(params).items():
        writer.write(part, arrays)  # every part written, finish not called
    assert not target.exists() and not packed.is_packed(target)
    with pytest.raises(ValueError, match="an unfinished PackedWriter output"):
        models.load_packed(writer.partial)
    with pytest.raises(ValueError, match="in no written part"):
        _writer(tmp_path / "other").finish()
    _finish(writer)
    assert packed.is_packed(target) and not writer.partial.exists()
    with pytest.raises(ValueError, match="this writer is finished"):
        writer.write("model", {})


def test_finish_refuses_a_missing_parameter_and_keeps_the_parts(tmp_path, params):
    parts = _parts(params)
    writer = _writer(tmp_path / "m")
    writer.write("layers.00000", parts["layers.00000"])
    writer.write("model", parts["model"])
    with pytest.raises(ValueError, match=r"\d+ parameter\(s\) of the model are in no written "
                       r"part, e\.g\. layers/1/"):  # fmt: skip
        writer.finish()
    writer.write("layers.00001", parts["layers.00001"])  # nothing was lost: finish it now
    _assert_bit_identical(models.load_packed(_finish(writer))[1], params)


def test_bad_parts_are_refused(tmp_path, params):
    parts = _parts(params)
    writer = _writer(tmp_path / "m")
    writer.write("layers.00000", parts["layers.00000"])
    with pytest.raises(ValueError, match="part layers.00000 is already written"):
        writer.write("layers.00000", parts["layers.00000"])
    with pytest.raises(ValueError, match=r"parameter layers/0/\S+ is already in part layers"):
        writer.write("again", parts["layers.00000"])
    with pytest.raises(ValueError, match=r"part name '\.\./x' must be letters"):
        writer.write("../x", parts["model"])
    with pytest.raises(ValueError, match=r"parameter layers/7/mlp/up_proj/kernel is not part"):
        writer.write("layers.00007", {"layers/7/mlp/up_proj/kernel": jnp.zeros((64, 200))})
    assert writer.done == {"layers.00000"}


def test_the_target_is_refused_up_front(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        _writer(tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        _writer(tmp_path / "full")
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]


def test_abort_removes_the_partial_directory(tmp_path, params):
    writer = _writer(tmp_path / "m")
    writer.write("model", _parts(params)["model"])
    writer.abort()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("only", ["layers/1", "layers/1/", lambda p: p.startswith("layers/1/")],
                         ids=["prefix", "prefix/", "predicate"])  # fmt: skip
def test_only_reads_just_the_requested_arrays(tmp_path, params, only):
    path = _uninterrupted(tmp_path / "m", params)
    # Damage the other files: with only=, they are neither read nor hashed.
    _flip_byte(path / "arrays/layers.00000.safetensors")
    _flip_byte(path / "arrays/model.safetensors")
    arrays, _, config = packed.read_packed(path, only=only)
    want = {p: v for p, v in _leaves(params).items() if p.startswith("layers/1/")}
    assert sorted(arrays) == sorted(want) and config == CONFIG
    assert any(isinstance(v, QArray) and isinstance(v.scale, QArray) for v in arrays.values())
    _assert_bit_identical(arrays, want)
    with pytest.raises(ValueError, match="model.safetensors does not match its sha256"):
        packed.read_packed(path, only="norm")


def test_save_packed_leaves_no_partial_after_an_error(tmp_path, params, monkeypatch):
    from jquant.io import _packed_writer

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_packed_writer, "_commit", fail)
    with pytest.raises(OSError):
        packed.save_packed(tmp_path / "m", config=CONFIG, params=params)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    path = packed.save_packed(tmp_path / "m", config=CONFIG, params=params)
    meta = json.loads((path / packed.METADATA).read_text())
    assert meta["layout_version"] == 2
    assert sorted(n for n in meta["files"] if n.startswith("arrays/")) == [
        "arrays/layers.00000.safetensors", "arrays/layers.00001.safetensors",
        "arrays/model.safetensors",
    ]  # fmt: skip
    shutil.rmtree(path)
