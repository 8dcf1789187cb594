"""Sensitivity statistics against plain jax.grad of the whole model, and the priced costs
against their formulas computed in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import ops, tree
from jquant._tap import Rewired, Tap, tapping, with_taps
from jquant.alloc import pricing as P
from jquant.alloc import sensitivity as S
from jquant.models import LlamaConfig, init_model
from jquant.models.convert import EMBED_PATH, HEAD_PATH

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128)  # fmt: skip


def _model(tied):
    model = init_model(LlamaConfig(**TINY, tie_word_embeddings=tied), seed=3)
    return model, nnx.state(model)


def _tokens():
    # Distinct ids in each window, so a row's summed squared gradient is one position's.
    rng = np.random.default_rng(0)
    return np.stack([rng.permutation(TINY["vocab_size"])[:12] for _ in range(3)]).astype(np.int32)


def _reference(model, params, tokens):
    """Per-position ∂L/∂y of every kernel's output (explicit additive perturbations) and
    ∂L/∂E of the embedding table, by jax.grad through the whole model (no probe, no
    layer-by-layer backward)."""
    graphdef = nnx.graphdef(model)
    paths = [f"layers/{i}/{p}" for i in range(TINY["num_layers"]) for p in (
        "self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel",
        "self_attn/o_proj/kernel", "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
        "mlp/down_proj/kernel")]  # fmt: skip
    tapped = with_taps(params, set(paths))
    b, s = tokens.shape
    widths = {p: S._leaf(params, p).shape[1] for p in paths}
    inputs = {}

    def loss(deltas, table):
        def handler(x, tap):
            inputs[tap.path] = x
            return Rewired(tap.value, lambda y: y + deltas[tap.path])

        state = tree.map_with_path(
            lambda p, v: table if p == EMBED_PATH else v, tapped)
        m = nnx.merge(graphdef, state)
        with tapping(handler):
            logits, _ = m(jnp.asarray(tokens))
        logits = logits.astype(jnp.float32)
        logz = jax.nn.logsumexp(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logits[:, :-1], jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]
        return jnp.sum(logz - picked)

    deltas = {p: jnp.zeros((b, s, widths[p])) for p in paths}
    table = params["embed_tokens"]["embedding"].get_value()
    return jax.grad(loss, argnums=(0, 1))(deltas, table)


def test_collect_matches_whole_model_gradients():
    model, params = _model(tied=False)
    tokens = _tokens()
    got = S.collect(model, params, tokens, batch_size=2, progress=False)
    g, _ = _reference(model, params, tokens)
    t = tokens.shape[0] * (tokens.shape[1] - 1)
    assert got.tokens == t
    for path, gy in g.items():
        want = np.sum(np.asarray(gy, np.float64) ** 2, axis=(0, 1)) / t
        np.testing.assert_allclose(got.kernels[path].grad_sq, want, rtol=2e-4, atol=1e-12,
                                   err_msg=path)  # fmt: skip
    # Untied, and each id once per window: ∂L/∂E[v] sums the embedding-output gradients at
    # v's positions (one per window), so C_v = Σ_windows g² needs the windows apart.
    rows = np.zeros((TINY["vocab_size"], TINY["hidden_size"]))
    for w in range(tokens.shape[0]):
        _, gw = _reference(model, params, tokens[w:w + 1])
        rows += np.asarray(gw, np.float64) ** 2
    np.testing.assert_allclose(got.embed_grad_sq, rows / t, rtol=2e-4, atol=1e-10)
    assert got.tied_head is None and HEAD_PATH in got.kernels


def test_collect_input_second_moments_and_loss():
    model, params = _model(tied=True)
    tokens = _tokens()
    got = S.collect(model, params, tokens, batch_size=3, progress=False)
    # H of q_proj in layer 0 is that of the first RMSNorm's output of the embeddings.
    table = np.asarray(params["embed_tokens"]["embedding"].get_value(), np.float64)
    x = table[tokens].reshape(-1, TINY["hidden_size"])
    scale = np.asarray(params["layers"][0]["input_layernorm"]["scale"].get_value(), np.float64)
    eps = model.config.rms_norm_eps
    h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale
    np.testing.assert_allclose(
        np.asarray(got.kernels["layers/0/self_attn/q_proj/kernel"].calibration.hessian),
        h.T @ h / len(h), rtol=1e-4, atol=1e-7)  # fmt: skip
    logits = np.asarray(jax.jit(lambda p, t: nnx.merge(nnx.graphdef(model), p)(t)[0])(
        params, jnp.asarray(tokens)), np.float64)  # fmt: skip
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    ce = lse[:, :-1] - np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert got.loss == pytest.approx(ce.mean(), rel=1e-5)
    assert got.tied_head is not None and got.tied_head.grad_sq.shape == (TINY["vocab_size"],)


def test_price_is_the_formula_on_numpy():
    model, params = _model(tied=True)
    stats = S.collect(model, params, _tokens(), batch_size=3, progress=False)
    cands = [P.candidate("u4", weight="uint4", group_size=32, algorithm="gptq"),
             P.candidate("bf16", skip=True, dtype="bfloat16")]
    tcands = [P.candidate("i8", weight="int8")]
    priced = P.price(params, stats, cands, tcands, progress=False)
    path = "layers/1/mlp/down_proj/kernel"
    from jquant import algorithms
    from jquant.recipe import Rule

    w = np.asarray(S._leaf(params, path), np.float64)
    ks = stats.kernels[path]
    q = algorithms.run("gptq", jnp.asarray(w, jnp.float32),
                       Rule(pattern=".", weight="uint4", group_size=32,
                            algorithm="gptq").resolve(path, 2),
                       path=path, calibration=ks.calibration)  # fmt: skip
    dw = w - np.asarray(q.dequantize(jnp.float32), np.float64)
    h, g = np.asarray(ks.calibration.hessian, np.float64), ks.grad_sq.astype(np.float64)
    want = 0.5 * np.sum((h @ dw) * dw * g[None, :])
    assert priced[path]["u4"].cost == pytest.approx(want, rel=1e-4)
    assert priced[path]["u4"].nbytes == q.nbytes
    assert priced[path]["bf16"].nbytes == w.size * 2
    table = np.asarray(params["embed_tokens"]["embedding"].get_value(), np.float64)
    from jquant.qarray import quantize_array

    de = table - np.asarray(quantize_array(jnp.asarray(table, jnp.float32), "int8",
                                           axis=-1).dequantize(jnp.float32), np.float64)
    want_e = 0.5 * np.sum(stats.embed_grad_sq * de * de)
    hh, gh = (np.asarray(stats.tied_head.calibration.hessian, np.float64),
              stats.tied_head.grad_sq.astype(np.float64))  # fmt: skip
    want_h = 0.5 * np.sum((de @ hh) * de * gh[:, None])
    assert priced[EMBED_PATH]["i8"].cost == pytest.approx(want_e, rel=1e-4)
    assert priced[HEAD_PATH]["i8"].cost == pytest.approx(want_h, rel=1e-4)


def test_rewired_output_applies_once():
    seen = []

    def handler(x, tap):
        seen.append(tap.path)
        return Rewired(tap.value, lambda y: y * 2.0)

    w = jnp.arange(12.0).reshape(3, 4)
    x = jnp.ones((2, 3))
    with tapping(handler):
        y = ops.qdot(x, Tap(w, "w"))
        z = ops.qdot_general(x, Tap(w, "w"), (((1,), (0,)), ((), ())))
    np.testing.assert_allclose(y, 2 * (x @ w))
    np.testing.assert_allclose(z, 2 * (x @ w))
    assert seen == ["w", "w"]
