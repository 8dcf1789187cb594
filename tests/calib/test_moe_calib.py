"""Calibrated quantization of mixture-of-experts models (Mixtral, Qwen2-MoE with a shared
expert, Qwen3-MoE with dense and MoE layers mixed).

References: the per-expert statistics against NumPy (routing recomputed in float64 from the
float model's router), each expert's GPTQ against `jquant.algorithms.gptq` run alone on that
expert's NumPy Hessian, a fallen-back expert against plain RTN, folds against the float
model's own logits. Models are tiny random ones of the shapes tests/models/test_moe.py uses
(its configs, built by jquant from the same HF config dicts), routers scaled up so that the
tokens spread over the experts.
"""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import algorithms
from jquant._tap import with_taps
from jquant.calib import _layer, quantize_model
from jquant.calib._experts import fallbacks
from jquant.calib.driver import report_summary
from jquant.calib.fold import apply_fold, llama_folds
from jquant.calib.stats import Calibration
from jquant.eval.perplexity import perplexity
from jquant.models import blocks
from jquant.models.cache import NoCache
from jquant.qarray import QArray
from jquant.recipe import ExpertCalibration, Recipe

_tiny = runpy.run_path(str(Path(__file__).parents[1] / "tiny_moe.py"))

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    # Every layer sparse, top-2 of 4 (each expert as wide as intermediate_size).
    "mixtral": dict(model_type="mixtral", num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2),
    # Layer 0 dense, layer 1 sparse with a shared expert and its gate.
    "qwen2_moe": dict(model_type="qwen2_moe", num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=48, norm_topk_prob=False,
                      mlp_only_layers=[0]),
    # Layers dense, MoE, dense.
    "qwen3_moe": dict(model_type="qwen3_moe", num_hidden_layers=3, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      decoder_sparse_step=2, mlp_only_layers=[2]),
}  # fmt: skip
TOKENS = np.random.default_rng(0).integers(3, VOCAB, (4, 16))
STACKS = tuple(f"mlp/experts/{p}_proj/kernel" for p in ("gate", "up", "down"))


def _model(family: str, *, dead: bool = False):
    """`random_moe` of ``family``."""
    return _tiny["random_moe"]({**BASE, **FAMILIES[family]}, dead=dead)


def _recipe(name: str, experts=None, **rule) -> Recipe:
    return Recipe.from_dict({"name": name, "experts": experts or {}, "rules": [
        {"pattern": "(?i)embed|lm_head", "skip": True}, {"pattern": "kernel$", **rule}]})


RECIPES = {
    "gptq": _recipe("gptq", weight="int4", group_size=16, algorithm="gptq"),
    "awq+gptq": _recipe("awq+gptq", weight="uint4", group_size=16, algorithm="gptq",
                        algorithm_args={"awq": True}),
    "smoothquant": _recipe("smoothquant", weight="int8", activation="int8",
                           algorithm="smoothquant"),
    "hqq": _recipe("hqq", weight="uint4", group_size=16, algorithm="hqq"),
}  # fmt: skip
ALL_TOKENS = {"gptq-all": _recipe("gptq-all", experts={"tokens": "all"}, weight="int4",
                                  group_size=16, algorithm="gptq")}  # fmt: skip


def _layer_input(model, params, tokens, i):
    """(x, ctx): decoder layer ``i``'s float input and context."""
    x, ctxs = blocks.embed(model, params, tokens)
    for j in range(i):
        x = blocks.run_layer(blocks.layer_graphdef(model, j), blocks.layer_params(params, j), x,
                             ctxs.at(model.config, j))  # fmt: skip
    return x, ctxs.at(model.config, i)


def _moe_input(model, params, tokens, i) -> np.ndarray:
    """The float input ``(T, D)`` of layer ``i``'s MoE block (after attention and its norm)."""
    x, ctx = _layer_input(model, params, tokens, i)
    layer = nnx.merge(blocks.layer_graphdef(model, i), blocks.layer_params(params, i))
    h, _ = layer.self_attn(layer.input_layernorm(x), ctx, NoCache(), 0)
    out = layer.mlp_norm(layer.attn_residual(x, h))
    return np.asarray(out, np.float64).reshape(-1, model.config.hidden_size)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _np_expert_rows(xm, stacks, router, k, *, every: bool):
    """Per expert, in float64: the rows of its gate/up input and of its down input (every
    token with ``every``, else the tokens whose top k include it)."""
    logits = xm @ router.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    ordered = np.sort(logits, axis=1)[:, ::-1]
    assert np.all(ordered[:, k - 1] - ordered[:, k] > 1e-3)  # no near-tie: routing is clear
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    gate, up, _ = stacks
    out = []
    for e in range(router.shape[0]):
        rows = xm if every else xm[np.any(top == e, axis=1)]
        out.append((rows, _silu(rows @ gate[e]) * (rows @ up[e])))
    return out


def _np_hessian(rows):
    return rows.T @ rows / max(len(rows), 1)


def _stack(params, i, name):
    return np.asarray(params["layers"][i]["mlp"]["experts"][name]["kernel"].get_value(),
                      np.float64)  # fmt: skip


@pytest.mark.parametrize("every", [False, True], ids=["routed", "all"])
def test_expert_statistics_equal_numpy_from_the_routed_rows(every):
    """(a) Each expert's Hessian, mean |x|, max |x| and row count from the tap equal NumPy's
    over the rows routed to it (every token with ``tokens: all``), for gate/up and down."""
    model, params = _model("qwen3_moe")
    i = 1
    x, ctx = _layer_input(model, params, TOKENS, i)
    state = blocks.layer_params(params, i)
    plan = {p: None for p in STACKS}
    apply = _layer._layer_apply(blocks.layer_graphdef(model, i), every_expert=every)
    _, got = _layer._tapped_pass(with_taps(state, set(plan)), (x, ctx), apply=apply,
                                 plan=_layer._plan({}), mode="stats")  # fmt: skip
    xm = _moe_input(model, params, TOKENS, i)
    stacks = [_stack(params, i, p) for p in ("gate_proj", "up_proj", "down_proj")]
    router = np.asarray(state["mlp"]["gate"]["weight"].get_value(), np.float64)
    want = _np_expert_rows(xm, stacks, router, model.config.num_experts_per_tok, every=every)
    counts = [len(r) for r, _ in want]
    assert min(counts) > 0 and (every or max(counts) < len(xm))
    for path, which in zip(STACKS, (0, 0, 1)):
        c = got[path]
        assert c.hessian.shape[0] == 4
        np.testing.assert_array_equal(np.asarray(c.count), counts)
        for e, rows in enumerate(r[which] for r in want):
            np.testing.assert_allclose(c.hessian[e], _np_hessian(rows), rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(c.mean_abs[e], np.abs(rows).mean(0), rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(c.max_abs[e], np.abs(rows).max(0), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("block", [3, 256])
def test_from_routed_against_numpy(monkeypatch, block):
    """`stats.from_routed` on rows sorted by expert, with experts of no rows (first, middle,
    last), rows past the groups, and blocks that hold several experts or cut one: each
    expert's statistics are NumPy's over its rows, zeros for an empty one."""
    from jquant.calib import stats

    monkeypatch.setattr(stats, "GRAM_ROWS", block)
    sizes = [0, 5, 0, 1, 9, 2, 0]
    x = np.random.default_rng(4).standard_normal((sum(sizes) + 3, 6)).astype(np.float32)
    got = stats.from_routed(jnp.asarray(x), jnp.asarray(sizes, jnp.int32))
    start = 0
    for e, n in enumerate(sizes):
        rows = x[start : start + n].astype(np.float64)
        start += n
        assert float(got.count[e]) == n
        np.testing.assert_allclose(got.hessian[e], _np_hessian(rows), rtol=1e-5, atol=1e-6)
        want_abs = np.abs(rows).mean(0) if n else np.zeros(6)
        np.testing.assert_allclose(got.mean_abs[e], want_abs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.max_abs[e], np.abs(rows).max(0) if n else np.zeros(6))


@pytest.fixture(scope="module")
def quantized():
    """(family, recipe) -> (model, float params, qparams, report, warnings), made once."""
    cache = {}

    def get(family, recipe, dead=False):
        key = (family, recipe, dead)
        if key not in cache:
            model, params = _model(family, dead=dead)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                q, report = quantize_model(model, params, {**RECIPES, **ALL_TOKENS}[recipe],
                                           TOKENS, progress=False)  # fmt: skip
            cache[key] = model, params, q, report, [str(w.message) for w in seen]
        return cache[key]

    return get


@pytest.mark.parametrize("recipe", ["gptq", "gptq-all"])
def test_gptq_of_each_expert_equals_gptq_on_its_numpy_hessian(quantized, recipe):
    """(b) Mixtral's layer 0 (inputs: the embeddings, so the float layer's routing is the
    calibration's): every expert slice of every stack is `gptq` run alone on that expert's
    weight with the NumPy Hessian of its routed rows (of every token, ``tokens: all``)."""
    model, params, q, report, _ = quantized("mixtral", recipe)
    xm = _moe_input(model, params, TOKENS, 0)
    stacks = [_stack(params, 0, p) for p in ("gate_proj", "up_proj", "down_proj")]
    router = np.asarray(params["layers"][0]["mlp"]["gate"]["weight"].get_value(), np.float64)
    rows = _np_expert_rows(xm, stacks, router, 2, every=recipe == "gptq-all")
    rule = RECIPES["gptq"].rules[-1].resolve("w", 2)
    for path, w, which in zip(STACKS, stacks, (0, 0, 1)):
        got = q["layers"][0]["mlp"]["experts"][path.split("/")[2]]["kernel"].get_value()
        for e in range(4):
            h = _np_hessian(rows[e][which]).astype(np.float32)
            calib = Calibration(hessian=jnp.asarray(h), mean_abs=jnp.zeros(len(h)),
                                max_abs=jnp.zeros(len(h)), count=jnp.float32(len(rows[e][0])))
            want = algorithms.run("gptq", jnp.asarray(w[e], jnp.float32), rule, path=path,
                                  calibration=calib)  # fmt: skip
            mine = jax.tree.map(lambda a, e=e: a[e], got)
            np.testing.assert_array_equal(mine.codes(), want.codes(), err_msg=f"{path} {e}")
            np.testing.assert_array_equal(np.asarray(mine.scale, np.float32),
                                          np.asarray(want.scale, np.float32))  # fmt: skip
    row = next(r for r in report.rows if r.path == "layers/0/mlp/experts/down_proj/kernel")
    assert row.expert_tokens == [len(r[0]) for r in rows] and row.fallback_experts == []


def test_fallback_threshold():
    """Fewer rows than ``min_token_share`` of the calibration tokens, or none at all, falls
    back; a data-free rule never does."""
    rule = RECIPES["gptq"].rules[-1]
    share = ExpertCalibration(min_token_share=0.05, fallback="hqq")
    assert fallbacks([0, 4, 5, 40], rule, share, 100, calibrated=True) == ("hqq", "hqq", None,
                                                                          None)  # fmt: skip
    assert fallbacks([0, 1], rule, ExpertCalibration(min_token_share=0.0), 100,
                     calibrated=True) == ("rtn", None)  # fmt: skip
    assert fallbacks([0, 1], rule, share, 100, calibrated=False) == (None, None)


def test_an_expert_without_tokens_falls_back_to_rtn(quantized):
    """(c) Expert 3 of Qwen2-MoE's layer 1 never wins the routing: a warning names it, its
    slice of every stack is plain RTN of its float weight, the report lists it, and nothing
    is NaN."""
    model, params, q, report, seen = quantized("qwen2_moe", "gptq", dead=True)
    row = {r.path: r for r in report.rows}
    rtn_rule = _recipe("rtn", weight="int4", group_size=16).rules[-1].resolve("w", 2)
    for path in STACKS:
        full = f"layers/1/{path}"
        assert row[full].expert_tokens[3] == 0 and min(row[full].expert_tokens[:3]) > 0
        assert row[full].fallback_experts == [3] and row[full].fallback_algorithm == "rtn"
        assert any(m.startswith(f"{full}: expert(s) 3 (0 rows) received fewer than 0.50% of "
                                "the 64 calibration tokens; quantized by rtn") for m in seen), seen
        name = path.split("/")[2]
        got = q["layers"][1]["mlp"]["experts"][name]["kernel"].get_value()
        w = params["layers"][1]["mlp"]["experts"][name]["kernel"].get_value()
        rtn = algorithms.run("rtn", w[3], rtn_rule, path=full)
        np.testing.assert_array_equal(jax.tree.map(lambda a: a[3], got).codes(), rtn.codes())
        np.testing.assert_array_equal(np.asarray(jax.tree.map(lambda a: a[3], got).scale),
                                      np.asarray(rtn.scale))  # fmt: skip
        assert np.isfinite(np.asarray(got.dequantize())).all()
    assert "experts quantized by rtn for too few tokens" in report_summary(report)
    logits = blocks.layerwise_forward(model, q, TOKENS)
    assert np.isfinite(np.asarray(logits)).all()


def _with_router_rule(algorithm: str) -> Recipe:
    rules = RECIPES["gptq"].to_dict()["rules"]
    router = {"pattern": "mlp/gate/weight$", "weight": "int8", "algorithm": algorithm}
    return Recipe.from_dict({"name": "router", "rules": [rules[0], router, rules[1]]})


def test_a_router_rule_is_data_free_or_an_error():
    """The router is no matmul kernel the calibration pass sees: a data-free rule on it
    quantizes it as `jquant.quantize` would (GPTQ folds nothing), a calibrated one is an
    error naming it."""
    from jquant import quantize

    model, params = _model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, _ = quantize_model(model, params, _with_router_rule("rtn"), TOKENS, progress=False)
    alone = quantize(params, Recipe.from_dict({"name": "r", "rules": [
        _with_router_rule("rtn").rules[1].to_dict()]}))  # fmt: skip
    for i in range(2):
        got = q["layers"][i]["mlp"]["gate"]["weight"].get_value()
        want = alone["layers"][i]["mlp"]["gate"]["weight"].get_value()
        assert isinstance(got, QArray)
        np.testing.assert_array_equal(got.codes(), want.codes())
    with pytest.raises(ValueError, match="layers/0/mlp/gate/weight: gptq needs the inputs of "
                                         "a matmul"):  # fmt: skip
        quantize_model(model, params, _with_router_rule("gptq"), TOKENS, progress=False)


FOLD_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", FOLD_FAMILIES)
def test_moe_folds_leave_the_float_model_unchanged(family):
    """(d) Every fold of every layer (the MLP norm into the router, the experts' gate/up and
    the shared expert and its gate; each expert's up_proj into its down_proj with its own
    scales) with random scales: the float logits do not move, and the router's weight did
    change."""
    model, params = _model(family)
    before = np.asarray(blocks.layerwise_forward(model, params, TOKENS))
    folded = jax.tree.map(lambda v: v, params)
    rng = np.random.default_rng(2)
    for i in range(model.config.num_layers):
        state = blocks.layer_params(folded, i)
        for fold in llama_folds(model.config, i):
            src = state
            for key in fold.source.split("/"):
                src = src[key]
            shape = src.get_value().shape
            shape = shape[:1] + shape[2:] if fold.experts else shape[-1:]
            apply_fold(state, fold, jnp.asarray(rng.uniform(0.2, 5.0, shape), jnp.float32))
    after = np.asarray(blocks.layerwise_forward(model, folded, TOKENS))
    np.testing.assert_allclose(after, before, rtol=0, atol=2e-5 * np.abs(before).max())
    i = model.config.moe_layers[0]
    router = lambda p: np.asarray(p["layers"][i]["mlp"]["gate"]["weight"].get_value())  # noqa: E731
    assert not np.allclose(router(folded), router(params))


def _sampled(model, params, rows: int, length: int, seed: int) -> np.ndarray:
    """``(rows, length)`` token ids sampled from the float model (temperature 1)."""
    from jquant.models import generate

    prompts = [[int(t)] for t in np.random.default_rng(seed).integers(3, VOCAB, rows)]
    out = generate(model, params, prompts, max_new_tokens=length - 1, temperature=1.0,
                   stop_tokens=(), seed=seed).sequences()  # fmt: skip
    return np.asarray([p + s for p, s in zip(prompts, out)])


def test_awq_gptq_perplexity_is_finite_and_better_than_rtn():
    """(d) Qwen2-MoE, its LM head scaled up (confident predictions, so that quantization
    moves perplexity), calibrated on 64 x 16 tokens it samples (about 500 rows per expert:
    far fewer, GPTQ fits the calibration rows of a 48-wide expert and loses to RTN on other
    text), AWQ + GPTQ uint4 g16: the MoE layer's norm was folded, and perplexity on 32 x 32
    other sampled tokens is finite, above the float model's and below RTN's."""
    from jquant import quantize

    model, params = _model("qwen2_moe")
    head = params["lm_head"]["kernel"]
    head.set_value(head.get_value() * 10.0)
    calib, text = _sampled(model, params, 64, 16, 1), _sampled(model, params, 32, 32, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPTQ's dampening notes on tiny layers
        q, _ = quantize_model(model, params, RECIPES["awq+gptq"], calib, progress=False)
    norm = lambda p: np.asarray(p["layers"][1]["post_attention_layernorm"]["scale"].get_value())  # noqa: E731
    assert not np.allclose(norm(q), norm(params))
    rtn = quantize(params, _recipe("rtn", weight="uint4", group_size=16))
    ppl = {name: perplexity(model, p, text.ravel().tolist(), seq_len=32,
                            progress=False).perplexity
           for name, p in (("float", params), ("awq+gptq", q), ("rtn", rtn))}  # fmt: skip
    assert all(np.isfinite(v) for v in ppl.values()), ppl
    assert ppl["float"] < ppl["awq+gptq"] < ppl["rtn"], ppl  # measured 2.74, 3.06, 3.28


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_algorithm_quantizes_every_expert(quantized, family, recipe):
    """(e) Each recipe runs end to end on each family: every expert stack of every MoE layer
    is one QArray ``(E, K, N)`` of the rule's format (no expert float), the shared expert and
    its gate are quantized too, nothing is NaN, and the report has a row per stack."""
    model, params, q, report, _ = quantized(family, recipe)
    config = model.config
    rule = RECIPES[recipe].rules[-1]
    paths = {r.path for r in report.rows}
    for i in range(config.num_layers):
        mlp = q["layers"][i]["mlp"]
        kernels = [f"experts/{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        if not config.is_moe(i):
            assert "experts" not in mlp
            continue
        if config.shared_expert_intermediate_size:
            kernels += ["shared_expert/gate_proj", "shared_expert/up_proj",
                        "shared_expert/down_proj", "shared_expert_gate"]  # fmt: skip
        for k in kernels:
            node = mlp
            for key in k.split("/"):
                node = node[key]
            v = node["kernel"].get_value()
            assert isinstance(v, QArray) and v.qtype == rule.weight, (i, k, v)
            assert np.isfinite(np.asarray(v.dequantize())).all()
            assert f"layers/{i}/mlp/{k}/kernel" in paths
        stack = mlp["experts"]["up_proj"]["kernel"].get_value()
        assert stack.shape == (config.num_experts, config.hidden_size,
                               config.moe_intermediate_size or config.intermediate_size)
        assert not isinstance(mlp["gate"]["weight"].get_value(), QArray)  # the router: float
    assert np.isfinite(np.asarray(blocks.layerwise_forward(model, q, TOKENS))).all()


def _write_hf(directory, family: str, params) -> None:
    """An HF checkpoint directory as transformers' save_pretrained writes an MoE model: one
    tensor per expert and projection, and config.json."""
    import json

    from safetensors.numpy import save_file

    from jquant.models import params_to_hf

    tensors = {}
    for name, value in params_to_hf(params).items():
        value = np.asarray(value)  # safetensors writes a transposed view's buffer as it is
        if ".mlp.experts." in name:
            layer, proj = name.split(".mlp.experts.")
            for e in range(value.shape[0]):
                tensors[f"{layer}.mlp.experts.{e}.{proj}"] = np.ascontiguousarray(value[e])
        else:
            tensors[name] = np.ascontiguousarray(value)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {**BASE, **FAMILIES[family], "max_position_embeddings": 128}
    (directory / "config.json").write_text(json.dumps(config))


def test_streamed_moe_checkpoint_equals_the_in_memory_quantization(quantized, tmp_path):
    """`quantize_to_disk` (tensors read lazily, a layer at a time, each with its own
    structure: Qwen2-MoE's dense layer 0, then its MoE layer) writes exactly the arrays
    `quantize_model` makes of the same model, AWQ + GPTQ."""
    from jquant.calib.stream import quantize_to_disk
    from jquant.io.packed import read_packed
    from jquant.tree import leaves

    _, params, q, report, _ = quantized("qwen2_moe", "awq+gptq")
    (tmp_path / "src").mkdir()
    _write_hf(tmp_path / "src", "qwen2_moe", params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, streamed = quantize_to_disk(tmp_path / "src", RECIPES["awq+gptq"], tmp_path / "q",
                                         tokens=TOKENS, progress=False)  # fmt: skip
    got, _, _ = read_packed(out)
    want = dict(leaves(q))
    assert set(got) == set(want)
    for path, value in want.items():
        for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(value), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    assert [r["expert_tokens"] for r in streamed["rows"]] == [r.expert_tokens for r in report.rows]
