"""GPTVQ (`jquant.algorithms.gptvq`): the sweep against a slow NumPy OBS reference (the
inverse Hessian of the rows left, inverted afresh at every step, in float64), plain
nearest-centroid assignment when H = I, a lower output error than assignment without
feedback, the k-means against NumPy's, and the format end to end on a tiny Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import tree, vq
from jquant.algorithms import gptvq
from jquant.calib import quantize_model
from jquant.calib.stats import from_inputs
from jquant.io.packed import save_packed
from jquant.models import LlamaConfig, blocks, init_model
from jquant.recipe import Recipe, Rule

DAMP = 0.01


def np_gptvq(w, h, books, damp=DAMP):
    """Indices ``(N, K/d)`` by the optimal-brain-surgeon form of GPTVQ: for the rows ``S`` of
    the next vector, ``Hinv`` = the inverse of ``H`` over the rows not yet quantized, each
    column's vector takes the entry minimising ``Δᵀ Hinv_SS⁻¹ Δ`` and the rows left move by
    ``-Hinv_·S Hinv_SS⁻¹ Δ``."""
    k, n = w.shape
    t_k, t_n, _, d = books.shape
    h = np.asarray(h, np.float64).copy()
    diag = np.diagonal(h).copy()
    diag[diag == 0] = 1.0
    h[np.arange(k), np.arange(k)] = diag + damp * diag.mean()
    w = np.asarray(w, np.float64).copy()
    books = np.asarray(books, np.float64)
    idx = np.zeros((n, k // d), np.int64)
    for j in range(k // d):
        r = j * d
        hinv = np.linalg.inv(h[r:, r:])
        m = np.linalg.inv(hinv[:d, :d])
        for col in range(n):
            book = books[r // (k // t_k), col // (n // t_n)]
            diff = w[r : r + d, col] - book
            e = int(np.argmin(np.einsum("ei,ij,ej->e", diff, m, diff)))
            idx[col, j] = e
            w[r:, col] -= hinv[:, :d] @ m @ (w[r : r + d, col] - book[e])
    return idx


def np_output_error(w, what, h):
    dw = np.asarray(w, np.float64) - np.asarray(what, np.float64)
    return float(np.trace(dw.T @ np.asarray(h, np.float64) @ dw))


def _inputs(k, tokens=512, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, k)).astype(np.float32)
    mix = np.eye(k, dtype=np.float32) + 0.3 * rng.standard_normal((k, k)).astype(np.float32)
    return jnp.asarray(z @ mix * rng.uniform(0.2, 3.0, k).astype(np.float32))


def _run(qtype, w, calibration, **args):
    rule = Rule(pattern="w", weight=qtype, algorithm="gptvq", algorithm_args=args)
    q, info = gptvq.gptvq(w, rule.resolve("w", 2), path="w", calibration=calibration)
    return q, info


@pytest.mark.parametrize("qtype, shape, block", [
    ("vq2", (128, 64), 128), ("vq2", (128, 64), 64), ("vq3", (128, 64), 128),
])  # fmt: skip
def test_sweep_matches_the_numpy_obs_reference(qtype, shape, block):
    w = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    calib = from_inputs(_inputs(shape[0]))
    q, _ = _run(qtype, w, calib, block_size=block)
    want = np_gptvq(np.asarray(w), np.asarray(calib.hessian), np.asarray(q.codebooks()))
    got = np.asarray(q.indices()).astype(np.int64)
    np.testing.assert_array_equal(got, want)


def test_traced_sweep_matches_the_eager_one():
    w = jax.random.normal(jax.random.key(1), (128, 64), jnp.float32)
    calib = from_inputs(_inputs(128))
    eager, _ = _run("vq2", w, calib)
    traced, info = jax.jit(lambda w, c: _run("vq2", w, c))(w, calib)
    assert bool(info["factored"])
    agree = np.mean(np.asarray(traced.indices()) == np.asarray(eager.indices()))
    assert agree > 0.99, agree  # two factorizations of H: float32 near-ties may differ


def test_identity_hessian_is_plain_nearest_centroid_assignment():
    k, n = 128, 64
    w = jax.random.normal(jax.random.key(3), (k, n), jnp.float32)
    calib = from_inputs(jnp.eye(k, dtype=jnp.float32) * np.sqrt(k, dtype=np.float32))
    assert not np.any(np.asarray(calib.hessian) * (1 - np.eye(k)))  # H is diagonal
    q, _ = _run("vq2", w, calib)
    np.testing.assert_array_equal(np.asarray(q.indices()),
                                  np.asarray(vq.assign(w, q.codebooks())))  # fmt: skip


@pytest.mark.parametrize("qtype", ["vq2", "vq3"])
def test_feedback_lowers_the_output_error(qtype):
    k, n = 192, 128
    w = jax.random.normal(jax.random.key(4), (k, n), jnp.float32)
    calib = from_inputs(_inputs(k, seed=1))
    h = np.asarray(calib.hessian)
    q, _ = _run(qtype, w, calib)
    books = q.codebooks()
    plain = vq.gather(vq.assign(w, books), books, k).T  # the same codebooks, no feedback
    ours = np_output_error(w, q.dequantize(jnp.float32), h)
    theirs = np_output_error(w, plain, h)
    assert ours < 0.8 * theirs, (ours, theirs)


def np_kmeans(points, weights, books, iters):
    """Lloyd's weighted k-means on one tile, written plainly."""
    books = books.astype(np.float64).copy()
    for _ in range(iters):
        dist = ((points[:, None, :] - books[None]) ** 2 * weights[:, None, :]).sum(-1)
        assign = dist.argmin(1)
        for e in range(books.shape[0]):
            mine = assign == e
            if mine.any():
                books[e] = (weights[mine] * points[mine]).sum(0) / weights[mine].sum(0)
    return books


def test_kmeans_matches_numpy_lloyd():
    rng = np.random.default_rng(5)
    points = rng.standard_normal((3, 200, 2)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, (3, 200, 2)).astype(np.float32)
    got = np.asarray(gptvq.kmeans(jnp.asarray(points), jnp.asarray(weights), 16, 6))
    start = np.asarray(gptvq.kmeans(jnp.asarray(points), jnp.asarray(weights), 16, 0))
    for t in range(3):  # the start is a set of the tile's own points
        assert all(any(np.array_equal(c, p) for p in points[t]) for c in start[t])
        want = np_kmeans(points[t].astype(np.float64), weights[t], start[t], 6)
        np.testing.assert_allclose(got[t], want, rtol=1e-4, atol=1e-5)


CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2)  # fmt: skip


def test_calibrated_model_holds_vqarrays_and_runs(tmp_path):
    """A recipe naming vq2 for the attention and gate/up kernels (down_proj's K = 96 is not
    whole 64-row tiles: uint4 by gptq) quantizes a tiny Llama, and its logits are those of
    the float model with each VQArray replaced by its dequantized kernel."""
    model = init_model(CONFIG, seed=0)
    params = nnx.state(model, nnx.Param)
    tokens = np.random.RandomState(0).randint(0, 64, size=(4, 32))
    recipe = Recipe.from_dict({"name": "vq2-test", "rules": [
        {"pattern": "(q|k|v|o|gate|up)_proj/kernel$", "weight": "vq2", "algorithm": "gptvq"},
        {"pattern": "layers/.*kernel$", "weight": "uint4", "group_size": 32,
         "algorithm": "gptq"},
    ]})  # fmt: skip
    qparams, report = quantize_model(model, params, recipe, tokens, progress=False)
    leaves = dict(tree.leaves(qparams))
    vqs = {p: v for p, v in leaves.items() if isinstance(v, vq.VQArray)}
    assert len(vqs) == 6 * CONFIG.num_layers
    rows = {r.path: r for r in report.rows}
    for path, v in vqs.items():
        assert rows[path].qtype == "vq2" and rows[path].bits_per_weight == v.bits_per_weight
        assert rows[path].output_error < 0.5
    floats = tree.map_with_path(
        lambda p, v: v.dequantize(jnp.float32) if isinstance(v, vq.VQArray) else v, qparams)
    got = blocks.layerwise_forward(model, qparams, tokens)
    want = blocks.layerwise_forward(model, floats, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    config = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"layers/0/\S+_proj/kernel is a vq2 VQArray"):
        save_packed(tmp_path / "out", config=config, params=qparams)
    assert not (tmp_path / "out").exists()
