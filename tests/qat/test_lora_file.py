"""`lora.save` / `lora.load`: a round trip keeps every bit and the metadata; a truncated,
corrupt or foreign file is one ValueError naming it; a failed save leaves nothing behind."""

import json
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jquant import models
from jquant.qat import lora

TARGETS = [r"attn/(q|v)_proj/kernel$", r"mlp/down_proj/kernel$"]


@pytest.fixture(scope="module")
def adapters():
    config = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                num_layers=2, num_heads=2, num_kv_heads=1)  # fmt: skip
    params = nnx.state(models.init_model(config, seed=0), nnx.Param)
    ad = lora.init(params, TARGETS, rank=4, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    for v in ad.values():
        v["b"] = jnp.asarray(rng.normal(size=v["b"].shape), jnp.float32)
    return ad


def test_round_trip_keeps_every_bit_and_the_metadata(adapters, tmp_path):
    path = lora.save(tmp_path / "x.safetensors", adapters, alpha=8, targets=TARGETS,
                     base_model="tiny")  # fmt: skip
    got = lora.load(path)
    assert got.alpha == 8.0 and got.targets == tuple(TARGETS) and got.base_model == "tiny"
    assert sorted(got.adapters) == sorted(adapters) and len(adapters) == 6
    for p, ad in adapters.items():
        for key in ("a", "b"):
            want = np.asarray(ad[key])
            assert got.adapters[p][key].dtype == want.dtype
            np.testing.assert_array_equal(got.adapters[p][key], want)
    # bfloat16 adapters and no alpha
    half = {p: {k: np.asarray(v, ml_dtypes.bfloat16) for k, v in ad.items()}
            for p, ad in adapters.items()}  # fmt: skip
    back = lora.load(lora.save(tmp_path / "h.safetensors", half))
    assert back.alpha is None and back.targets == () and back.base_model == ""
    p = next(iter(half))
    assert back.adapters[p]["a"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.adapters[p]["a"].view(np.uint16),
                                  half[p]["a"].view(np.uint16))  # fmt: skip


def _rewrite(path, fix):
    """The file at ``path`` with its header JSON passed through ``fix``, data kept."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = fix(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def test_a_bad_file_is_one_error_naming_it(adapters, tmp_path):
    good = lora.save(tmp_path / "good.safetensors", adapters, alpha=8)
    raw = good.read_bytes()

    def case(name, data=None, fix=None):
        path = tmp_path / name
        path.write_bytes(raw if data is None else data)
        if fix is not None:
            _rewrite(path, fix)
        with pytest.raises(ValueError, match=f"lora.load: {path}") as e:
            lora.load(path)
        return str(e.value)

    assert "is truncated" in case("cut.safetensors", raw[:-10])
    assert "not a readable safetensors file" in case("short.safetensors", raw[:5])
    assert "not a readable safetensors file" in case("junk.safetensors", b"\xff" * 64)
    assert "is not a jquant LoRA file" in case(
        "plain.safetensors", fix=lambda h: {k: v for k, v in h.items() if k != "__metadata__"})

    def meta(**kw):
        return lambda h: {**h, "__metadata__": {**h["__metadata__"], **kw}}

    assert "has version '9'" in case("v9.safetensors", fix=meta(version="9"))
    assert "rank 4, the metadata says 3" in case("rank.safetensors", fix=meta(rank="3"))
    assert "corrupt metadata" in case("alpha.safetensors", fix=meta(alpha="{"))
    first = next(iter(sorted(adapters)))
    assert f"adapter '{first}' has only ['a']" in case(
        "half.safetensors", fix=lambda h: {k: v for k, v in h.items() if k != f"{first}/b"})

    def grow(h):  # a shape that disagrees with the bytes stored
        h[f"{first}/a"]["shape"][0] += 1
        return h

    assert "is corrupt: tensor" in case("shape.safetensors", fix=grow)
    with pytest.raises(ValueError, match="is not a file"):
        lora.load(tmp_path / "missing.safetensors")


def test_save_refuses_bad_adapters_and_leaves_nothing(adapters, tmp_path):
    path = tmp_path / "x.safetensors"
    p, q = sorted(adapters)[:2]
    mixed = {p: adapters[p], q: {"a": adapters[q]["a"][:, :2], "b": adapters[q]["b"][:2]}}
    with pytest.raises(ValueError, match=r"one rank; got ranks \[2, 4\]"):
        lora.save(path, mixed)
    with pytest.raises(ValueError, match="needs keys a and b"):
        lora.save(path, {p: {"a": adapters[p]["a"]}})
    with pytest.raises(ValueError, match="floating point"):
        lora.save(path, {p: {"a": np.ones((32, 4), np.int8), "b": np.ones((4, 32), np.int8)}})
    with pytest.raises(ValueError, match="alpha=nan"):
        lora.save(path, adapters, alpha=float("nan"))
    # A dtype safetensors has no code for fails while writing: no file, no temporary left.
    odd = {p: {k: np.asarray(v, ml_dtypes.float8_e4m3fnuz) for k, v in adapters[p].items()}}
    with pytest.raises(ValueError, match="which safetensors lacks"):
        lora.save(path, odd)
    assert list(tmp_path.iterdir()) == []
