"""Attention math shared by every decoder layer and every cache kind: RoPE, masks, softmax.

Pure functions on arrays; no parameters. ``jquant.models.cache`` decides *which* keys a
query may see (its ``allowed`` mask); this module computes the attention given that mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jquant.models.config import LlamaConfig, rope_inv_freq

# Finite rather than -inf, so a query with nothing to attend to (a padding row) gives a
# uniform softmax instead of NaNs that would poison the batch.
MASKED = -1e30


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (B, S, H, Dh)`` by float32 ``cos``/``sin (B, S, Dh)`` (HF rotate_half)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + _rotate_half(x32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def rope_tables(config: LlamaConfig, positions: jax.Array, *,
                local: bool = False) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``cos, sin`` of shape ``(B, S, head_dim)`` float32 for integer ``positions (B, S)``;
    ``local``: for the sliding-window layers (their own base in Gemma 3)."""
    inv_freq = jnp.asarray(rope_inv_freq(config, local=local))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def causal_mask(query: jax.Array, key: jax.Array, *, window: int | None = None,
                valid: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """``allowed (B, S, T)``: a key is visible to a query at or after it, and with a
    ``window`` only the last ``window`` up to the query's own (transformers' sliding window:
    ``key > query - window``); with ``valid (B, T)`` only real keys.

    Args:
      query: ``(S,)`` or ``(B, S)`` int indices of the queries (positions or cache slots).
      key: ``(T,)`` int indices of the keys, in the same units.
    """
    q = query[..., :, None]
    allowed = key <= q
    if window is not None:
        allowed = allowed & (key > q - window)
    if allowed.ndim == 2:
        allowed = allowed[None]
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    return allowed


def attend(q, k, v, allowed, *, k_scale=None, v_scale=None, scale=None,
           softcap=None) -> jax.Array:  # fmt: skip
    """Grouped-query softmax attention: ``(B, S, heads * Dh)`` in ``q``'s dtype.

    Query head ``h`` attends with key/value head ``h // (heads // kv_heads)``
    (transformers' repeat_kv order).

    Args:
      q: RoPE'd queries ``(B, S, heads, Dh)``.
      k, v: keys and values ``(B, T, kv_heads, Dh)``: arrays, or the integer / fp8 codes of
        a quantized KV cache when ``k_scale`` / ``v_scale`` are given.
      allowed: ``(B, S, T)`` bool, which keys each query may attend to.
      k_scale, v_scale: per-token, per-head scales ``(B, T, kv_heads)`` of quantized codes.
        They are folded into the scores (``q . k_codes * k_scale``) and the probabilities
        (``(p * v_scale) @ v_codes``), so no dequantized copy of the cache is made.
      scale: the factor on the scores (default ``Dh ** -0.5``).
      softcap: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
    """
    b, s, h, dh = q.shape
    kv = k.shape[2]
    dtype = q.dtype
    q = q.reshape(b, s, kv, h // kv, dh)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k.astype(dtype),
                        preferred_element_type=jnp.float32)  # fmt: skip
    if k_scale is not None:
        scores = scores * _per_key(k_scale)
    scores = scores * jnp.float32(dh**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / jnp.float32(softcap)) * jnp.float32(softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.float32(MASKED))
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * _per_key(v_scale)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(dtype), v.astype(dtype),
                     preferred_element_type=jnp.float32)  # fmt: skip
    return out.astype(dtype).reshape(b, s, h * dh)


def _per_key(scale: jax.Array) -> jax.Array:
    """``(B, T, KV)`` scales as float32 ``(B, KV, 1, 1, T)``, to broadcast over scores."""
    return jnp.transpose(scale.astype(jnp.float32), (0, 2, 1))[:, :, None, None, :]


def softcap_logits(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)`` (Gemma 2's final soft-capping); as is when ``cap`` is None."""
    if cap is None:
        return logits
    return jnp.tanh(logits / jnp.float32(cap)) * jnp.float32(cap)
