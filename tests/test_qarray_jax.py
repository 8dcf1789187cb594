"""QArrays under JAX transforms: jit, vmap, scan, grad, tree_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops
from jquant.qarray import QArray, is_qarray, quantize_array


def _rand(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _close(a, b, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize("qtype,group", [("int4", 32), ("uint4", 32), ("nf4", None)])
def test_jit_of_dequantize_and_qdot(qtype, group):
    w = quantize_array(_rand((64, 8)), qtype, group_size=group)
    x = _rand((3, 64), seed=1)
    np.testing.assert_array_equal(jax.jit(QArray.dequantize)(w), w.dequantize())
    _close(jax.jit(ops.qdot)(x, w), ops.qdot(x, w))


def test_jit_keeps_static_fields_and_retraces_on_them():
    w = quantize_array(_rand((64, 8)), "int8", activation="int8")
    traces = []

    @jax.jit
    def f(w):
        traces.append(w.activation)
        return w.dequantize()

    f(w)
    f(quantize_array(_rand((64, 8), seed=2), "int8", activation="int8"))
    f(quantize_array(_rand((64, 8)), "int8"))
    assert traces == ["int8", None]


def _stacked(qtype="int4", group=32):
    # (L, K, N) stacked layers, contraction axis K = -2.
    return quantize_array(_rand((3, 64, 16)), qtype, axis=-2, group_size=group)


def test_vmap_over_stacked_layers():
    w = _stacked()
    assert w.qvalue.shape[0] == 3 and w.scale.shape == (3, 16, 2)
    x = _rand((3, 2, 64), seed=1)
    y = jax.vmap(ops.qdot)(x, w)
    _close(y, jnp.einsum("lbk,lkn->lbn", x, w.dequantize()))
    # Broadcasting one activation over the stack.
    y1 = jax.vmap(ops.qdot, in_axes=(None, 0))(x[0], w)
    _close(y1, jnp.einsum("bk,lkn->lbn", x[0], w.dequantize()))


def test_scan_over_stacked_layers():
    w = quantize_array(_rand((3, 32, 32)) / 4, "int8", axis=-2, activation="int8")
    x = _rand((2, 32), seed=1)

    def layer(h, wl):
        return jnp.tanh(ops.qdot(h, wl)), None

    y, _ = jax.lax.scan(layer, x, w)
    ref = x
    for i in range(3):
        ref = jnp.tanh(ops.qdot(ref, jax.tree.map(lambda a, i=i: a[i], w)))
    _close(y, ref)


@pytest.mark.parametrize("activation", [None, "int8"])
def test_grad_through_qdot_wrt_x(activation):
    w = quantize_array(_rand((64, 8)), "int4", group_size=32, activation=activation)
    x = _rand((3, 64), seed=1)
    target = _rand((3, 8), seed=2)
    loss = lambda x: jnp.mean((ops.qdot(x, w) - target) ** 2)
    g = jax.jit(jax.grad(loss))(x)
    y = ops.qdot(x, w)
    _close(g, (2 * (y - target) / y.size) @ w.dequantize().T)


def test_tree_map_over_tree_with_qarrays():
    tree = {"a": {"kernel": quantize_array(_rand((64, 8)), "uint4", group_size=32)},
            "b": _rand((8,))}  # fmt: skip
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == 4  # qvalue, scale, zero_point, b
    same = jax.tree.map(lambda a: a, tree)
    assert isinstance(same["a"]["kernel"], QArray)
    assert same["a"]["kernel"].qtype == "uint4" and same["a"]["kernel"].group_size == 32
    dense = jax.tree.map(lambda a: a.dequantize() if is_qarray(a) else a, tree, is_leaf=is_qarray)
    assert dense["a"]["kernel"].shape == (64, 8)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(tree, is_leaf=is_qarray))
    assert nbytes == tree["a"]["kernel"].nbytes + 8 * 4
