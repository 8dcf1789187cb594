"""Calibrated quantization of tiny random MoE models: perplexity against RTN by calibration size.

Each family (tests/models/test_moe.py's shapes: hidden 32, 4 experts of width 48, top 2) gets
random weights, routers scaled so the tokens spread and an LM head scaled x10 (confident
predictions, so that quantization moves perplexity). Calibration windows of 16 tokens and a
text of 32 x 32 tokens are sampled from the float model; every recipe is uint4 g16.

    python benchmarks/moe_calib.py --windows 8 64

Quality only (no timings). A tiny random model says how the pieces behave, not what a real
model gains.
"""

from __future__ import annotations

import argparse
import warnings

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import quantize
from jquant.calib import quantize_model
from jquant.eval.perplexity import perplexity
from jquant.models import LlamaConfig, generate, init_model
from jquant.recipe import Recipe

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
FAMILIES = {
    "mixtral": dict(model_type="mixtral", num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_hidden_layers=2, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=48, mlp_only_layers=[0]),
    "qwen3_moe": dict(model_type="qwen3_moe", num_hidden_layers=3, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
                      decoder_sparse_step=2, mlp_only_layers=[2]),
}  # fmt: skip
RULE = dict(weight="uint4", group_size=16)
METHODS = {  # name: (rule settings, experts settings)
    "gptq": ({"algorithm": "gptq"}, {}),
    "gptq, tokens: all": ({"algorithm": "gptq"}, {"tokens": "all"}),
    "awq+gptq": ({"algorithm": "gptq", "algorithm_args": {"awq": True}}, {}),
}


def build(family: str):
    """(model, params): weights N(0, 0.1), norms 1 + N(0, 0.2), routers N(0, 2), head x10."""
    model = init_model(LlamaConfig.from_hf({**BASE, **FAMILIES[family]}), seed=0)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        std = {"scale": 0.2, "weight": 2.0}.get(path[-1], 0.1)
        value = std * rng.standard_normal(shape) + (path[-1] == "scale")
        var.set_value(jnp.asarray(value * (10.0 if path[0] == "lm_head" else 1.0), jnp.float32))
    return model, params


def sample(model, params, rows: int, length: int, seed: int) -> np.ndarray:
    prompts = [[int(t)] for t in np.random.default_rng(seed).integers(3, 96, rows)]
    out = generate(model, params, prompts, max_new_tokens=length - 1, temperature=1.0,
                   stop_tokens=(), seed=seed).sequences()  # fmt: skip
    return np.asarray([p + s for p, s in zip(prompts, out)])


def run(families, windows, methods=tuple(METHODS)) -> list[dict]:
    """One row per family and method (float and RTN once, each calibrated method per
    calibration size): its perplexity on the family's sampled text."""
    return [row for family in families for row in _family(family, windows, methods)]


def _family(family: str, windows, methods) -> list[dict]:
    model, params = build(family)
    text = sample(model, params, 32, 32, 2).ravel().tolist()

    def row(method, n, p):
        ppl = perplexity(model, p, text, seq_len=32, progress=False).perplexity
        return dict(family=family, method=method, windows=n, perplexity=ppl)

    rows = [row("float", 0, params), row("rtn", 0, quantize(params, _recipe("rtn", {}, {})))]
    for n in windows:
        calib = sample(model, params, n, 16, 1)
        for name in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GPTQ's dampening notes on tiny layers
                q, _ = quantize_model(model, params, _recipe(name, *METHODS[name]), calib,
                                      progress=False)  # fmt: skip
            rows.append(row(name, n, q))
    return rows


def _recipe(name: str, rule: dict, experts: dict) -> Recipe:
    return Recipe.from_dict({"name": name, "experts": experts, "rules": [
        {"pattern": "(?i)embed|lm_head", "skip": True}, {"pattern": "kernel$", **RULE, **rule}]})


def format_table(rows) -> str:
    lines = ["| family | method | calibration tokens | perplexity |", "|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['method']} | {16 * r['windows'] or '-'} | "
              f"{r['perplexity']:.3f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--windows", nargs="+", type=int, default=[8, 64])
    args = parser.parse_args()
    print(format_table(run(args.families, args.windows)))
