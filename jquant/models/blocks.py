"""The model as stages: embedding, one program per decoder layer, final norm + head.

Calibration, sensitivity and perplexity run the core forward (`jquant.models.core`) stage by
stage, through the same embedding, decoder-layer function and head: every decoder layer of
the same structure (the same QArray formats) reuses one compiled program, so a model
compiles in about the time of one layer whatever its recipe, and a calibrated quantization
can run the calibration batch through layer ``i`` before it quantizes layer ``i + 1``.

>>> logits = layerwise_forward(model, params, tokens)  # doctest: +SKIP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.models import core, moe
from jquant.models.cache import NoCache
from jquant.models.core import Contexts, LayerContext

#: The layers' shared inputs: ``Contexts.at(config, i)`` is layer ``i``'s `LayerContext`.
Context = Contexts


def embed(model, params: nnx.State, tokens, mask=None) -> tuple[jax.Array, Contexts]:
    """The input of layer 0 and the layers' `Contexts` for ``tokens (B, S)``."""
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, jnp.bool_) if mask is None else jnp.asarray(mask, jnp.bool_)
    return _embed_jit(core.Static.of(model), params["embed_tokens"], tokens, mask)


@functools.partial(jax.jit, static_argnames=("st",))
def _embed_jit(st, embed_params, tokens, mask):
    _, ctxs = core.begin(st.config, NoCache(), mask)
    return core.embed(st, {"embed": embed_params}, tokens), ctxs


def layer_params(params: nnx.State, i: int) -> nnx.State:
    """The parameter State of decoder layer ``i`` (paths relative to ``layers/i/``)."""
    return params["layers"][i]


def layer_graphdef(model, i: int) -> nnx.GraphDef:
    """The structure of decoder layer ``i`` of ``model`` (dense and MoE layers differ)."""
    return nnx.graphdef(model.layers[i])


def apply_layer(graphdef, layer_state: nnx.State, x, ctx: LayerContext, *,
                every_expert: bool = False) -> jax.Array:  # fmt: skip
    """Un-jitted: decoder layer ``graphdef`` with ``layer_state`` on ``x (B, S, D)`` without
    a cache; ``ctx`` is the layer's own (`Contexts.at`; a `Contexts` stands for its
    full-attention layers' context). ``every_expert`` sends each token to every expert of
    an MoE layer (`moe.route_to_every_expert`: calibration statistics, not the model)."""
    ctx = ctx.full if isinstance(ctx, Contexts) else ctx
    layer = nnx.merge(graphdef, layer_state)
    if every_expert:
        moe.route_to_every_expert(layer)
    y, _ = layer(x, ctx, NoCache(), 0)
    return y


run_layer = jax.jit(apply_layer, static_argnames=("graphdef", "every_expert"))
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
    by ``softcap`` (the config's `final_logit_softcap`): `core.head`."""
    norm = nnx.merge(norm_graphdef, norm_params)
    return core.head(norm, head_params, x, tied=tied, softcap=softcap)


_head_jit = jax.jit(apply_head, static_argnames=("norm_graphdef", "tied", "softcap"))


def layerwise_forward(model, params: nnx.State, tokens, mask=None) -> jax.Array:
    """``forward(model, params, tokens)[0]`` (no cache) run stage by stage.

    Float32 logits ``(B, S, V)``. Layers of equal structure share one compiled program.
    """
    x, ctx = embed(model, params, tokens, mask)
    for i in range(model.config.num_layers):  # dense and MoE layers may differ in structure
        graphdef = layer_graphdef(model, i)
        x = run_layer(graphdef, layer_params(params, i), x, ctx.at(model.config, i))
    return head(model, params, x)
