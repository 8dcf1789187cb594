"""Act-order QArrays (``perm``): g_idx <-> perm, dequantization and every matmul path against
NumPy's float64 ``x @ w`` with ``w[k] = (q[k] − z[g_idx[k]])·s[g_idx[k]]`` (input order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jquant import _perm, ops
from jquant.qarray import QArray, from_codes
from jquant.sharding import shard_params, storage_partition_spec


def _act_order(rng, k, group_size):
    """A random g_idx of ``k`` inputs in groups of ``group_size`` (the last short)."""
    return rng.permutation(np.arange(k) // group_size).astype(np.int32)


def _case(qtype="uint4", k=200, n=24, group_size=32, seed=0):
    """``(QArray with perm, w (k, n) float64 in input order)``: random codes, scales and
    zero points drawn in input order with a random g_idx; w by the g_idx formula."""
    rng = np.random.default_rng(seed)
    bits = int(qtype.lstrip("uint"))
    groups = -(-k // group_size)
    g_idx = _act_order(rng, k, group_size)
    scale = rng.uniform(0.01, 0.1, (n, groups)).astype(np.float32)
    if qtype.startswith("u"):
        codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
        zero = rng.integers(0, 1 << bits, (n, groups)).astype(np.float32)
    else:
        codes = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, k)).astype(np.int8)
        zero = np.zeros((n, groups), np.float32)
    w = (codes - zero[:, g_idx].astype(np.float64)) * scale[:, g_idx]
    perm = _perm.from_g_idx(g_idx, k, group_size, "w")
    q = from_codes(codes[:, perm], scale, zero if qtype.startswith("u") else None, qtype=qtype,
                   group_size=group_size, perm=perm)  # fmt: skip
    return q, w.T


# ---- g_idx <-> perm ----------------------------------------------------------------------


def test_g_idx_to_perm_and_back():
    rng = np.random.default_rng(1)
    g_idx = _act_order(rng, 200, 32)  # 7 groups, the last of 8 inputs
    perm = _perm.from_g_idx(g_idx, 200, 32, "w")
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(g_idx[perm], np.arange(200) // 32)  # sorted by group
    for group in range(7):  # stable: inputs of one group keep their order
        assert np.all(np.diff(perm[g_idx[perm] == group]) > 0)
    np.testing.assert_array_equal(_perm.to_g_idx(perm, 200, 32), g_idx)
    # In group order already (or one group): no perm, no runtime cost.
    assert _perm.from_g_idx(np.arange(200) // 32, 200, 32, "w") is None
    assert _perm.from_g_idx(np.zeros(200, np.int64), 200, None, "w") is None
    np.testing.assert_array_equal(_perm.to_g_idx(None, 200, 32), np.arange(200) // 32)


@pytest.mark.parametrize(
    "g_idx,message",
    [
        (np.arange(63) // 32, r"m\.g_idx has shape \(63,\) \(int64\), expected 64 integer"),
        (np.arange(64) / 32, r"m\.g_idx has shape \(64,\) \(float64\), expected 64 integer"),
        (np.r_[np.arange(63) // 32, 2], r"m\.g_idx holds group indices in \[0, 2\], outside "
                                        r"\[0, 1\]"),
        (np.r_[np.arange(63) // 32, -1], r"group indices in \[-1, 1\]"),
        (np.r_[1, np.arange(1, 64) // 32], r"m\.g_idx: group 0 holds 31 inputs, expected 32"),
    ],
)  # fmt: skip
def test_bad_g_idx_is_named(g_idx, message):
    with pytest.raises(ValueError, match=message):
        _perm.from_g_idx(g_idx, 64, 32, "m.g_idx")


def test_a_perm_that_is_not_one_is_refused():
    codes, scale = np.zeros((4, 64), np.int8), np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"perm is not a permutation of 0\.\.63"):
        from_codes(codes, scale, qtype="int4", group_size=32, perm=np.zeros(64, np.int32))
    with pytest.raises(ValueError, match=r"perm must be an integer array of shape \(64,\).*"
                       r"got int32 \(63,\)"):  # fmt: skip
        from_codes(codes, scale, qtype="int4", group_size=32, perm=np.arange(63, dtype=np.int32))
    q = from_codes(codes, scale, qtype="int4", group_size=32)
    with pytest.raises(ValueError, match=r"perm must be an integer array.*got float32"):
        QArray(qvalue=q.qvalue, scale=q.scale, zero_point=None, qtype="int4", k=64,
               group_size=32, perm=jnp.zeros(64, jnp.float32))  # fmt: skip


# ---- values and matmuls ------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["uint4", "int4", "uint3", "uint8", "int8"])
def test_dequantize_is_the_g_idx_formula_in_input_order(qtype):
    q, w = _case(qtype)
    assert q.perm is not None and "act-order perm" in repr(q)
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), w.astype(np.float32))


# The kernel path runs only where a kernel takes the format (kernels.QTYPES); on CPU,
# "kernel" runs the TPU kernel in Pallas interpret mode or raises.
@pytest.mark.parametrize(
    "qtype,path",
    [("uint4", "xla"), ("uint4", "kernel"), ("int4", "xla"), ("int4", "kernel"),
     ("uint3", "xla"), ("int8", "xla"), ("int8", "kernel")],
)  # fmt: skip
def test_qdot_equals_x_at_w_on_each_path(qtype, path):
    k = 256 if path == "kernel" else 200  # the kernel tiles whole groups of 128-lane blocks
    q, w = _case(qtype, k=k, n=256 if path == "kernel" else 24, group_size=128 if path ==
                 "kernel" else 32)  # fmt: skip
    x = np.random.default_rng(5).standard_normal((2, 3, k)).astype(np.float32)
    old = ops.set_matmul_path(path)
    try:
        y = ops.qdot(jnp.asarray(x), q)
        y_jit = jax.jit(ops.qdot)(jnp.asarray(x), q)
    finally:
        ops.set_matmul_path(old)
    want = x.astype(np.float64) @ w
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(y_jit), np.asarray(y))


def _batched(q):
    """``q`` with a leading batch axis of 1 (storage ``(1, N, K)``)."""
    return QArray(qvalue=q.qvalue[None], scale=q.scale[None], zero_point=q.zero_point[None],
                  qtype=q.qtype, k=q.k, axis=-2, group_size=q.group_size, perm=q.perm)


def test_qeinsum_qattend_and_qembed_with_a_perm():
    q, w = _case("uint4", k=64, n=8)
    x = np.random.default_rng(6).standard_normal((2, 3, 64)).astype(np.float32)
    x64 = x.astype(np.float64)
    # Several contracted axes: the general XLA path.
    w3 = QArray(qvalue=q.qvalue.reshape(2, 4, -1), scale=q.scale.reshape(2, 4, -1),
                zero_point=q.zero_point.reshape(2, 4, -1), qtype=q.qtype, k=64, axis=-3,
                group_size=32, perm=q.perm)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ops.qeinsum("btd,dhf->bthf", jnp.asarray(x), w3)),
                               np.einsum("btd,hfd->bthf", x64, w.T.reshape(2, 4, 64)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    y = ops.qeinsum("btd,bdf->btf", jnp.asarray(x[:1]), _batched(q))  # a batch axis
    np.testing.assert_allclose(np.asarray(y), x64[:1] @ w[None], rtol=1e-5, atol=1e-5)
    # A table quantized along its features (axis=-1) with a perm over them.
    table = QArray(qvalue=q.qvalue, scale=q.scale, zero_point=q.zero_point, qtype=q.qtype,
                   k=64, axis=-1, group_size=32, perm=q.perm)  # (V=8, D=64)
    rows = np.asarray(ops.qembed(jnp.array([[3, 0, 3]]), table))
    np.testing.assert_array_equal(rows, w.T[[[3, 0, 3]]].astype(np.float32))
    np.testing.assert_allclose(np.asarray(ops.qattend(jnp.asarray(x), table)), x64 @ w,
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_perm_is_a_leaf_and_sharding_replicates_it():
    q, w = _case("uint4", k=64, n=8)
    leaves, treedef = jax.tree.flatten(q)
    assert any(leaf is q.perm for leaf in leaves)
    back = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(back.perm, q.perm)
    assert q.nbytes == q.qvalue.nbytes + q.scale.nbytes + q.zero_point.nbytes + 64 * 4
    spec = storage_partition_spec(q, P(None, "model"))
    assert spec.perm == P(None) and spec.qvalue == P("model", None)
    mesh = jax.make_mesh((1,), ("model",))
    sharded = shard_params({"k": q}, {"k": P(None, "model")}, mesh)["k"]
    np.testing.assert_array_equal(np.asarray(sharded.dequantize(jnp.float32)),
                                  w.astype(np.float32))  # fmt: skip


def test_stacked_layers_keep_a_perm_per_layer():
    """Layers stacked for ``lax.scan`` (`jquant.models.core.stack_layers`) stack the perms;
    each scan step's weight is one layer's, with its own perm."""
    from jquant.models.core import stack_layers

    (q1, w1), (q2, w2) = _case("uint4", k=64, n=8, seed=1), _case("uint4", k=64, n=8, seed=2)
    stacked = stack_layers([{"k": q1}, {"k": q2}])["k"]
    assert isinstance(stacked, QArray) and stacked.perm.shape == (2, 64)
    np.testing.assert_array_equal(np.asarray(stacked.dequantize(jnp.float32)),
                                  np.stack([w1, w2]).astype(np.float32))  # fmt: skip
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    _, ys = jax.lax.scan(lambda c, q: (c, ops.qdot(jnp.asarray(x), q)), 0, stacked)
    want = np.stack([x.astype(np.float64) @ w for w in (w1, w2)])
    np.testing.assert_allclose(np.asarray(ys), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"stacked QArray's perm of shape \(2, 64\)"):
        ops.qeinsum("bk,lkn->lbn", jnp.asarray(x), stacked)
    bad = np.stack([np.asarray(q1.perm), np.zeros(64, np.int32)])
    with pytest.raises(ValueError, match=r"perm is not a permutation of 0\.\.63"):
        QArray(qvalue=stacked.qvalue, scale=stacked.scale, zero_point=stacked.zero_point,
               qtype="uint4", k=64, group_size=32, perm=bad)  # fmt: skip
