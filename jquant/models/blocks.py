"""The Llama model as stages: embedding, one program per decoder layer, final norm + head.

`jquant.models.forward` compiles the whole unrolled model as one program (what decoding
wants). Calibration and perplexity instead run it stage by stage: every decoder layer of
the same structure (the same QArray formats) reuses one compiled program, so a model
compiles in about the time of one layer, whatever its depth and recipe count, and a
calibrated quantization can run the calibration batch through layer ``i`` before it
quantizes layer ``i + 1``. Without a KV cache the stages compute exactly what
``Llama.__call__`` computes (the same ops in the same order, only split into programs).

>>> logits = layerwise_forward(model, params, tokens)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import ops
from jquant.models.llama import _default_positions, layer_inputs, softcap_logits


class Context(NamedTuple):
    """What every decoder layer needs besides its input: RoPE tables and the mask.

    A model with sliding-window layers has a second set in ``local``; `Context.at` picks a
    layer's own.
    """

    cos: jax.Array  # (B, S, head_dim) float32
    sin: jax.Array
    allowed: jax.Array  # (B, S, S) bool
    local: tuple | None = None  # (cos, sin, allowed) of the sliding-window layers

    def at(self, config, layer: int) -> Context:
        """The context of decoder layer ``layer`` (its RoPE tables and mask)."""
        if self.local is not None and config.is_sliding(layer):
            return Context(*self.local)
        return Context(self.cos, self.sin, self.allowed)


def embed(model, params: nnx.State, tokens, mask=None) -> tuple[jax.Array, Context]:
    """The input of layer 0 and the layers' shared `Context` for ``tokens (B, S)``."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
    return _embed_jit(nnx.graphdef(model.embed_tokens), params["embed_tokens"], tokens, mask,
                      config=model.config, dtype=model.dtype)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "config", "dtype"))
def _embed_jit(graphdef, embed_params, tokens, mask, *, config, dtype):
    positions = _default_positions(mask, None)
    full, local, _ = layer_inputs(config, positions, mask, None)
    x = nnx.merge(graphdef, embed_params)(tokens, dtype)
    return x, Context(*full, local=local)


def layer_params(params: nnx.State, i: int) -> nnx.State:
    """The parameter State of decoder layer ``i`` (paths relative to ``layers/i/``)."""
    return params["layers"][i]


def layer_graphdef(model) -> nnx.GraphDef:
    """The structure shared by every decoder layer of ``model``."""
    return nnx.graphdef(model.layers[0])


def apply_layer(graphdef, layer_state: nnx.State, x, ctx: Context) -> jax.Array:
    """Un-jitted: decoder layer ``graphdef`` with ``layer_state`` on ``x (B, S, D)``;
    ``ctx`` is the layer's own (`Context.at`) in a model with sliding-window layers."""
    y, _ = nnx.merge(graphdef, layer_state)(x, ctx.cos, ctx.sin, ctx.allowed, None, 0)
    return y


run_layer = jax.jit(apply_layer, static_argnames=("graphdef",))
run_layer.__doc__ = "Jitted `apply_layer`: one compilation per layer structure and shape."


def head(model, params: nnx.State, x) -> jax.Array:
    """Final norm and LM head: float32 logits ``(B, S, V)`` of the last layer's output."""
    tied = model.config.tie_word_embeddings
    head_params = params["embed_tokens"] if tied else params["lm_head"]
    return _head_jit(nnx.graphdef(model.norm), params["norm"], head_params, x, tied=tied,
                     softcap=model.config.final_logit_softcap)  # fmt: skip


def apply_head(norm_graphdef, norm_params, head_params, x, *, tied: bool,
               softcap: float | None = None) -> jax.Array:  # fmt: skip
    """Un-jitted final norm and LM head (tied: the embedding table's State), soft-capped
    by ``softcap`` (the config's `final_logit_softcap`)."""
    x = nnx.merge(norm_graphdef, norm_params)(x)
    if tied:
        table = head_params["embedding"].get_value()
        logits = ops.qattend(x, table, preferred_element_type=jnp.float32)
    else:
        kernel = head_params["kernel"].get_value()
        logits = ops.qdot(x, kernel, preferred_element_type=jnp.float32)
    return softcap_logits(logits, softcap)


_head_jit = jax.jit(apply_head, static_argnames=("norm_graphdef", "tied", "softcap"))


def layerwise_forward(model, params: nnx.State, tokens, mask=None) -> jax.Array:
    """``forward(model, params, tokens)[0]`` (no cache) run stage by stage.

    Float32 logits ``(B, S, V)``. Layers of equal structure share one compiled program.
    """
    x, ctx = embed(model, params, tokens, mask)
    graphdef = layer_graphdef(model)
    for i in range(model.config.num_layers):
        x = run_layer(graphdef, layer_params(params, i), x, ctx.at(model.config, i))
    return head(model, params, x)
