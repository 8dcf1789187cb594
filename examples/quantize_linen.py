"""Quantize a stock Flax Linen model with a recipe and run it unmodified.

    python examples/quantize_linen.py [--recipe w8a16 | --recipe my.yaml] [--tiny]

The model is plain Linen (Embed, MultiHeadDotProductAttention, Dense, LayerNorm): nothing
in it knows about jquant. `jquant.quantize` rewrites its params, `jquant.apply` runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn

import jquant

# Int4 g128, with the attention output kernels grouped along head_dim (see the YAML).
DEFAULT_RECIPE = str(Path(__file__).resolve().parents[1] / "configs/examples/w4a16-flax.yaml")


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then a GELU MLP."""

    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        h = nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.dim)(h)


class TinyLM(nn.Module):
    """Token ids → logits, with the LM head tied to the embedding table."""

    vocab: int
    dim: int
    depth: int
    heads: int

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.dim)
        x = embed(ids)
        for _ in range(self.depth):
            x = Block(self.dim, self.heads)(x)
        return embed.attend(nn.LayerNorm()(x))


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
    model = TinyLM(args.vocab, args.dim, args.depth, args.heads)
    ids = jax.random.randint(jax.random.key(1), (2, args.seq_len), 0, args.vocab)
    params = jax.jit(model.init)(jax.random.key(0), ids)

    recipe = jquant.Recipe.load(args.recipe)
    qparams, rows = jquant.quantize(params, recipe, report=True)
    print(jquant.format_report(rows))

    y_float = model.apply(params, ids)
    y_quant = jquant.apply(model, qparams, ids)  # stock layers run on the QArrays
    delta = float(jnp.max(jnp.abs(y_quant - y_float)))
    rel = float(jnp.linalg.norm(y_quant - y_float) / jnp.linalg.norm(y_float))
    print(f"\nrecipe {recipe.name}: max |Δ logits| vs float = {delta:.3e} "
          f"(max |logit| {float(jnp.max(jnp.abs(y_float))):.3e}; ‖Δ‖/‖y‖ = {rel:.2%})")
    return {"model": model, "params": params, "qparams": qparams, "ids": ids, "rows": rows,
            "logits": y_quant, "max_delta": delta, "rel_delta": rel}


if __name__ == "__main__":
    main()
