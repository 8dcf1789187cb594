"""Memory of real mixture-of-experts models at every shipped recipe: one layer's experts, and
the whole model, in all and read per token.

    python benchmarks/moe_memory.py                 # prints a markdown table
    python benchmarks/moe_memory.py --out t.json    # and writes the rows

Nothing is allocated: each model is built abstractly (`jquant.models.abstract_model`, bf16
parameters from its Hugging Face config) and quantized under `jax.eval_shape`, and
`jquant.memory_report` weighs the result (QArrays at their true storage: codes, scales, zero
points). "Active" counts ``k`` of the ``E`` experts of each stack, as one token reads them.

Calibrated recipes store exactly what their format does, whatever the algorithm, so each
rule's algorithm is replaced by round-to-nearest here; a rotated recipe is priced without
its rotation (a rotation changes values, not shapes).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jquant
from jquant import tree
from jquant.models import LlamaConfig, abstract_model
from jquant.recipe import Recipe

# Hugging Face configs of the models' published checkpoints (the fields the model reads).
MODELS = {
    "Qwen3-30B-A3B": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False),
    "Mixtral-8x7B": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, tie_word_embeddings=False),
}  # fmt: skip

LAYER = "layers/0/mlp/experts/"


def storage_recipe(name: str) -> Recipe:
    """The shipped recipe ``name`` with every rule's algorithm round-to-nearest and no rotation
    (the same formats, so the same bytes)."""
    recipe = Recipe.load(name)
    rules = tuple(r if r.skip else dataclasses.replace(r, algorithm="rtn", algorithm_args={})
                  for r in recipe.rules)  # fmt: skip
    return dataclasses.replace(recipe, rules=rules, rotation=None)


def price(config: dict, recipe: str | None) -> dict:
    """GB of one layer's expert stacks and of the whole model, in all and active, under
    ``recipe`` (None: the bf16 checkpoint)."""
    abstract = nnx.state(abstract_model(LlamaConfig.from_hf(config), param_dtype=jnp.bfloat16))
    if recipe is not None:
        quantize = functools.partial(jquant.quantize, recipe=storage_recipe(recipe))
        abstract = jax.eval_shape(quantize, abstract)
    k = config["num_experts_per_tok"]
    whole = jquant.memory_report(abstract, config=config, experts_per_token=k)
    experts = {p: v for p, v in tree.leaves(abstract) if p.startswith(LAYER)}
    layer = jquant.memory_report(experts, layers=1, kv_width=1, experts_per_token=k)
    return {"recipe": recipe or "bfloat16", "layer_gb": layer.weight_bytes / 1e9,
            "layer_active_gb": layer.active_bytes / 1e9, "model_gb": whole.weight_bytes / 1e9,
            "model_active_gb": whole.active_bytes / 1e9, "weights": whole.weight_elements,
            "active_weights": whole.active_elements}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default=",".join(Recipe.list_shipped()),
                   help="comma-separated shipped recipes (default: all)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)
    rows = []
    for model, config in MODELS.items():
        print(f"\n### {model}\n")
        print("| recipe | one layer's experts, GB | active per token | whole model, GB | "
              "active per token |\n|---|---:|---:|---:|---:|")  # fmt: skip
        for recipe in [None, *args.recipes.split(",")]:
            row = {"model": model, **price(config, recipe)}
            rows.append(row)
            print(f"| {row['recipe']} | {row['layer_gb']:.3f} | {row['layer_active_gb']:.4f} | "
                  f"{row['model_gb']:.2f} | {row['model_active_gb']:.2f} |")  # fmt: skip
        print(f"\n{rows[-1]['weights']:,} weights, {rows[-1]['active_weights']:,} active.")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
