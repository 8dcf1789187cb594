"""The decoder of every supported family in Flax NNX, and a functional `forward` for jit.

Llama, Mistral, Qwen2/3, Gemma 1/2/3 and the mixture-of-experts Mixtral, Qwen2/3-MoE and
OLMoE (whose MLP is `jquant.models.moe.MoE` in some or all layers) share one skeleton; what
differs is data in `LlamaConfig` (see `jquant.models.config`), so this one file runs them all.

Every weight matmul goes through `jquant.ops` (`qdot`, `qembed`, `qattend`), so the same code
runs float parameters and quantized ones: `nnx.merge(graphdef, qparams)` with QArrays in the
State is all it takes.

Parameter paths (recipes match them; keep them stable; they follow HF's names)::

    embed_tokens/embedding                      (V, D)
    layers/{i}/self_attn/{q,k,v,o}_proj/kernel  (K, N)  + bias (N,): q/k/v if qkv_bias, o if o_bias
    layers/{i}/self_attn/{q,k}_norm/scale       (Dh,)    qk_norm only (qwen3, gemma3); the
                                                         whole projection's width with
                                                         qk_norm_whole (olmoe)
    layers/{i}/mlp/{gate,up,down}_proj/kernel   (K, N)   a dense layer; an MoE layer's
                                                         router and experts: jquant.models.moe
    layers/{i}/input_layernorm/scale            (D,)     before attention
    layers/{i}/post_attention_layernorm/scale   (D,)     before the MLP; with sandwich norms
                                                         (gemma2/3): after attention
    layers/{i}/pre_feedforward_layernorm/scale  (D,)     sandwich norms only: before the MLP
    layers/{i}/post_feedforward_layernorm/scale (D,)     sandwich norms only: after the MLP
    norm/scale                                  (D,)
    lm_head/kernel                              (D, V)   only when the head is not tied

The modules hold parameters and the per-layer math; `jquant.models.core` runs them (one
forward for every caller) over a cache from `jquant.models.cache`. `DecoderLayer.__call__`
is the one decoder-layer function: adding a layer kind means changing it (and its
parameter paths above), nothing else.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import ops
from jquant.hadamard import rht
from jquant.models import core
from jquant.models.attention import apply_rope
from jquant.models.cache import Cache
from jquant.models.config import LlamaConfig
from jquant.models.core import LayerContext
from jquant.models.moe import MoE
from jquant.qarray import QArray

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}

def _as_array(value, dtype):
    """A small parameter (bias, norm scale) as an array, whether or not a recipe quantized it."""
    if isinstance(value, QArray):
        return value.dequantize(dtype)
    return value.astype(dtype)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with the kernel ``(K, N)``, an array or a QArray."""

    def __init__(self, k: int, n: int, *, bias: bool, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (k, n), param_dtype))
        self.bias = nnx.Param(jnp.zeros((n,), param_dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.qdot(x, self.kernel.get_value())
        if self.bias is not None:
            y = y + _as_array(self.bias.get_value(), y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding ``(V, D)``, times ``scale`` (Gemma: sqrt(D), rounded to the compute
    dtype as transformers does); `attend` is the tied LM head (never scaled). With
    ``rotate_seed`` the looked-up rows are rotated (`jquant.hadamard.rht`): a rotated
    model's residual stream whose tied table is kept as it was (`jquant.rotate`)."""

    def __init__(self, vocab: int, dim: int, *, param_dtype, rngs: nnx.Rngs, scale: float = 1.0,
                 rotate_seed: int | None = None):  # fmt: skip
        init = jax.nn.initializers.normal(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), param_dtype))
        self.scale = scale
        self.rotate_seed = rotate_seed

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        x = ops.qembed(ids, self.embedding.get_value(), dtype=dtype)
        x = x if self.scale == 1.0 else x * jnp.asarray(self.scale, dtype)
        return x if self.rotate_seed is None else rht(x, seed=self.rotate_seed)

    def attend(self, x: jax.Array) -> jax.Array:
        return ops.qattend(x, self.embedding.get_value(), preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + scale)``, normalized in float32 (as transformers does).

    ``offset`` 0 is Llama's norm (the result cast to the compute dtype, then weighted);
    ``offset`` 1 is Gemma's (weighted in float32, then cast; a zero weight is the identity).
    With ``unrotate_seed`` the input is first rotated back (`jquant.hadamard.rht`'s
    inverse): the final norm of a rotated model whose residual is rotated online.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype, offset: float = 0.0,
                 unrotate_seed: int | None = None):  # fmt: skip
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype))
        self.eps = eps
        self.offset = offset
        self.unrotate_seed = unrotate_seed

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.unrotate_seed is not None:
            x = rht(x, seed=self.unrotate_seed, inverse=True)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))
        if self.offset:
            w = _as_array(self.scale.get_value(), jnp.float32) + jnp.float32(self.offset)
            return (y * w).astype(x.dtype)
        return _as_array(self.scale.get_value(), x.dtype) * y.astype(x.dtype)


def _norm(config: LlamaConfig, dim: int, param_dtype) -> RMSNorm:
    return RMSNorm(dim, eps=config.rms_norm_eps, param_dtype=param_dtype,
                   offset=config.norm_offset)  # fmt: skip


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; reads and writes one layer of a KV cache."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        d, h, kv, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, h * dh, bias=config.qkv_bias, **kw)
        self.k_proj = Dense(d, kv * dh, bias=config.qkv_bias, **kw)
        self.v_proj = Dense(d, kv * dh, bias=config.qkv_bias, **kw)
        self.o_proj = Dense(h * dh, d, bias=config.o_bias, **kw)
        if config.qk_norm:
            whole = config.qk_norm_whole
            self.q_norm = _norm(config, h * dh if whole else dh, param_dtype)
            self.k_norm = _norm(config, kv * dh if whole else dh, param_dtype)
        self.qk_norm, self.qk_norm_whole = config.qk_norm, config.qk_norm_whole
        self.num_kv_heads, self.num_groups, self.head_dim = kv, config.num_groups, dh
        self.scale, self.softcap = config.attn_scale, config.attn_logit_softcap

    def project(self, x, cos, sin) -> tuple[jax.Array, jax.Array, jax.Array]:
        """RoPE'd queries ``(B, S, heads, Dh)``, keys and values ``(B, S, kv_heads, Dh)``
        (queries and keys normalized first with ``qk_norm``: per head, or across all heads
        with ``qk_norm_whole``).

        Query head ``h`` attends with key/value head ``h // num_groups`` (transformers'
        repeat_kv order)."""
        b, s, _ = x.shape
        kv, dh = self.num_kv_heads, self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.reshape(b, s, kv * self.num_groups, dh), k.reshape(b, s, kv, dh)
        if self.qk_norm and not self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).reshape(b, s, kv, dh)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, ctx: LayerContext, cache: Cache, layer):
        """Attention of ``x (B, S, D)`` with this layer's keys and values stored in, and
        read from, ``cache`` (`jquant.models.cache`). Returns ``((B, S, D), cache)``."""
        q, k, v = self.project(x, ctx.cos, ctx.sin)
        cache, kv = cache.update(layer, k, v)
        out = kv.attend(q, ctx.allowed, ctx.window, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``: SwiGLU (SiLU), or GeGLU (Gemma's GELU).
    In a rotated model (`jquant.rotate`) the product is rotated (`jquant.hadamard.rht`)
    before ``down``, whose kernel holds the inverse rotation."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(bias=False, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(d, f, **kw)
        self.up_proj = Dense(d, f, **kw)
        self.down_proj = Dense(f, d, **kw)
        self.act = config.hidden_act
        self.rotate_seed = None if config.rotation is None else config.rotation.seed

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h if self.rotate_seed is None else rht(h, seed=self.rotate_seed))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; with sandwich norms
    (Gemma 2/3) the attention and MLP outputs are normalized too before they are added."""

    def __init__(self, config: LlamaConfig, *, param_dtype, rngs: nnx.Rngs, layer: int = 0):
        norm = functools.partial(_norm, config, config.hidden_size, param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.sandwich = config.sandwich_norms
        if config.is_moe(layer):  # layer ``layer`` of the model: MoE or dense by the config
            shared = None
            if fs := config.shared_expert_intermediate_size:  # Qwen2-MoE
                shared_config = dataclasses.replace(config, intermediate_size=fs)
                shared = MLP(shared_config, param_dtype=param_dtype, rngs=rngs)
            self.mlp = MoE(config, _ACTIVATIONS[config.hidden_act], shared=shared,
                           param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        else:
            self.mlp = MLP(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, ctx: LayerContext, cache: Cache, layer):
        """The one decoder-layer function: ``(x (B, S, D), cache)`` after this layer.

        ``layer`` indexes the cache: a Python int unrolled, a traced int32 under scan."""
        h, cache = self.self_attn(self.input_layernorm(x), ctx, cache, layer)
        return self.mlp_residual(self.attn_residual(x, h)), cache

    def attn_residual(self, x: jax.Array, h: jax.Array) -> jax.Array:
        """The residual stream after attention output ``h`` (o_proj's) is added."""
        return x + (self.post_attention_layernorm(h) if self.sandwich else h)

    def mlp_norm(self, x: jax.Array) -> jax.Array:
        """The norm whose output the MLP reads."""
        if self.sandwich:
            return self.pre_feedforward_layernorm(x)
        return self.post_attention_layernorm(x)

    def mlp_residual(self, x: jax.Array) -> jax.Array:
        """``x`` plus the (normalized, with sandwich norms) MLP output."""
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_feedforward_layernorm(h) if self.sandwich else h)


class Llama(nnx.Module):
    """A Llama-family causal LM.

    Args:
      config: the architecture (any supported family).
      dtype: compute dtype of activations and the KV cache (float32 on CPU, where XLA's bf16
        dots are ~20x slower; bfloat16 on GPU/TPU). Logits are always float32.
      param_dtype: dtype of freshly initialized parameters.
      rngs: initializers' randomness (normal(0.02) weights, unit norms, zero biases).

    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
    ...                   num_heads=2, num_kv_heads=1)
    >>> model = Llama(cfg, rngs=nnx.Rngs(0))
    >>> logits, _ = model(jnp.zeros((1, 5), jnp.int32))
    >>> logits.shape
    (1, 5, 32)
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):  # fmt: skip
        self.config = config
        self.dtype = dtype
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        online = config.rotation is not None and config.rotation.residual_online
        seed = config.rotation.seed if online else None
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, scale=config.embed_scale,
                                  rotate_seed=seed, **kw)  # fmt: skip
        self.layers = nnx.List(
            [DecoderLayer(config, layer=i, **kw) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype,
                            offset=config.norm_offset, unrotate_seed=seed)  # fmt: skip
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, bias=False, **kw)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        mask: jax.Array | None = None,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        """Runs ``tokens (B, S)`` through `jquant.models.core` (layers under one scan where
        their trees match); with a cache, continues from what it holds (prefill or decode).

        Args:
          tokens: int token ids ``(B, S)``.
          positions: RoPE positions ``(B, S)``; default: the cache's rule (a `KVCache`:
            each row's count of real tokens so far, so a left-padded row starts at 0 on its
            first real token).
          cache: a cache (`jquant.models.cache`: `KVCache`, a `PagedView`, ...) to read and
            extend, or None (attend within ``tokens`` only). A `KVCache` writes slots
            ``index .. index + S - 1``; keeping them below ``max_len`` is the caller's job.
          mask: ``(B, S)`` True for real tokens, False for padding (never attended to);
            default all real.
          last_only: return logits of the last column only (``(B, 1, V)``): all a
            left-padded prefill needs before sampling.

        Returns:
          ``(logits (B, S, V) float32, cache)``; the cache is None when none was given.
        """
        s = tokens.shape[1]
        max_len = getattr(cache, "max_len", None)
        if max_len is not None and s > max_len:
            raise ValueError(f"{s} tokens do not fit a KV cache of max_len={max_len}")
        st = core.Static.of(self)
        w = core.weights(nnx.state(self), self.config.num_layers)
        x, new = core.hidden(st, w, tokens, cache, mask=mask, positions=positions)
        if last_only:
            x = x[:, -1:]
        return core.logits(st, w, x), (None if cache is None else new)


# ---- functional API -----------------------------------------------------------------


def graphdef_of(model) -> nnx.GraphDef:
    """The GraphDef of a model (a `Llama` module, or a GraphDef passed through)."""
    return model if isinstance(model, nnx.GraphDef) else nnx.graphdef(model)


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _forward(graphdef, params, tokens, positions, cache, mask, last_only):
    return nnx.merge(graphdef, params)(tokens, positions, cache, mask, last_only=last_only)


def forward(model, params: nnx.State, tokens, positions=None, cache: Cache | None = None,
            mask=None, *, last_only: bool = False) -> tuple[jax.Array, Cache | None]:
    """Jitted ``Llama.__call__`` on a parameter State: float, or quantized (QArrays inside).

    Compiled once per (model structure, input shapes); the parameters are ordinary
    arguments, so float and quantized States each compile once and are never baked in.

    Args:
      model: a `Llama` module or its `nnx.GraphDef` (only its structure is used).
      params: an `nnx.State` with the model's parameter paths (e.g. `jquant.quantize`'s output).
      tokens, positions, cache, mask, last_only: as in `Llama.__call__`.

    >>> logits, cache = forward(model, params, tokens)  # doctest: +SKIP
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
    return _forward(graphdef_of(model), params, tokens, positions, cache, mask, last_only)


def init_model(config: LlamaConfig, *, seed: int = 0, dtype=jnp.float32) -> Llama:
    """A randomly initialized `Llama` (tests and examples)."""
    return Llama(config, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Llama:
    """A `Llama` whose parameters are shape/dtype placeholders: no memory, no init compute."""
    return nnx.eval_shape(
        lambda: Llama(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )


def num_params(params: nnx.State) -> int:
    """Logical element count of a parameter State (QArrays counted by their logical shape)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    return int(sum(np.prod(x.shape) for x in leaves))
