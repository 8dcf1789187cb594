"""Bit allocation on mixture-of-experts models: each expert stack one choice, priced expert
by expert.

References: each expert's input second moment from the rows that NumPy routes to it (float64
softmax and top-k of the float router); each expert's squared output gradients from
``jax.grad`` through the whole model with the MoE blocks replaced by a dense reference
(every expert on every token, masked by the routing, a perturbation added at each
projection's output); a stack's price as the NumPy sum over its experts of each expert's
cost, each expert quantized alone by `jquant.algorithms` (GPTQ, or RTN for an expert with no
rows); the allocation's bytes against `jquant.memory_report` of the model its recipe
quantizes; ``jquant allocate --json`` on an MoE model for its rules and byte counts. Models
are tiny random Mixtral and Qwen2-MoE ones built from HF config dicts, the routers scaled up
so that the tokens spread over the experts.
"""

from __future__ import annotations

import json
import math
import re
import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jquant import algorithms, alloc, memory_report, tree
from jquant.alloc import pricing as P
from jquant.alloc import sensitivity as S
from jquant.calib import quantize_model
from jquant.eval.perplexity import perplexity
from jquant.models import blocks
from jquant.models.cache import NoCache
from jquant.models.moe import MoE
from jquant.recipe import Rule

_tiny = runpy.run_path(str(Path(__file__).parents[1] / "tiny_moe.py"))

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
            tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    # Both layers sparse, top-2 of 4, renormalized.
    "mixtral": dict(model_type="mixtral", num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2),
    # Layer 0 dense, layer 1 sparse with a shared expert; top-2 of 4 not renormalized.
    "qwen2_moe": dict(model_type="qwen2_moe", num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=48, norm_topk_prob=False,
                      mlp_only_layers=[0]),
}  # fmt: skip
TOKENS = np.random.default_rng(0).integers(3, VOCAB, (4, 16))
PROJ = ("gate_proj", "up_proj", "down_proj")
U4 = P.candidate("uint4-g16", weight="uint4", group_size=16, algorithm="gptq")


def _model(family: str, *, dead: bool = False, **config):
    """`random_moe` of ``family`` (``config`` overrides HF config keys)."""
    return _tiny["random_moe"]({**BASE, **FAMILIES[family], **config}, dead=dead)


def _moe_layers(model, params) -> list[int]:
    paths = dict(tree.leaves(params))
    return [i for i in range(model.config.num_layers)
            if f"layers/{i}/mlp/experts/gate_proj/kernel" in paths]  # fmt: skip


def _np(params, path) -> np.ndarray:
    return np.asarray(tree.unwrap(dict(tree.leaves(params))[path]), np.float64)


def _moe_input(model, params, i) -> np.ndarray:
    """The float input ``(T, D)`` of layer ``i``'s MoE block (after attention and its norm),
    by the float model's own layers."""
    x, ctxs = blocks.embed(model, params, jnp.asarray(TOKENS))
    for j in range(i):
        x = blocks.run_layer(blocks.layer_graphdef(model, j), blocks.layer_params(params, j), x,
                             ctxs.at(model.config, j))  # fmt: skip
    layer = nnx.merge(blocks.layer_graphdef(model, i), blocks.layer_params(params, i))
    h, _ = layer.self_attn(layer.input_layernorm(x), ctxs.at(model.config, i), NoCache(), 0)
    out = layer.mlp_norm(layer.attn_residual(x, h))
    return np.asarray(out, np.float64).reshape(-1, model.config.hidden_size)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _np_routed_rows(model, params, i):
    """Per expert of layer ``i``, in float64: (its gate/up input rows, its down input rows),
    the rows of the tokens whose top k (NumPy softmax of the float router) include it."""
    xm = _moe_input(model, params, i)
    router = _np(params, f"layers/{i}/mlp/gate/weight")
    logits = xm @ router.T
    k = model.config.num_experts_per_tok
    ordered = np.sort(logits, axis=1)[:, ::-1]
    gap = ordered[:, k - 1] - ordered[:, k]
    # No near-tie, so the routing is clear; exact ties (copied router rows) keep the lower
    # index, as top-k does.
    assert np.all((gap > 1e-3) | (gap == 0))
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    gate, up = (_np(params, f"layers/{i}/mlp/experts/{p}/kernel") for p in PROJ[:2])
    out = []
    for e in range(router.shape[0]):
        rows = xm[np.any(top == e, axis=1)]
        out.append((rows, _silu(rows @ gate[e]) * (rows @ up[e])))
    return out


def _reference_moe(deltas, current):
    """A dense MoE block: every expert on every token, masked by the routing, with
    ``deltas[(i, proj)]`` ``(T, E, N)`` added at each projection's output, ``i`` the layer
    being run (``current[0]``)."""

    def call(self, x):
        i = current[0]
        t = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        router = self.gate.weight.get_value().astype(jnp.float32)
        p = jax.nn.softmax(t @ router.T, axis=-1)
        top = jnp.argsort(-p, axis=-1)[:, : self.top_k]
        mask = jnp.zeros_like(p).at[jnp.arange(len(t))[:, None], top].set(1.0)
        w = p * mask
        if self.normalize:
            w = w / jnp.sum(w, axis=-1, keepdims=True)
        ex = self.experts
        wg, wu, wd = (getattr(ex, n).kernel.get_value().astype(jnp.float32) for n in PROJ)
        g = jnp.einsum("td,edf->tef", t, wg) + deltas[(i, "gate_proj")]
        u = jnp.einsum("td,edf->tef", t, wu) + deltas[(i, "up_proj")]
        y = jnp.einsum("tef,efd->ted", jax.nn.silu(g) * u, wd) + deltas[(i, "down_proj")]
        out = jnp.einsum("te,ted->td", w, y)
        if self.shared_expert is not None:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(t)) * self.shared_expert(t)
        return out.reshape(x.shape).astype(x.dtype)

    return call


def _reference_grad_sq(model, params, monkeypatch):
    """``({(layer, proj): G (E, N)}, mean CE)``: per expert the squared loss gradients at
    its projection's outputs summed over the tokens routed to it, over the predicted
    tokens, by ``jax.grad`` through the whole model with the dense reference MoE."""
    layers = _moe_layers(model, params)
    c = model.config
    t = TOKENS.size
    width = {"gate_proj": c.moe_intermediate_size, "up_proj": c.moe_intermediate_size,
             "down_proj": c.hidden_size}  # fmt: skip
    deltas = {(i, p): jnp.zeros((t, c.num_experts, width[p])) for i in layers for p in PROJ}
    ids = jnp.asarray(TOKENS)
    current = [0]

    def loss(deltas):  # layer by layer, un-jitted: each MoE layer traced with its own deltas
        monkeypatch.setattr(MoE, "__call__", _reference_moe(deltas, current))
        x, ctxs = blocks.embed(model, params, ids)
        for i in range(c.num_layers):
            current[0] = i
            x = blocks.apply_layer(blocks.layer_graphdef(model, i), blocks.layer_params(
                params, i), x, ctxs.at(c, i))  # fmt: skip
        logits = blocks.head(model, params, x)[:, :-1]
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0]
        return jnp.sum(logz - picked)

    value, grads = jax.value_and_grad(loss)(deltas)
    monkeypatch.undo()
    n = TOKENS.shape[0] * (TOKENS.shape[1] - 1)
    gsq = {k: np.sum(np.asarray(g, np.float64) ** 2, axis=0) / n for k, g in grads.items()}
    return gsq, float(value) / n


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_statistics_equal_numpy_from_the_routed_rows(family, monkeypatch):
    """(1) Each expert's H (every entry, its diagonal among them) and row count equal NumPy's
    over the rows routed to it, and its G the whole-model gradients at its outputs summed
    over those rows; expert 3 of a router that never picks it has zeros. Every layer's MoE,
    gate/up and down."""
    for dead in (False, True):
        model, params = _model(family, dead=dead)
        got = S.collect(model, params, TOKENS, batch_size=2, progress=False)
        gsq, ce = _reference_grad_sq(model, params, monkeypatch)
        assert got.loss == pytest.approx(ce, rel=1e-5)
        assert got.positions == TOKENS.size
        layers = _moe_layers(model, params)
        assert layers == ([0, 1] if family == "mixtral" else [1])
        for i in layers:
            rows = _np_routed_rows(model, params, i)
            counts = [len(r) for r, _ in rows]
            assert (counts[3] == 0) == dead and sum(counts) == 2 * TOKENS.size
            for p, which in zip(PROJ, (0, 0, 1)):
                path = f"layers/{i}/mlp/experts/{p}/kernel"
                ks = got.kernels[path]
                np.testing.assert_array_equal(np.asarray(ks.calibration.count), counts)
                for e, r in enumerate(rows):
                    x = r[which]
                    h = x.T @ x / max(len(x), 1)
                    np.testing.assert_allclose(ks.calibration.hessian[e], h, rtol=1e-4,
                                               atol=1e-6, err_msg=f"{path} H {e}")  # fmt: skip
                    np.testing.assert_allclose(ks.grad_sq[e], gsq[(i, p)][e], rtol=2e-4,
                                               atol=1e-12, err_msg=f"{path} G {e}")  # fmt: skip
                if dead:
                    assert not np.any(np.asarray(ks.calibration.hessian[3]))
                    assert not np.any(ks.grad_sq[3])


def _np_cost(dw, h, g) -> float:
    return 0.5 * float(np.sum((h @ dw) * dw * g[None, :]))


@pytest.mark.parametrize("dead", [False, True], ids=["routed", "dead-expert"])
def test_stack_price_is_the_numpy_sum_over_experts(dead):
    """(2) A stack's price under GPTQ uint4 is the NumPy sum over its experts of
    ``½ Σ_j G_ej ΔW_eᵀ H_e ΔW_e``, each expert quantized alone on its own H (RTN for an
    expert without rows, priced with the means of the other experts' H and G); its bytes
    are the experts' QArrays'. A skip candidate is priced the same way."""
    model, params = _model("mixtral", dead=dead)
    stats = S.collect(model, params, TOKENS, batch_size=2, progress=False)
    bf16 = P.candidate("bf16", skip=True, dtype="bfloat16")
    priced = P.price(params, stats, [U4, bf16], [P.candidate("i8", weight="int8")],
                     progress=False)  # fmt: skip
    rule = U4.resolved("w")
    for p in PROJ:
        path = f"layers/1/mlp/experts/{p}/kernel"
        w = _np(params, path)
        ks = stats.kernels[path]
        count = np.asarray(ks.calibration.count)
        h = np.asarray(ks.calibration.hessian, np.float64)
        g = ks.grad_sq.astype(np.float64)
        live = count > 0
        assert live.sum() == (3 if dead else 4)
        want = want_bf16 = 0.0
        nbytes = 0
        for e in range(len(w)):
            calib = jax.tree.map(lambda a, e=e: a[e], ks.calibration)
            if live[e]:
                q = algorithms.run("gptq", jnp.asarray(w[e], jnp.float32), rule, path=path,
                                   calibration=calib)  # fmt: skip
                he, ge = h[e], g[e]
            else:
                q = algorithms.run("rtn", jnp.asarray(w[e], jnp.float32),
                                   Rule(pattern=".", weight="uint4", group_size=16).resolve(
                                       path, 2), path=path)  # fmt: skip
                he, ge = h[live].mean(axis=0), g[live].mean(axis=0)
                assert _np_cost(w[e] - np.asarray(q.dequantize(jnp.float32)), he, ge) > 0
            want += _np_cost(w[e] - np.asarray(q.dequantize(jnp.float32), np.float64), he, ge)
            w16 = np.asarray(jnp.asarray(w[e], jnp.bfloat16).astype(jnp.float32), np.float64)
            want_bf16 += _np_cost(w[e] - w16, he, ge)
            nbytes += q.nbytes
        assert priced[path]["uint4-g16"].cost == pytest.approx(want, rel=1e-4), path
        assert priced[path]["uint4-g16"].nbytes == nbytes
        assert priced[path]["bf16"].cost == pytest.approx(want_bf16, rel=1e-4), path
        assert priced[path]["bf16"].nbytes == w.size * 2


def test_allocation_within_budget_quantizes_and_evaluates():
    """(3) `measure` / `allocate` on Qwen2-MoE (a dense layer, an MoE layer with a shared
    expert): one choice per stack, the weights within the budget, total and active bytes
    equal to `jquant.memory_report`'s of the model its recipe quantizes, and that model's
    perplexity finite."""
    model, params = _model("qwen2_moe")
    i8 = P.candidate("int8", weight="int8", algorithm="gptq")
    table = alloc.measure(model, params, TOKENS, kernel_candidates=[U4, i8],
                          table_candidates=[P.candidate("int8", weight="int8"),
                                            P.candidate("bfloat16", skip=True, dtype="bfloat16")],
                          cache=False, progress=False)  # fmt: skip
    stacks = [f"layers/1/mlp/experts/{p}/kernel" for p in PROJ]
    assert table.experts == dict.fromkeys(stacks, 4) and table.experts_per_token == 2
    small = table.smallest_bytes()
    large = table.fixed_bytes + sum(max(o.nbytes for o in opts.values())
                                    for opts in table.options.values())  # fmt: skip
    budget = alloc.budget_bytes(table, target_size=(small + large) // 2)  # a mix of both
    choice = alloc.allocate(table, budget)
    assert choice.weight_bytes <= budget
    assert set(stacks) <= set(choice.choice) and set(choice.choice.values()) == {"uint4-g16",
                                                                                 "int8"}
    assert "active per token (2 of 4 experts)" in choice.summary()
    recipe = choice.recipe("moe-mix", awq=False)
    q, _ = quantize_model(model, params, recipe, TOKENS, progress=False)
    report = memory_report(q, experts_per_token=2)
    assert report.weight_bytes == choice.weight_bytes
    assert report.active_bytes == choice.active_bytes < choice.weight_bytes
    text = np.random.default_rng(5).integers(3, VOCAB, 256).tolist()
    ppl = perplexity(model, q, text, seq_len=32, progress=False).perplexity
    assert math.isfinite(ppl) and ppl > 1.0


def test_cli_allocate_prints_total_and_active_bytes(capsys, tiny_model, tmp_path, monkeypatch):
    """``jquant allocate --json`` on a Mixtral model (given by a stub as a source held in
    memory, with the tiny GGUF's tokenizer; the default g64 candidates, so 64 wide): a rule
    per expert stack, the weights within the budget, and the active bytes below them."""
    from jquant import models
    from jquant.calib.driver import ModelSource
    from jquant.cli import allocate, main

    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path / "cache"))
    _, _, tokenizer, tiny_config = models.load(tiny_model, with_config=True)
    wide = dict(vocab_size=tiny_config["vocab_size"], hidden_size=64, intermediate_size=64,
                head_dim=16)  # fmt: skip
    model, params = _model("mixtral", **wide)
    hf = {**BASE, **FAMILIES["mixtral"], **wide}
    monkeypatch.setattr(allocate, "_float_source",
                        lambda args: (ModelSource(model, params), tokenizer, hf))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}, then" for i in range(300)))
    recipe = tmp_path / "r.yaml"
    assert main(["allocate", "mixtral-stub", "--target-bits", "7", "--calib", str(text),
                 "--calib-samples", "2", "--calib-seq-len", "16", "--formats", "uint4-g64,int8",
                 "--json", "-o", str(recipe)]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    stacks = [f"layers/{i}/mlp/experts/{p}/kernel" for i in (0, 1) for p in PROJ]
    assert set(stacks) <= set(out["choice"])
    assert out["active_bytes"] < out["weight_bytes"] <= out["budget_bytes"]
    patterns = [r["pattern"] for r in yaml.safe_load(recipe.read_text())["rules"]]
    assert all(f"^{re.escape(p)}$" in patterns for p in stacks)
