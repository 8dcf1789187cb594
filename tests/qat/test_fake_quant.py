"""QAT fake quantization: PTQ's numerics forward, straight-through and LSQ gradients, convert."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jquant
from jquant import qat
from jquant.recipe import Recipe


def _recipe(**rule):
    return Recipe.from_dict({"name": "t", "rules": [{"pattern": "kernel$", **rule}]})


def _params(seed=0, k=200, n=48):
    rng = np.random.default_rng(seed)
    return {
        "a": {"kernel": jnp.asarray(rng.normal(size=(k, n)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(n,)), jnp.float32)},
        "b": {"kernel": jnp.asarray(rng.normal(size=(n, 32)) * 0.1, jnp.float32)},
    }  # fmt: skip


RULES = {
    "int4 g64, short last group": dict(weight="int4", group_size=64),
    "uint4 g32 (zero points)": dict(weight="uint4", group_size=32),
    "uint3 g64 clipped": dict(weight="uint3", group_size=64, clip_ratio=0.9),
    "int8 per channel": dict(weight="int8"),
    "int8 per tensor f16 scales": dict(weight="int8", per_tensor=True, scale_dtype="float16"),
    "nf4 g64 double quant": dict(weight="nf4", group_size=64, double_quant=True),
    "fp8_e4m3": dict(weight="fp8_e4m3"),
    "int6 g64": dict(weight="int6", group_size=64),
}


def _value(x):
    return x.value if isinstance(x, qat.ActQuantized) else x


@pytest.mark.parametrize("name", list(RULES))
@pytest.mark.parametrize("learned", [False, True], ids=["dynamic", "learned"])
def test_forward_is_ptq_and_convert_is_exact(name, learned):
    params, recipe = _params(), _recipe(**RULES[name])
    ptq = jquant.quantize(params, recipe)
    state = qat.init(params, recipe) if learned else None
    fq = jax.jit(lambda p, s: qat.fake_quantize(p, recipe, s))(params, state)
    packed = qat.convert(params, state, recipe)
    dq = jax.jit(lambda q: q.dequantize())
    for layer in ("a", "b"):
        want = dq(ptq[layer]["kernel"])  # RTN init: the learned state starts at PTQ exactly
        got = _value(fq[layer]["kernel"])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        q = packed[layer]["kernel"]
        assert isinstance(q, jquant.QArray) and q.qtype == recipe.rules[0].weight
        np.testing.assert_array_equal(np.asarray(dq(q)), np.asarray(got))
        want_codes = ptq[layer]["kernel"].codes()
        np.testing.assert_array_equal(np.asarray(q.codes()), np.asarray(want_codes))
    assert qat.fake_quantize(params, recipe, state)["a"]["bias"] is params["a"]["bias"]


def _bf16_up(x):
    """float32 -> bfloat16 rounding up (as stored scales are), back to float32."""
    y = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.where(y < x, np.nextafter(y.astype(ml_dtypes.bfloat16), np.inf).astype(np.float32), y)


def _np_int4_g64(w, scale=None):
    """NumPy reference: symmetric int4 in groups of 64 along K of a (K, N) kernel."""
    k, n = w.shape
    wt = w.T.reshape(n, -1, 64) if k % 64 == 0 else None
    assert wt is not None
    if scale is None:
        scale = _bf16_up(np.abs(wt).max(-1) / 7.0)
    s = scale[..., None]
    v = wt / s
    q = np.clip(np.round(v), -8, 7)
    return (q * s).reshape(n, k).T, v.reshape(n, k).T, q, s


def test_forward_and_ste_gradient_against_numpy():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(128, 8)).astype(np.float32)
    c = rng.normal(size=w.shape).astype(np.float32)
    recipe = _recipe(weight="int4", group_size=64, clip_ratio=0.75)
    # Reference: clip_ratio shrinks the absmax, so the largest weights saturate.
    wt = w.T.reshape(8, 2, 64)
    s = _bf16_up(np.abs(wt).max(-1) * np.float32(0.75) / np.float32(7.0))
    v = wt / s[..., None]
    fq_ref = (np.clip(np.round(v), -8, 7) * s[..., None]).reshape(8, 128).T
    inside = ((v >= -8) & (v <= 7)).reshape(8, 128).T

    def f(w):
        return jnp.sum(jnp.asarray(c) * qat.fake_quantize({"kernel": w}, recipe)["kernel"])

    got = qat.fake_quantize({"kernel": jnp.asarray(w)}, recipe)["kernel"]
    np.testing.assert_allclose(np.asarray(got), fq_ref, rtol=0, atol=1e-7)
    g = np.asarray(jax.grad(f)(jnp.asarray(w)))
    assert 0 < (~inside).sum() < inside.sum()  # some weights saturate
    np.testing.assert_allclose(g, np.where(inside, c, 0.0), rtol=1e-6)
    # identity STE: the clamp is ignored too
    g_id = jax.grad(lambda w: jnp.sum(jnp.asarray(c) * qat.fake_quantize(
        {"kernel": w}, recipe, ste="identity")["kernel"]))(jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(g_id), c, rtol=1e-6)


def test_lsq_scale_and_zero_point_gradients_against_numpy():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(64, 4)).astype(np.float32)
    c = rng.normal(size=w.shape).astype(np.float32)
    recipe = _recipe(weight="uint4", group_size=32, scale_dtype="float32")
    state = qat.init({"kernel": jnp.asarray(w)}, recipe)
    # Move the scales off the min/max so that some values saturate.
    state = {"kernel": {"scale": state["kernel"]["scale"] * 0.7,
                        "zero_point": state["kernel"]["zero_point"] + 0.3}}  # fmt: skip

    def f(st):
        return jnp.sum(jnp.asarray(c) * qat.fake_quantize({"kernel": jnp.asarray(w)}, recipe,
                                                          st)["kernel"])  # fmt: skip

    g = jax.grad(f)(state)["kernel"]
    s = np.asarray(state["kernel"]["scale"])[..., None]  # (N, G, 1)
    z = np.asarray(state["kernel"]["zero_point"])[..., None]
    wt, ct = w.T.reshape(4, 2, 32), c.T.reshape(4, 2, 32)
    v = wt / s + z
    q = np.clip(np.round(v), 0, 15)
    inside = (v >= 0) & (v <= 15)
    ds = np.sum(ct * np.where(inside, (q - z) - wt / s, q - z), -1)
    dz = np.sum(ct * np.where(inside, 0.0, -s), -1)
    assert (~inside).any()
    np.testing.assert_allclose(np.asarray(g["scale"]), ds, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g["zero_point"]), dz, rtol=1e-5, atol=1e-6)


def test_learned_scales_move_and_the_loss_falls():
    params = _params(3)
    recipe = _recipe(weight="int4", group_size=64)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(16, 200)), jnp.float32)

    def loss(p):  # regress the float model's output
        h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
        return h @ p["b"]["kernel"]

    target = loss(params)
    qloss = qat.wrap(lambda p: jnp.mean((loss(p) - target) ** 2), recipe)
    state = qat.init(params, recipe)
    tx = qat.optimizer(optax.set_to_zero(), scales=optax.adam(1e-3))
    opt = tx.init((params, state))

    @jax.jit
    def step(p, s, opt):
        value, g = jax.value_and_grad(qloss, argnums=(0, 1))(p, s)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 counts and floats
            u, opt = tx.update(g, opt, (p, s))
        p, s = optax.apply_updates((p, s), u)
        return p, s, opt, value, g

    p, s, opt, first, g = step(params, state, opt)
    assert all(float(jnp.abs(e["scale"]).max()) > 0 for e in g[1].values())
    for _ in range(60):
        p, s, opt, last, _ = step(p, s, opt)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, p, params))  # frozen weights
    moved = float(jnp.abs(s["a/kernel"]["scale"] - state["a/kernel"]["scale"]).max())
    assert moved > 1e-4
    assert float(last) < 0.7 * float(first)
    assert int(qat.nonpositive_scales(s)) == 0


def test_activation_rules_fake_quantize_inputs_as_serving_does():
    params = _params(5)
    recipe = Recipe.load("w8a8")
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 200)), jnp.float32)
    fq = qat.fake_quantize(params, recipe)
    assert isinstance(fq["a"]["kernel"], qat.ActQuantized)
    served = jquant.ops.qdot(x, jquant.quantize(params, recipe)["a"]["kernel"])
    faked = jquant.ops.qdot(x, fq["a"]["kernel"])
    np.testing.assert_allclose(np.asarray(faked), np.asarray(served), rtol=1e-5, atol=1e-4)
    plain = x @ _value(fq["a"]["kernel"])  # without activation quantization it differs
    assert float(jnp.abs(plain - served).max()) > 1e-3
    # straight through the activations: d/dx of sum(x @ W) is the row sums of W
    gx = jax.grad(lambda x: jnp.sum(jquant.ops.qdot(x, fq["a"]["kernel"])))(x)
    np.testing.assert_allclose(np.asarray(gx[0]), np.asarray(_value(fq["a"]["kernel"]).sum(1)),
                               rtol=1e-5)  # fmt: skip


def test_grad_and_vmap_compose():
    params, recipe = _params(7), _recipe(weight="int4", group_size=64)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    out = jax.vmap(lambda p: qat.fake_quantize(p, recipe))(stacked)
    one = qat.fake_quantize(jax.tree.map(lambda a: a[1], stacked), recipe)
    np.testing.assert_array_equal(np.asarray(out["a"]["kernel"][1]), np.asarray(one["a"]["kernel"]))


def test_skip_rule_dtype_is_applied_in_training():
    recipe = Recipe.from_dict({"name": "t", "rules": [
        {"pattern": "a/kernel", "skip": True, "dtype": "bfloat16"},
        {"pattern": "kernel$", "weight": "int8"}]})  # fmt: skip
    fq = qat.fake_quantize(_params(), recipe)
    assert fq["a"]["kernel"].dtype == jnp.bfloat16
    assert qat.convert(_params(), None, recipe)["a"]["kernel"].dtype == jnp.bfloat16


# ---- bad input ------------------------------------------------------------------------------


def test_unknown_format_and_ste_are_clear_errors():
    with pytest.raises(ValueError, match="int9"):
        qat.fake_quantize(_params(), Recipe.from_dict(
            {"name": "t", "rules": [{"pattern": "kernel", "weight": "int9"}]}))
    with pytest.raises(ValueError, match="ste="):
        qat.fake_quantize(_params(), "w8a16", ste="round")


def test_state_that_does_not_match_the_params():
    params, recipe = _params(), _recipe(weight="int4", group_size=64)
    state = qat.init(params, recipe)
    with pytest.raises(ValueError, match=r"1 quantized path\(s\) have no state.*b/kernel"):
        qat.fake_quantize(params, recipe, {"a/kernel": state["a/kernel"]})
    with pytest.raises(ValueError, match=r"not quantized params.*c/kernel"):
        qat.convert(params, {**state, "c/kernel": state["a/kernel"]}, recipe)
    bad = {**state, "b/kernel": {"scale": jnp.ones((32, 2))}}
    with pytest.raises(ValueError, match=r"b/kernel: QAT state scale has shape \(32, 2\).*1\)"):
        qat.fake_quantize(params, recipe, bad)
    uint = _recipe(weight="uint4", group_size=64)
    ustate = qat.init(params, uint)
    with pytest.raises(ValueError, match="no zero_point"):
        qat.fake_quantize(params, uint, {p: {"scale": e["scale"]} for p, e in ustate.items()})


def test_nonpositive_learned_scales_are_refused_at_convert():
    params, recipe = _params(), _recipe(weight="int4", group_size=64)
    state = qat.init(params, recipe)
    state["b/kernel"]["scale"] = state["b/kernel"]["scale"].at[3, 0].set(-1e-3)
    assert int(qat.nonpositive_scales(state)) == 1
    # the forward pass floors the scale instead of producing NaN
    fq = qat.fake_quantize(params, recipe, state)
    assert bool(jnp.all(jnp.isfinite(fq["b"]["kernel"])))
    with pytest.raises(ValueError, match=r"b/kernel: 1 of 32 learned scales are not positive"):
        qat.convert(params, state, recipe)


def test_quantized_init_must_match_the_recipe():
    params = _params()
    q8 = jquant.quantize(params, "w8a16")
    with pytest.raises(ValueError, match=r"a/kernel: quantized= holds .*int8"):
        qat.init(params, _recipe(weight="int4", group_size=64), quantized=q8)
    state = qat.init(params, "w8a16", quantized=q8)
    np.testing.assert_array_equal(np.asarray(state["a/kernel"]["scale"]),
                                  np.asarray(q8["a"]["kernel"].scales()))  # fmt: skip
