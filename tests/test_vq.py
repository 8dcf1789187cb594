"""The vector formats (vq2, vq3, `jquant.vq`): storage decoded by NumPy from the documented
layout, nearest-centroid assignment against a brute-force argmin, the byte count by hand,
matmuls through `jquant.ops`, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import ops, qtypes, vq
from jquant.algorithms import gptvq
from jquant.calib.stats import from_inputs
from jquant.recipe import Rule


def np_unpack(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Indices ``(N, length)`` of per-channel packed ``bits``-bit codes, read from the layout
    in jquant.qarray's docstring: power-of-two planes, low bits first; in a ``w``-bit plane of
    ``B`` bytes, byte ``j`` holds element ``j + i·B`` in bits ``[i·w, (i+1)·w)``."""
    packed = packed.astype(np.int64)
    out = np.zeros((packed.shape[0], length), np.int64)
    offset = shift = 0
    for width in (4, 2, 1):
        if not bits & width:
            continue
        nbytes = length * width // 8
        plane = packed[:, offset : offset + nbytes]
        for i in range(8 // width):
            codes = (plane >> (i * width)) & (2**width - 1)
            out[:, i * nbytes : (i + 1) * nbytes] |= codes << shift
        offset += nbytes
        shift += width
    assert offset == packed.shape[1]
    return out


def np_dequantize(q: vq.VQArray) -> np.ndarray:
    """The kernel ``(K, N)`` by the identity of jquant.vq's docstring, element by element."""
    books = np.asarray(q.codebook).astype(np.float32)
    scale = np.asarray(q.codebook_scale.astype(jnp.float32))
    t_k, t_n, e, d = books.shape
    k, n = q.shape
    idx = np_unpack(np.asarray(q.qvalue), int(np.log2(e)), k // d)
    out = np.zeros((k, n), np.float32)
    for col in range(n):
        for j in range(k // d):
            tk, tn = (j * d) // (k // t_k), col // (n // t_n)
            out[j * d : j * d + d, col] = books[tk, tn, idx[col, j]] * scale[tk, tn]
    return out


def _calibration(k, seed=0, tokens=512):
    """Inputs with correlated channels of unequal size, as a layer's are."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, k)).astype(np.float32)
    mix = np.eye(k, dtype=np.float32) + 0.3 * rng.standard_normal((k, k)).astype(np.float32)
    x = z @ mix * rng.uniform(0.2, 3.0, k).astype(np.float32)
    return from_inputs(jnp.asarray(x))


def _encode(qtype, shape, seed=1):
    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    rule = Rule(pattern="w", weight=qtype, algorithm="gptvq").resolve("w", 2)
    q, info = gptvq.gptvq(w, rule, path="w", calibration=_calibration(shape[0]))
    assert bool(info["factored"])
    return w, q


# (format, kernel shape): several codebook tiles both ways, 4- and 6-bit indices.
CASES = [("vq2", (128, 96)), ("vq3", (192, 128))]


@pytest.mark.parametrize("qtype, shape", CASES)
def test_dequantize_is_the_documented_gather(qtype, shape):
    w, q = _encode(qtype, shape)
    assert isinstance(q, vq.VQArray) and q.shape == shape
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), np_dequantize(q))
    # and the encoder's result is a fair approximation, not a constant
    rel = np.linalg.norm(np.asarray(q.dequantize(jnp.float32)) - np.asarray(w)) / np.linalg.norm(w)
    assert rel < {"vq2": 0.6, "vq3": 0.35}[qtype], rel


@pytest.mark.parametrize("tile", [(8, 4), (4, 12)])
def test_assign_is_the_brute_force_argmin(tile):
    rng = np.random.default_rng(0)
    k, n, e, d = 16, 24, 16, 2
    w = rng.standard_normal((k, n)).astype(np.float32)
    books = rng.standard_normal((k // tile[0], n // tile[1], e, d)).astype(np.float32)
    want = np.zeros((n, k // d), np.int64)
    for col in range(n):
        for j in range(k // d):
            book = books[(j * d) // tile[0], col // tile[1]]
            want[col, j] = np.argmin(((w[j * d : j * d + d, col] - book) ** 2).sum(axis=1))
    np.testing.assert_array_equal(np.asarray(vq.assign(jnp.asarray(w), jnp.asarray(books))), want)


@pytest.mark.parametrize("qtype, shape, nbytes", [
    # vq2 (64 x 32 tiles): 64 columns x 64 indices x 4 bits, 2 x 2 codebooks of 16 x 2 int8,
    # 4 bf16 scales.
    ("vq2", (128, 64), 64 * 64 * 4 // 8 + 4 * 16 * 2 + 4 * 2),
    # vq3 (64 x 64 tiles): 128 columns x 64 indices x 6 bits, 2 x 2 codebooks of 64 x 2 int8,
    # 4 bf16 scales.
    ("vq3", (128, 128), 128 * 64 * 6 // 8 + 4 * 64 * 2 + 4 * 2),
])  # fmt: skip
def test_bytes_are_counted_by_hand(qtype, shape, nbytes):
    _, q = _encode(qtype, shape)
    assert q.nbytes == nbytes
    assert q.bits_per_weight == pytest.approx(8 * nbytes / (shape[0] * shape[1]))
    tile = qtypes.get(qtype).vector_tile
    bits = qtypes.get(qtype).bits
    entries = 2 ** (2 * bits)
    assert q.bits_per_weight == pytest.approx(bits + (8 * entries * 2 + 16) / (tile[0] * tile[1]))


def test_qdot_and_qeinsum_multiply_by_the_dequantized_kernel():
    _, q = _encode("vq2", (128, 64))
    x = jax.random.normal(jax.random.key(2), (3, 5, 128), jnp.float32)
    want = np.asarray(x, np.float64) @ np_dequantize(q).astype(np.float64)
    np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), want, rtol=1e-4, atol=1e-4)
    got = ops.qeinsum("btk,kn->btn", x, q)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert ops.qdot(x.astype(jnp.bfloat16), q).dtype == jnp.bfloat16


def test_vqarray_passes_through_jit():
    _, q = _encode("vq3", (128, 64))
    out = jax.jit(lambda q: q.dequantize(jnp.float32))(q)
    np.testing.assert_array_equal(np.asarray(out), np_dequantize(q))


@pytest.mark.parametrize("shape, match", [
    ((129, 64), "K=129 is not a multiple of vq2's vector length 2"),
    ((130, 64), r"not a whole number of vq2's codebook tiles \(64, 32\)"),
    ((128, 48), r"not a whole number of vq2's codebook tiles"),
    ((128, 64, 2), "2-D Dense kernels"),
])  # fmt: skip
def test_bad_shapes_raise_one_clear_error(shape, match):
    with pytest.raises(ValueError, match=match):
        vq.check_kernel("vq2", shape, name="layer/kernel")


def test_bad_formats_raise_one_clear_error():
    with pytest.raises(ValueError, match="unknown qtype 'vq5'"):
        Rule(pattern="w", weight="vq5", algorithm="gptvq")
    with pytest.raises(ValueError, match="int4 is not a vector format"):
        vq.check_kernel("int4", (128, 64))
    with pytest.raises(ValueError, match="made by algorithm: gptvq"):
        Rule(pattern="w", weight="vq2")  # rtn cannot make vector codes
    with pytest.raises(ValueError, match="made by algorithm: gptvq"):
        Rule(pattern="w", weight="int4", algorithm="gptvq")
    with pytest.raises(ValueError, match="drop group_size"):
        Rule(pattern="w", weight="vq3", algorithm="gptvq", group_size=64)
    with pytest.raises(ValueError, match="kmeans_iters=0"):
        Rule(pattern="w", weight="vq3", algorithm="gptvq", algorithm_args={"kmeans_iters": 0})
    with pytest.raises(ValueError, match="vq codes index vectors|vq2 codes index vectors"):
        qtypes.encode("vq2", jnp.ones(4))
