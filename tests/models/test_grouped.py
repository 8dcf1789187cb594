"""The XLA grouped matmul of MoE layers (`jquant._grouped`) against NumPy loops over experts.

The reference multiplies each expert's rows by that expert's weight in float64; quantized
stacks are dequantized for it by `tests/kernels/np_quant.py`'s `dequantize_np`, written from
the storage contract, expert by expert. The tile map is checked against a NumPy walk over
the groups.
"""

from __future__ import annotations

import dataclasses
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jquant.kernels.grouped_matmul import num_tiles, tile_map

from jquant import _grouped
from jquant.qarray import quantize_array

dequantize_np = runpy.run_path(
    str(Path(__file__).parents[1] / "kernels" / "np_quant.py"))["dequantize_np"]

E, K, N = 5, 96, 40
SIZES = {
    "mixed": [3, 0, 17, 1, 9],  # 30 of 32 rows: two trailing rows belong to no group
    "one_takes_all": [0, 0, 32, 0, 0],
    "zeros_at_ends": [0, 16, 16, 0, 0],
    "all_empty": [0, 0, 0, 0, 0],
    "singletons": [1, 1, 1, 1, 1],
}
M = 32


def np_grouped(x, w_experts, sizes):
    """Row by group: x[rows of e] @ w_experts[e] in float64; rows past the groups are 0."""
    y = np.zeros((x.shape[0], w_experts.shape[2]))
    start = 0
    for e, g in enumerate(sizes):
        y[start:start + g] = x[start:start + g].astype(np.float64) @ w_experts[e]
        start += g
    return y


def np_dequantized(q):
    """The (E, K, N) float64 weights of a QArray stack, one expert at a time from its codes."""
    zp = q.zero_point
    return np.stack([
        dequantize_np(np.asarray(q.qvalue[e]), np.asarray(q.scales()[e]),
                      None if zp is None else np.asarray(zp[e]), q.qtype, q.k, q.group_size)
        for e in range(q.qvalue.shape[0])
    ]).astype(np.float64)  # fmt: skip


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((E, K, N), dtype=np.float32)
    return x, w


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("tm", (None, 8, 5))
def test_float_stack(sizes, tm):
    x, w = _inputs()
    got = _grouped.grouped_matmul_xla(jnp.asarray(x), jnp.asarray(w),
                                      jnp.asarray(sizes, jnp.int32), tm=tm)
    np.testing.assert_allclose(got, np_grouped(x, w, sizes), rtol=1e-5, atol=1e-4)


# K = 96: int4 g32 is three whole groups, uint4 g64 a whole group and a short one of 32.
@pytest.mark.parametrize("qtype,group_size", [("int8", None), ("int4", 32), ("uint4", 64),
                                              ("nf4", 32), ("int8", 32)])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_quantized_stack(qtype, group_size, sizes):
    x, w = _inputs(1)
    q = quantize_array(jnp.asarray(w), qtype, axis=1, group_size=group_size)
    got = jax.jit(_grouped.grouped_matmul)(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(got, np_grouped(x, np_dequantized(q), sizes), rtol=1e-5,
                               atol=1e-4)


def test_large_groups_span_many_tiles():
    """400 rows over 3 experts with 16-row tiles: groups of 7, 0 and 393 rows (25 tiles)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, K), dtype=np.float32)
    w = rng.standard_normal((3, K, N), dtype=np.float32)
    q = quantize_array(jnp.asarray(w), "uint4", axis=1, group_size=32)
    sizes = [7, 0, 393]
    got = _grouped.grouped_matmul_xla(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32), tm=16)
    np.testing.assert_allclose(got, np_grouped(x, np_dequantized(q), sizes), rtol=1e-5,
                               atol=1e-4)


def test_bfloat16_rows():
    x, w = _inputs(3)
    q = quantize_array(jnp.asarray(w), "int8", axis=1)
    xb = jnp.asarray(x, jnp.bfloat16)
    sizes = SIZES["mixed"]
    got = _grouped.grouped_matmul(xb, q, jnp.asarray(sizes, jnp.int32))
    assert got.dtype == jnp.bfloat16
    want = np_grouped(np.asarray(xb.astype(jnp.float32)), np_dequantized(q), sizes)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=0.3)


def test_double_quantized_and_per_tensor_scales():
    x, w = _inputs(4)
    sizes = SIZES["mixed"]
    for q in (quantize_array(jnp.asarray(w), "int4", axis=1, group_size=32, double_quant=True),
              quantize_array(jnp.asarray(w), "int8", axis=1, per_tensor=True)):
        want = np_grouped(x, np.asarray(q.dequantize(), np.float64), sizes)
        got = _grouped.grouped_matmul(jnp.asarray(x), q, jnp.asarray(sizes, jnp.int32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=repr(q))


def test_act_order_stack():
    """A stack with per-expert ``perm`` (E, K): stored position j of expert e holds logical
    input perm[e, j]; the reference undoes it in NumPy from the codes."""
    x, w = _inputs(7)
    rng = np.random.default_rng(8)
    perms = np.stack([rng.permutation(K) for _ in range(E)]).astype(np.int32)
    stored = np.stack([w[e][perms[e]] for e in range(E)])  # (E, K, N) in stored order
    q = quantize_array(jnp.asarray(stored), "int4", axis=1, group_size=32)
    logical = np.empty((E, K, N))
    for e, wd in enumerate(np_dequantized(q)):
        logical[e][perms[e]] = wd
    qp = dataclasses.replace(q, perm=jnp.asarray(perms))
    sizes = SIZES["mixed"]
    got = _grouped.grouped_matmul(jnp.asarray(x), qp, jnp.asarray(sizes, jnp.int32))
    np.testing.assert_allclose(got, np_grouped(x, logical, sizes), rtol=1e-5, atol=1e-4)


def test_gradient_of_rows():
    """d/dx sum(y * c) = c @ w[e].T row by row, through the scan and its skipped tiles."""
    x, w = _inputs(5)
    sizes = SIZES["mixed"]
    c = np.random.default_rng(6).standard_normal((M, N), dtype=np.float32)

    def loss(xx):
        y = _grouped.grouped_matmul_xla(xx, jnp.asarray(w), jnp.asarray(sizes, jnp.int32))
        return jnp.sum(y * c)

    want = np.zeros((M, K))
    start = 0
    for e, g in enumerate(sizes):
        want[start:start + g] = c[start:start + g].astype(np.float64) @ w[e].T
        start += g
    np.testing.assert_allclose(jax.grad(loss)(jnp.asarray(x)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", range(12))
def test_tile_map_covers_every_row_once(seed):
    """Random splits (zeros included) against a NumPy walk: the real tiles, in order, are
    each group cut into tm-row pieces; every row sits in its tile at its offset."""
    rng = np.random.default_rng(seed)
    experts, m, tm = int(rng.integers(1, 9)), int(rng.integers(1, 60)), int(rng.integers(1, 9))
    cuts = np.sort(rng.integers(0, m + 1, experts - 1))
    used = int(rng.integers(0, m + 1))
    sizes = np.diff(np.concatenate([[0], np.minimum(cuts, used), [used]])).astype(np.int32)
    t = jax.tree.map(np.asarray, tile_map(jnp.asarray(sizes), m, tm))
    want = []  # (expert, start, count) of each real tile
    start = 0
    for e, g in enumerate(sizes):
        for off in range(0, g, tm):
            want.append((e, start + off, min(tm, g - off)))
        start += g
    assert len(t.valid) == num_tiles(m, experts, tm) >= len(want)
    assert t.valid.sum() == len(want) and t.valid[:len(want)].all()
    got = list(zip(t.expert[:len(want)], t.start[:len(want)], t.count[:len(want)]))
    assert [tuple(map(int, g)) for g in got] == want
    assert (t.count[len(want):] == 0).all()
    for r in range(m):
        assert t.row_valid[r] == (r < used)
        if r < used:
            tile, off = divmod(int(t.row_slot[r]), tm)
            assert want[tile][1] + off == r and off < want[tile][2]


@pytest.mark.parametrize("x_shape,w_shape,sizes_shape,match", [
    ((4, 8, 2), (3, 8, 5), (3,), "x must be"),
    ((4, 8), (8, 5), (3,), "w must be a stack"),
    ((4, 7), (3, 8, 5), (3,), "K=7"),
    ((4, 8), (3, 8, 5), (2,), "group_sizes must be"),
])
def test_bad_shapes_are_named(x_shape, w_shape, sizes_shape, match):
    with pytest.raises(ValueError, match=match):
        _grouped.grouped_matmul(jnp.zeros(x_shape), jnp.zeros(w_shape),
                                jnp.zeros(sizes_shape, jnp.int32))
