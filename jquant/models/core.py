"""The one forward: embedding, decoder layers over a cache, final norm and LM head.

Every caller runs the model through these functions: `Llama.__call__` and `forward`
(training, QAT, scoring), `generate` (a dense `KVCache`), the serving runner (a `PagedView`),
and, one layer at a time, evaluation and calibration (`jquant.models.blocks`). What differs
between them is data: the cache kind (`jquant.models.cache`) and how the decoder layers'
parameters are laid out:

- **stacked**: every layer's State stacked along a leading axis, run by one ``lax.scan``
  (compiles in about the time of one layer, whatever the depth);
- **unrolled**: a list of States, run one after the other; needed where a recipe makes
  layers differ (formats, group sizes: their trees cannot be stacked).

`prepare` picks stacked wherever the layers' trees match. A new layer kind changes
`DecoderLayer` (``jquant.models.llama``); a new cache kind implements the three methods of
`jquant.models.cache.Cache`; neither touches this file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.models.attention import rope_tables, softcap_logits
from jquant.models.cache import Cache, NoCache
from jquant.models.config import LlamaConfig
from jquant.qarray import QArray

#: The window of a full-attention layer in a model with sliding ones: covers any position.
NO_WINDOW = np.iinfo(np.int32).max


class LayerContext(NamedTuple):
    """What a decoder layer needs besides its input: RoPE tables and the attention mask."""

    cos: jax.Array  # (B, S, head_dim) float32
    sin: jax.Array
    allowed: jax.Array  # (B, S, T) bool
    # The layer's sliding window, int32 (`NO_WINDOW` for a full layer), for a cache that
    # attends by positions rather than `allowed` (the paged kernel); None: no sliding layers.
    window: jax.Array | None = None


class Contexts(NamedTuple):
    """The `LayerContext` of full-attention layers and of sliding-window ones (None when
    the model has none); `at` picks a layer's own."""

    full: LayerContext
    local: LayerContext | None = None

    def at(self, config: LlamaConfig, layer: int) -> LayerContext:
        return self.local if self.local is not None and config.is_sliding(layer) else self.full

    def select(self, sliding: jax.Array) -> LayerContext:
        """A traced layer's context under ``lax.scan`` (``sliding``: its traced flag)."""
        if self.local is None:
            return self.full
        return LayerContext(*(jnp.where(sliding, a, b) for a, b in zip(self.local, self.full)))


def begin(config: LlamaConfig, cache: Cache, mask: jax.Array, positions=None):
    """``(cache, Contexts)`` of one forward: the cache's positions and masks, with RoPE."""
    window = config.sliding_window if config.has_sliding else None
    cache, positions, allowed, in_window = cache.begin(mask, positions, window)
    full = LayerContext(*rope_tables(config, positions), allowed)
    local = None
    if in_window is not None:
        local = LayerContext(*rope_tables(config, positions, local=True), in_window,
                             jnp.int32(window))
        full = full._replace(window=jnp.int32(NO_WINDOW))
    return cache, Contexts(full, local)


@dataclasses.dataclass(frozen=True)
class Static:
    """The structure of a model that programs specialise on (hashable: a static argument)."""

    config: LlamaConfig
    embed: nnx.GraphDef
    layer: nnx.GraphDef  # the first decoder layer's (QArrays or arrays live in the States)
    norm: nnx.GraphDef
    dtype: Any  # activations' compute dtype
    layers: tuple | None = None  # every layer's GraphDef where they differ (dense and MoE
    #   layers mixed); None: all are `layer`

    def layer_at(self, i: int) -> nnx.GraphDef:
        """Decoder layer ``i``'s GraphDef."""
        return self.layer if self.layers is None else self.layers[i]

    @property
    def tied(self) -> bool:
        return self.config.tie_word_embeddings

    @classmethod
    def of(cls, module) -> Static:
        defs = tuple(nnx.graphdef(layer) for layer in module.layers)
        return cls(module.config, nnx.graphdef(module.embed_tokens), defs[0],
                   nnx.graphdef(module.norm), module.dtype,
                   None if len(set(defs)) == 1 else defs)  # fmt: skip


def weights(params, num_layers: int, *, stack: bool = True) -> dict:
    """A parameter State as the core reads it: ``{"embed", "layers", "norm"[, "head"]}``,
    the layers stacked when ``stack`` and their trees match (see `stack_layers`), else a
    list. A tied head reads the embedding table (kept once)."""
    layers = [params["layers"][i] for i in range(num_layers)]
    if stack:
        layers = stack_layers(layers)
    out = {"embed": params["embed_tokens"], "layers": layers, "norm": params["norm"]}
    if "lm_head" in params:
        out["head"] = params["lm_head"]
    return out


def stack_layers(states: list):
    """The layers' States stacked along a new leading axis (QArrays included) when they all
    have the same tree and shapes, else ``states`` as they are (a list: run unrolled)."""
    structures = {jax.tree.structure(s) for s in states}
    shapes = {tuple(np.shape(x) for x in jax.tree.leaves(s)) for s in states}
    if len(structures) != 1 or len(shapes) != 1:
        return list(states)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def is_stacked(layers) -> bool:
    return not isinstance(layers, list)


def embed(st: Static, w: dict, tokens: jax.Array) -> jax.Array:
    """The input of the first decoder layer."""
    return nnx.merge(st.embed, w["embed"])(tokens, st.dtype)


def run_layers(st: Static, layers, x, ctxs: Contexts, cache: Cache):
    """Every decoder layer on ``x (B, S, D)``: one ``lax.scan`` over stacked layers, else
    unrolled. Returns ``(x, cache)``."""
    config = st.config
    if not is_stacked(layers):
        for i, state in enumerate(layers):
            x, cache = nnx.merge(st.layer_at(i), state)(x, ctxs.at(config, i), cache, i)
        return x, cache

    def body(carry, xs):
        (x, cache), (state, i, sliding) = carry, xs
        return nnx.merge(st.layer, state)(x, ctxs.select(sliding), cache, i), None

    index = jnp.arange(config.num_layers, dtype=jnp.int32)
    sliding = jnp.asarray([config.is_sliding(i) for i in range(config.num_layers)])
    (x, cache), _ = jax.lax.scan(body, (x, cache), (layers, index, sliding))
    return x, cache


def hidden(st: Static, w: dict, tokens: jax.Array, cache: Cache | None = None, *,
           mask: jax.Array | None = None, positions: jax.Array | None = None):  # fmt: skip
    """The last decoder layer's output ``(B, S, D)`` for ``tokens (B, S)`` and the cache
    after them (`NoCache` when ``cache`` is None).

    Args:
      mask: ``(B, S)`` True for real tokens, False for padding (never a key); default all.
      positions: RoPE positions ``(B, S)``; default: the cache's own rule.
    """
    cache = NoCache() if cache is None else cache
    mask = jnp.ones(tokens.shape, jnp.bool_) if mask is None else mask.astype(jnp.bool_)
    cache, ctxs = begin(st.config, cache, mask, positions)
    x, cache = run_layers(st, w["layers"], embed(st, w, tokens), ctxs, cache)
    return x, cache.end(tokens.shape[1])


def head(norm, head_params, x: jax.Array, *, tied: bool, softcap: float | None) -> jax.Array:
    """The one LM head: final norm (a module), then the tied embedding table's transpose
    or ``lm_head``, soft-capped; float32 logits ``(B, S, V)``."""
    x = norm(x)
    if tied:
        logits = ops.qattend(x, head_params["embedding"].get_value(),
                             preferred_element_type=jnp.float32)  # fmt: skip
    else:
        logits = ops.qdot(x, head_params["kernel"].get_value(),
                          preferred_element_type=jnp.float32)  # fmt: skip
    return softcap_logits(logits, softcap)


def logits(st: Static, w: dict, x: jax.Array) -> jax.Array:
    """Float32 logits ``(B, S, V)`` of the last layer's output ``x``."""
    table = w["embed"] if st.tied else w["head"]
    return head(nnx.merge(st.norm, w["norm"]), table, x, tied=st.tied,
                softcap=st.config.final_logit_softcap)  # fmt: skip


def weight_bytes(w) -> int:
    """True storage of a weights tree (QArrays packed)."""
    leaves = jax.tree.leaves(w, is_leaf=lambda x: isinstance(x, QArray))
    return int(sum(x.nbytes for x in leaves))
