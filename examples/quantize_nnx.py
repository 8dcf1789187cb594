"""Quantize a stock Flax NNX model with a recipe and run it unmodified.

    python examples/quantize_nnx.py [--recipe w8a16 | --recipe my.yaml] [--tiny]

`nnx.split` the model, `jquant.quantize` the State (QArrays replace the selected kernels),
`nnx.merge` it back, and call the model under `jquant.nnx_quantized()`: stock `nnx.Linear`,
`nnx.LinearGeneral` (attention) and `nnx.Embed` then compute through `jquant.ops`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import jquant

# Int4 g128, with the attention output kernels grouped along head_dim (see the YAML).
DEFAULT_RECIPE = str(Path(__file__).resolve().parents[1] / "configs/examples/w4a16-flax.yaml")


class Block(nnx.Module):
    """Pre-norm transformer block: self-attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class TinyLM(nnx.Module):
    """Token ids → logits, with the LM head tied to the embedding table."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.embed.attend(self.norm(x))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="shipped recipe name or YAML path")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--tiny", action="store_true", help="a small model (smoke tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.dim, args.depth, args.heads, args.vocab, args.seq_len = 128, 2, 4, 256, 16
    return args


def main(argv=None) -> dict:
    """Runs the example; returns what it printed as numbers (for the smoke test)."""
    args = parse_args(argv)
    model = TinyLM(args.vocab, args.dim, args.depth, args.heads, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, args.seq_len), 0, args.vocab)

    recipe = jquant.Recipe.load(args.recipe)
    graphdef, state = nnx.split(model)
    qstate, rows = jquant.quantize(state, recipe, report=True)
    print(jquant.format_report(rows))
    qmodel = nnx.merge(graphdef, qstate)

    y_float = model(ids)
    with jquant.nnx_quantized():  # or: jquant.nnx_apply(qmodel, ids)
        y_quant = qmodel(ids)
    delta = float(jnp.max(jnp.abs(y_quant - y_float)))
    rel = float(jnp.linalg.norm(y_quant - y_float) / jnp.linalg.norm(y_float))
    print(f"\nrecipe {recipe.name}: max |Δ logits| vs float = {delta:.3e} "
          f"(max |logit| {float(jnp.max(jnp.abs(y_float))):.3e}; ‖Δ‖/‖y‖ = {rel:.2%})")
    return {"model": model, "graphdef": graphdef, "qstate": qstate, "ids": ids, "rows": rows,
            "logits": y_quant, "max_delta": delta, "rel_delta": rel}


if __name__ == "__main__":
    main()
