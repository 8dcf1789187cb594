"""quantize(): Linen dicts, NNX State, nested containers, errors, reports, rtn clip search."""

import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import algorithms, qtypes
from jquant.algorithms.rtn import group_sq_error, search_clip_ratios
from jquant.qarray import QArray, quantize_array
from jquant.recipe import Recipe
from jquant.transform import ReportRow, format_report, quantize


def recipe(*rules, **kw):
    return Recipe.from_dict({"name": "t", "rules": list(rules), **kw})


INT4 = recipe({"pattern": "(?i)embed", "skip": True},
              {"pattern": "kernel$", "weight": "int4", "group_size": 32})  # fmt: skip


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(48, 64)(ids)
        return nn.Dense(32)(nn.relu(nn.Dense(96)(h)))


@pytest.fixture(scope="module")
def linen_params():
    return LinenModel().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(48, 64, rngs=rngs)
        self.fc = nnx.Linear(64, 96, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)  # RNG state: a PRNG key leaf

    def __call__(self, ids):
        return self.fc(self.embed(ids))


def test_linen_dict(linen_params):
    q = quantize(linen_params, INT4)
    p, qp = linen_params["params"], q["params"]
    assert isinstance(qp["Dense_0"]["kernel"], QArray) and qp["Dense_0"]["kernel"].qtype == "int4"
    assert qp["Dense_0"]["kernel"].axis == -2 and qp["Dense_0"]["kernel"].group_size == 32
    assert qp["Embed_0"]["embedding"] is p["Embed_0"]["embedding"]
    assert qp["Dense_0"]["bias"] is p["Dense_0"]["bias"]
    w, deq = p["Dense_1"]["kernel"], qp["Dense_1"]["kernel"].dequantize()
    assert float(jnp.max(jnp.abs(w - deq))) < 0.1 * float(jnp.max(jnp.abs(w)))
    assert jax.tree.structure(linen_params, is_leaf=lambda x: isinstance(x, QArray)) == \
        jax.tree.structure(q, is_leaf=lambda x: isinstance(x, QArray))


def test_frozen_dict_stays_frozen(linen_params):
    q = quantize(flax.core.freeze(linen_params), INT4)
    assert isinstance(q, flax.core.FrozenDict)
    assert isinstance(q["params"]["Dense_1"]["kernel"], QArray)


def test_nnx_state_merges():
    model = NNXModel(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    qstate, rows = quantize(state, INT4, report=True)
    assert isinstance(qstate, nnx.State)
    assert [r.path for r in rows] == ["drop/rngs/count", "embed/embedding", "fc/bias", "fc/kernel"]
    kernel = qstate["fc"]["kernel"]
    assert isinstance(kernel, nnx.Param) and isinstance(kernel.get_value(), QArray)
    assert qstate["fc"]["bias"] is state["fc"]["bias"]
    assert qstate["embed"]["embedding"] is state["embed"]["embedding"]
    assert qstate["drop"]["rngs"]["key"] is state["drop"]["rngs"]["key"]
    assert isinstance(state["fc"]["kernel"].get_value(), jax.Array)  # input not mutated
    qmodel = nnx.merge(graphdef, qstate)
    assert isinstance(qmodel.fc.kernel.get_value(), QArray)
    deq = qmodel.fc.kernel.get_value().dequantize()
    np.testing.assert_allclose(deq, model.fc.kernel.get_value(), atol=0.05)


def test_nnx_embedding_quantized_along_features():
    _, state = nnx.split(NNXModel(nnx.Rngs(0)))
    q = quantize(state, recipe({"pattern": "embedding", "weight": "int8"}))
    table = q["embed"]["embedding"].get_value()
    assert table.axis == -1 and table.scale.shape == (48, 1)


def test_nested_lists_and_paths():
    w = jnp.ones((64, 8))
    params = {"layers": [{"kernel": w}, {"kernel": w}], "norm": {"scale": jnp.ones(8)}}
    q, rows = quantize(params, recipe({"pattern": "^layers/1/", "weight": "int8"}), report=True)
    assert q["layers"][0]["kernel"] is w and isinstance(q["layers"][1]["kernel"], QArray)
    assert [r.path for r in rows] == ["layers/0/kernel", "layers/1/kernel", "norm/scale"]
    assert [r.qtype for r in rows] == ["float", "int8", "float"]


def test_rank_below_two_and_min_size_and_skip():
    params = {"a": {"kernel": jnp.ones((64, 8))}, "b": {"kernel": jnp.ones((8, 8))},
              "bias": jnp.ones(64), "c": {"kernel": jnp.ones((64, 8))}}  # fmt: skip
    r = recipe({"pattern": "^c/", "skip": True},
               {"pattern": ".", "weight": "int8", "min_size": 100})  # fmt: skip
    with pytest.warns(UserWarning, match=r"rules\[1\] \(pattern '\.'\).*: bias\."):
        q, rows = quantize(params, r, report=True)
    status = {row.path: row.qtype for row in rows}
    assert status == {"a/kernel": "int8", "b/kernel": "skip", "bias": "float", "c/kernel": "skip"}
    assert q["bias"] is params["bias"] and q["b"]["kernel"] is params["b"]["kernel"]


def test_rule_matching_leaves_it_cannot_quantize_warns():
    params = {"layers": [{"kernel": jnp.ones((64, 8)), "norm": {"scale": jnp.ones(8)}}
                         for _ in range(7)], "step": 3}  # fmt: skip
    r = recipe({"pattern": "^layers/", "weight": "int8"}, {"pattern": "step", "weight": "int4"})
    with pytest.warns(UserWarning) as record:
        q = quantize(params, r)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "rules[0] (pattern '^layers/') of recipe 't' matches 7 parameter(s)" in messages[0]
    assert "layers/0/norm/scale, layers/1/norm/scale" in messages[0]
    assert "... (7 in all)" in messages[0] and "layers/5/norm/scale" not in messages[0]
    assert "rules[1] (pattern 'step')" in messages[1] and messages[1].endswith(
        "skip rule before it.") and ": step." in messages[1]
    assert isinstance(q["layers"][0]["kernel"], QArray) and q["step"] == 3
    assert q["layers"][0]["norm"]["scale"] is params["layers"][0]["norm"]["scale"]


def test_skip_rules_min_size_and_quantized_leaves_do_not_warn():
    q8 = quantize_array(jnp.ones((64, 8)), "int8", axis=0)
    params = {"kernel": q8, "bias": jnp.ones(8), "small": {"kernel": jnp.ones((4, 4))}}
    r = recipe({"pattern": "bias", "skip": True},
               {"pattern": "kernel$", "weight": "int8", "min_size": 100})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = quantize(params, r)
    assert q["kernel"] is q8


# SmolLM2-135M's parameter paths (shapes shrunk, K a multiple of every shipped group size).
SMOLLM2_PATHS = {
    "embed_tokens/embedding": (256, 128), "lm_head/kernel": (128, 256), "norm/scale": (128,),
    **{f"layers/{i}/{p}": s for i in range(2) for p, s in {
        **{f"self_attn/{n}_proj/kernel": (128, 128) for n in "qkvo"},
        **{f"mlp/{n}_proj/kernel": (128, 128) for n in ("gate", "up", "down")},
        "input_layernorm/scale": (128,), "post_attention_layernorm/scale": (128,),
    }.items()},
}


@pytest.mark.parametrize("name", Recipe.list_shipped())
def test_shipped_recipes_match_only_quantizable_smollm2_leaves(name):
    r = Recipe.load(name)
    for path, shape in SMOLLM2_PATHS.items():
        rule = r.match(path)
        assert rule is None or rule.skip or len(shape) >= 2, (name, path)
    if all(rule.algorithm in ("rtn", "hqq") for rule in r.rules):
        params = {p: jnp.ones(s, jnp.bfloat16) for p, s in SMOLLM2_PATHS.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quantize(params, r)


def test_recipe_by_name_and_path(tmp_path, linen_params):
    by_name = quantize(linen_params, "w8a16")
    path = tmp_path / "r.yaml"
    path.write_text(Recipe.load("w8a16").to_yaml())
    by_path = quantize(linen_params, str(path))
    a, b = by_name["params"]["Dense_0"]["kernel"], by_path["params"]["Dense_0"]["kernel"]
    np.testing.assert_array_equal(a.qvalue, b.qvalue)


def test_require_match_at_quantize(linen_params):
    r = recipe({"pattern": "kernel$", "weight": "int8"}, {"pattern": "lm_head", "skip": True},
               require_match=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"rules\[1\] \(pattern 'lm_head'\) matches no param"):
        quantize(linen_params, r)


@pytest.mark.parametrize("weight, message", [
    (jnp.ones((16, 8), jnp.int32), "only float weights"),
    (jnp.ones((16, 8)).at[3, 2].set(jnp.nan), "NaN/inf"),
])  # fmt: skip
def test_bad_weight_names_path_and_rule(weight, message):
    params = {"params": {"Dense_0": {"kernel": weight}}}
    with pytest.raises(ValueError, match=message) as e:
        quantize(params, recipe({"pattern": "x", "skip": True},
                                {"pattern": "kernel", "weight": "int8"}))  # fmt: skip
    assert "params/Dense_0/kernel" in str(e.value)
    assert "rules[1] (pattern 'kernel')" in str(e.value) and "recipe 't'" in str(e.value)


def test_bad_axis_names_path():
    with pytest.raises(ValueError, match="w/kernel: rules.0. .pattern 'kernel'.: axis=3"):
        quantize({"w": {"kernel": jnp.ones((4, 4))}},
                 recipe({"pattern": "kernel", "weight": "int8", "axis": 3}))


def test_report_bits_of_a_4096_square_int4_g128():
    w = jax.random.normal(jax.random.key(1), (4096, 4096), jnp.float32)
    r = recipe({"pattern": "kernel", "weight": "int4", "group_size": 128})
    q, rows = quantize({"kernel": w}, r, report=True)
    (row,) = rows
    assert row.nbytes == 4096 * 4096 // 2 + 4096 * 32 * 2
    assert row.bits_per_weight == 4.125 and row.float_nbytes == 4096 * 4096 * 4
    assert (row.path, row.shape, row.qtype, row.group_size, row.algorithm) == \
        ("kernel", (4096, 4096), "int4", 128, "rtn")
    assert 0.05 < row.rel_error < 0.15  # int4 absmax on Gaussian weights: ~0.1


def test_report_rows_and_table(linen_params):
    q, rows = quantize(linen_params, INT4, report=True)
    assert all(isinstance(r, ReportRow) for r in rows)
    by_path = {r.path: r for r in rows}
    k = by_path["params/Dense_0/kernel"]
    w = linen_params["params"]["Dense_0"]["kernel"]
    expect = float(jnp.linalg.norm(w - q["params"]["Dense_0"]["kernel"].dequantize())
                   / jnp.linalg.norm(w))  # fmt: skip
    assert k.rel_error == pytest.approx(expect, rel=1e-5)
    assert by_path["params/Embed_0/embedding"].qtype == "skip"
    assert by_path["params/Embed_0/embedding"].rel_error == 0.0
    table = format_report(rows)
    assert "params/Dense_0/kernel" in table and table.splitlines()[-1].startswith("total")


def test_already_quantized_passes_through(linen_params):
    q = quantize(linen_params, INT4)
    q2, rows = quantize(q, "w8a16", report=True)
    assert q2["params"]["Dense_0"]["kernel"] is q["params"]["Dense_0"]["kernel"]
    assert {r.path: r.qtype for r in rows}["params/Dense_0/kernel"] == "int4"


def test_deterministic(linen_params):
    a, b = quantize(linen_params, "nf4"), quantize(linen_params, "nf4")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_calibration_reaches_the_algorithm(monkeypatch):
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))
    seen = {}

    @algorithms.register("spy")
    def spy(weight, rule, *, path, calibration=None):
        seen[path] = (calibration, rule.axis, rule.clip)
        return quantize_array(weight, rule.weight, axis=rule.axis, name=path)

    params = {"a": {"kernel": jnp.ones((8, 4))}, "b": {"kernel": jnp.ones((8, 4))}}
    r = recipe({"pattern": "kernel", "weight": "int8", "algorithm": "spy"})
    quantize(params, r, calibration={"a/kernel": "xa"})
    assert seen == {"a/kernel": ("xa", 0, "absmax"), "b/kernel": (None, 0, "absmax")}
    quantize(params, r, calibration=lambda path: path.upper())
    assert seen["b/kernel"][0] == "B/KERNEL"


# ---- rtn clip search -----------------------------------------------------------------

def _group_errors(w, q: QArray):
    """Per-group squared error of a QArray against w (storage layout, K last)."""
    w_t = jnp.moveaxis(w, 0, -1)
    sq = jnp.square(w_t - q.dequantize_stored(jnp.float32))
    if q.scale.size == 1:
        return jnp.sum(sq)
    from jquant.qarray import _group_reduce

    return _group_reduce(sq, q.group_size, jnp.sum)


# The codebook itself is pinned against QLoRA's published values in tests/test_qtypes.py.
NF4 = np.asarray(qtypes.NF4_CODEBOOK, np.float32)


def _np_dequant(v, qtype, r):
    """Slow, obvious RTN of groups v (..., L) at clip ratio r with float32 scales."""
    if qtype == "int4":
        s = np.abs(v).max(axis=-1, keepdims=True) * r / np.float32(7)
        s = np.where(s > 0, s, np.float32(1))
        return np.clip(np.round(v / s), -8, 7) * s
    if qtype == "nf4":
        s = np.abs(v).max(axis=-1, keepdims=True) * r
        s = np.where(s > 0, s, np.float32(1))
        return NF4[np.abs((v / s)[..., None] - NF4).argmin(axis=-1)] * s
    assert qtype == "uint4"  # the range keeps zero and shrinks toward it
    lo = np.minimum(v.min(axis=-1, keepdims=True), 0) * r
    hi = np.maximum(v.max(axis=-1, keepdims=True), 0) * r
    s = hi / np.float32(15) - lo / np.float32(15)
    s = np.where(s > 0, s, np.float32(1))
    z = np.clip(np.round(-lo / s), 0, 15)
    return (np.clip(np.round(v / s + z), 0, 15) - z) * s


def _np_best_errors(w_t, qtype, group_size, ratios):
    """Per-group minimum over ``ratios`` of the squared error, by brute force: (N, G), (N, G)."""
    k = w_t.shape[-1]
    groups = [w_t[:, i : i + group_size] for i in range(0, k, group_size)]
    errs = np.stack([  # (R, N, G)
        np.stack([((g - _np_dequant(g, qtype, r)).astype(np.float64) ** 2).sum(-1)
                  for g in groups], axis=-1)
        for r in ratios
    ])  # fmt: skip
    return errs.min(axis=0), ratios[errs.argmin(axis=0)]


# 48 does not divide K = 160: a short last group of 16.
@pytest.mark.parametrize("qtype, group_size", [("int4", 32), ("uint4", 32), ("nf4", 32),
                                               ("int4", 48)])
def test_clip_search_finds_the_brute_force_minimum(qtype, group_size):
    # Student-t weights: heavy tails are where clipping pays off.
    w = jax.random.t(jax.random.key(0), 3.0, (160, 24), jnp.float32)
    settings = {"weight": qtype, "group_size": group_size, "scale_dtype": "float32"}
    plain = quantize({"kernel": w}, recipe({"pattern": "kernel", **settings}))["kernel"]
    searched = quantize({"kernel": w}, recipe({"pattern": "kernel", **settings,
                         "algorithm_args": {"clip_search": {"grid": 16}}}))["kernel"]  # fmt: skip
    ratios = np.float32(1) - np.float32(0.2) * np.arange(17, dtype=np.float32) / np.float32(16)
    best, best_ratio = _np_best_errors(np.asarray(w).T, qtype, group_size, ratios)
    e_search = np.asarray(_group_errors(w, searched), np.float64)
    np.testing.assert_allclose(e_search, best, rtol=1e-4, atol=1e-9)
    # The search has teeth: most groups clip, and the total error drops clearly.
    assert (best_ratio < 1).mean() > 0.5
    assert e_search.sum() < 0.98 * float(jnp.sum(_group_errors(w, plain)))


@pytest.mark.parametrize("qtype, group_size, per_tensor", [("fp8_e4m3", None, False),
                                                           ("int4", None, True)])
def test_clip_search_never_worse_than_plain(qtype, group_size, per_tensor):
    w = jax.random.t(jax.random.key(1), 3.0, (160, 24), jnp.float32)
    settings = {"weight": qtype, "group_size": group_size, "per_tensor": per_tensor}
    plain = quantize({"kernel": w}, recipe({"pattern": "kernel", **settings}))["kernel"]
    searched = quantize({"kernel": w}, recipe({"pattern": "kernel", **settings,
                         "algorithm_args": {"clip_search": {"grid": 16}}}))["kernel"]  # fmt: skip
    e_plain, e_search = _group_errors(w, plain), _group_errors(w, searched)
    assert bool(jnp.all(e_search <= e_plain * (1 + 1e-6)))


def test_clip_search_ratios_shape_and_range():
    w = jax.random.normal(jax.random.key(0), (160, 24), jnp.float32)  # shapes as above
    r = search_clip_ratios(w, "int4", axis=0, group_size=32, grid=16, max_shrink=0.5)
    assert r.shape == (24, 5) and r.dtype == jnp.float32
    assert bool(jnp.all((r >= 0.5 - 1e-6) & (r <= 1.0)))


def test_group_sq_error_matches_quantize_array():
    w = jax.random.normal(jax.random.key(2), (160, 24), jnp.float32)
    q = quantize_array(w, "int4", group_size=32, clip_ratio=0.9)
    err = group_sq_error(w.T, "int4", 32, False, jnp.bfloat16, 0.9)
    np.testing.assert_allclose(err, _group_errors(w, q), rtol=1e-6)
