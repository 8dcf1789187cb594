"""Stock Flax layers (Linen and NNX) on quantized params give the dequantized model's outputs."""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import intercept, ops
from jquant.qarray import QArray, is_qarray, quantize_array

FORMATS = [("int8", None), ("int4", 32), ("uint4", 32), ("nf4", 32), ("fp8_e4m3", None)]
# Contraction axis of each layer's parameter (see jquant.intercept's table).
AXES = {"embed": -1, "dense": 0, "general": 0, "einsum": 1}
IDS = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) * 7 % 50


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def _dequantized(tree):
    return jax.tree.map(lambda a: a.dequantize() if is_qarray(a) else a, tree, is_leaf=is_qarray)


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(50, 64, name="embed")
        h = nn.Dense(96, name="dense")(embed(ids))
        h = nn.DenseGeneral((4, 16), name="general")(h)
        h = nn.Einsum((4, 16, 64), "bthd,hdf->btf", name="einsum")(h)
        return embed.attend(h)


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 64, rngs=rngs)
        self.dense = nnx.Linear(64, 96, rngs=rngs)
        self.general = nnx.LinearGeneral(96, (4, 16), rngs=rngs)
        self.einsum = nnx.Einsum("bthd,hdf->btf", (4, 16, 64), (64,), rngs=rngs)

    def __call__(self, ids):
        h = self.general(self.dense(self.embed(ids)))
        return self.embed.attend(self.einsum(h))


def _quantize_linen(variables, qtype, group, only=None):
    params = {
        layer: {
            name: quantize_array(v, qtype, axis=AXES[layer], group_size=group)
            if name in ("kernel", "embedding") and (only is None or layer in only) else v
            for name, v in leaves.items()
        }
        for layer, leaves in variables["params"].items()
    }  # fmt: skip
    return {"params": params}


def _quantize_nnx(state, qtype, group):
    # nnx.State leaves are Variables (Param) holding arrays; a QArray is a valid value.
    def one(path, var):
        layer, name = path[0].key, path[-1].key
        if name not in ("kernel", "embedding"):
            return var
        return var.replace(
            quantize_array(var.get_value(), qtype, axis=AXES[layer], group_size=group)
        )

    return jax.tree_util.tree_map_with_path(
        one, state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )


@pytest.fixture(scope="module")
def linen_vars():
    return jax.jit(LinenModel().init)(jax.random.key(0), IDS)


@pytest.mark.parametrize("qtype,group", FORMATS)
def test_linen_model_on_quantized_params(linen_vars, qtype, group):
    model = LinenModel()
    qvars = _quantize_linen(linen_vars, qtype, group)
    y = jax.jit(lambda v, ids: intercept.apply(model, v, ids))(qvars, IDS)
    ref = jax.jit(model.apply)(_dequantized(qvars), IDS)
    assert y.shape == (2, 6, 50) and y.dtype == jnp.float32
    _close(y, ref)


def test_linen_float_params_take_flax_path(linen_vars, monkeypatch):
    calls = []
    real = ops.qdot_general
    monkeypatch.setattr(ops, "qdot_general", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = LinenModel()
    np.testing.assert_array_equal(
        intercept.apply(model, linen_vars, IDS), model.apply(linen_vars, IDS)
    )
    assert calls == []
    mixed = _quantize_linen(linen_vars, "int8", None, only=("dense",))
    _close(intercept.apply(model, mixed, IDS), model.apply(_dequantized(mixed), IDS))
    assert len(calls) == 1


def test_linen_dense_general_with_batch_and_two_input_axes():
    layer = nn.DenseGeneral(features=5, axis=(-2, -1), batch_dims=(0,))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 4, 32)), jnp.float32)
    variables = layer.init(jax.random.key(1), x)
    kernel = variables["params"]["kernel"]  # (3, 4, 32, 5): batch, in, in, out
    q = quantize_array(kernel, "int4", axis=2, group_size=16)
    qvars = {"params": {**variables["params"], "kernel": q}}
    _close(intercept.apply(layer, qvars, x), layer.apply(_dequantized(qvars), x))


def test_linen_dtype_promotion_follows_flax():
    layer = nn.Dense(8, dtype=jnp.bfloat16)
    x = jnp.ones((2, 64), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    qvars = {
        "params": {
            **variables["params"],
            "kernel": quantize_array(variables["params"]["kernel"], "int8"),
        }
    }
    y = intercept.apply(layer, qvars, x)
    ref = layer.apply(_dequantized(qvars), x)
    assert y.dtype == ref.dtype == jnp.bfloat16
    _close(y.astype(jnp.float32), ref.astype(jnp.float32), rtol=2e-2)


def test_linen_wrong_axis_is_a_clear_error(linen_vars):
    params = dict(linen_vars["params"])
    params["dense"] = {
        **params["dense"],
        "kernel": quantize_array(params["dense"]["kernel"], "int8", axis=1),
    }
    with pytest.raises(ValueError, match=r"nn.Dense.*\(64, 96\).*axis"):
        intercept.apply(LinenModel(), {"params": params}, IDS)


@pytest.fixture(scope="module")
def nnx_split():
    return nnx.split(NNXModel(nnx.Rngs(0)))


@pytest.mark.parametrize("qtype,group", FORMATS)
def test_nnx_model_on_quantized_state(nnx_split, qtype, group):
    graphdef, state = nnx_split
    qstate = _quantize_nnx(state, qtype, group)
    qmodel = nnx.merge(graphdef, qstate)
    assert isinstance(qmodel.dense.kernel.get_value(), QArray)
    ref = nnx.merge(graphdef, _dequantized(qstate))(IDS)
    y = nnx.jit(lambda m, ids: intercept.nnx_apply(m, ids))(qmodel, IDS)
    _close(y, ref)


def test_nnx_split_merge_and_jax_jit(nnx_split):
    graphdef, state = nnx_split
    qstate = _quantize_nnx(state, "int4", 32)
    _, again = nnx.split(nnx.merge(graphdef, qstate))
    assert jax.tree.structure(again) == jax.tree.structure(qstate)

    @jax.jit
    def run(state, ids):
        with intercept.nnx_quantized():
            return nnx.merge(graphdef, state)(ids)

    _close(run(qstate, IDS), nnx.merge(graphdef, _dequantized(qstate))(IDS))


def test_nnx_patch_is_restored_even_on_error(nnx_split):
    originals = (nnx.Linear.__call__, nnx.Embed.attend)
    with pytest.raises(RuntimeError):
        with intercept.nnx_quantized():
            with intercept.nnx_quantized():
                assert nnx.Linear.__call__ is not originals[0]
            assert nnx.Linear.__call__ is not originals[0]  # the outer context still holds
            raise RuntimeError
    assert (nnx.Linear.__call__, nnx.Embed.attend) == originals
    # Float models run Flax's own code inside the context too.
    graphdef, state = nnx_split
    model = nnx.merge(graphdef, state)
    ref = model(IDS)
    with intercept.nnx_quantized():
        np.testing.assert_array_equal(model(IDS), ref)


def test_linen_embed_built_in_setup_exposes_the_qarray():
    seen = []

    class Tied(nn.Module):
        def setup(self):
            self.embed = nn.Embed(10, 32)

        def __call__(self, ids):
            h = self.embed(ids)
            seen.append(type(self.embed.embedding))
            return self.embed.attend(h)

    ids = jnp.array([[1, 2, 9]])
    variables = Tied().init(jax.random.key(0), ids)
    table = quantize_array(
        variables["params"]["embed"]["embedding"], "int4", axis=-1, group_size=32
    )
    qvars = {"params": {"embed": {"embedding": table}}}
    _close(intercept.apply(Tied(), qvars, ids), Tied().apply(_dequantized(qvars), ids))
    assert seen[-2] is QArray


def _in_other_thread(fn):
    """``fn()``'s result, or the exception it raised, in a new thread."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out


def test_nnx_context_is_not_seen_by_other_threads():
    layer = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    float_kernel = layer.kernel.get_value()
    qlayer = nnx.Linear(64, 8, rngs=nnx.Rngs(0))
    qlayer.kernel.set_value(quantize_array(float_kernel, "int8", axis=0))
    x = jnp.ones((2, 64))
    with intercept.nnx_quantized():
        _close(qlayer(x), x @ qlayer.kernel.get_value().dequantize() + layer.bias.get_value())
        # Another thread meanwhile runs Flax's own Linear: a float one as usual, and a
        # QArray kernel is not understood there (only this context quantizes).
        plain = _in_other_thread(lambda: layer(x))
        quantized = _in_other_thread(lambda: qlayer(x))
    np.testing.assert_array_equal(plain["value"], layer(x))
    assert "value" not in quantized and "error" in quantized
    # A thread that opens its own context sees the quantized behaviour.
    own = _in_other_thread(lambda: intercept.nnx_apply(qlayer, x))
    _close(own["value"], x @ qlayer.kernel.get_value().dequantize() + layer.bias.get_value())


def test_linen_context_is_not_seen_by_other_threads():
    model = nn.Dense(8)
    variables = model.init(jax.random.key(0), jnp.ones((1, 64)))
    kernel = quantize_array(variables["params"]["kernel"], "int8", axis=0)
    qvariables = {"params": {**variables["params"], "kernel": kernel}}
    x = jnp.ones((2, 64))
    with intercept.linen_quantized():
        assert model.apply(qvariables, x).shape == (2, 8)
        other = _in_other_thread(lambda: model.apply(qvariables, x))
    assert "error" in other
