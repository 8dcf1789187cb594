"""Randomized Hadamard incoherence processing (QuIP#, QuaRot): a model rotated so that its
weights' outliers spread out before quantization, computing the same float function.

`rotate` rewrites a float Llama-family model (llama, mistral, qwen2, qwen3):

* **residual stream** ``x ↦ x Q`` (``Q = `` `jquant.hadamard.rht_matrix`, ``D × D``). Every
  RMSNorm's weight is first folded into the linears that read it (q/k/v, gate/up, LM head;
  the norm's weight becomes 1, so the norm commutes with ``Q``); then the linears that read
  the stream become ``Qᵀ W`` and those that write it (o_proj, down_proj, their biases)
  ``W Q``. An untied embedding table becomes ``E Q`` and the head ``Qᵀ diag(w) W``. A tied
  table stays as it is (rotating it would untie it): the stream is rotated **online**
  after the lookup and rotated back before the final norm.
* **values into o_proj**: per head, v_proj's output columns times ``Q_h`` (head_dim) and
  o_proj's input rows times ``Q_hᵀ``; offline only.
* **MLP intermediate**: SwiGLU's product does not commute with a rotation, so it is
  rotated **online** before down_proj (``Q_F``, intermediate width), whose kernel becomes
  ``Q_Fᵀ W``.

What runs online is recorded in `LlamaConfig.rotation` (`jquant.arch.Rotation`), which a
packed checkpoint carries in its config (``"jquant_rotation"``). Transforms applied online
need a Hadamard size (`jquant.hadamard.has_hadamard`); the offline head_dim fold falls
back to a seeded random orthogonal matrix (`jquant.hadamard.orthogonal_matrix`).

>>> model, params = rotate(model, params, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from jquant.arch import ROTATION_KEY, LlamaConfig, Rotation, rotation_blocker
from jquant.hadamard import has_hadamard, orthogonal_matrix, rht_matrix

__all__ = ["rotate", "rotate_config", "rotate_globals", "rotate_layer", "rotated_hf_config"]


def rotate_config(config: LlamaConfig, seed: int = 0) -> LlamaConfig:
    """``config`` with the `Rotation` that `rotate` gives its model.

    Raises:
      ValueError: the family cannot be rotated (names why), it is rotated already, or an
        online transform's width has no Hadamard matrix.
    """
    if config.rotation is not None:
        raise ValueError(f"rotate: the model is rotated already ({config.rotation})")
    if why := rotation_blocker(config):
        raise ValueError(f"rotate: {config.model_type} cannot be rotated: {why}")
    online = config.tie_word_embeddings
    widths = {"intermediate_size": config.intermediate_size}
    if online:
        widths["hidden_size (rotated online: tied embeddings)"] = config.hidden_size
    for name, n in widths.items():
        if not has_hadamard(n):
            raise ValueError(f"rotate: {name}={n} has no Hadamard matrix (2**k * m, m a "
                             "Paley order); it is rotated online and needs one")  # fmt: skip
    return dataclasses.replace(config, rotation=Rotation(seed=seed, residual_online=online))


def rotated_hf_config(hf: dict, config: LlamaConfig) -> dict:
    """The HF-style config dict ``hf`` of a model now configured by ``config`` (rotated,
    maybe untied by a recipe): its `Rotation` added, its tying as ``config`` says."""
    return {**hf, ROTATION_KEY: config.rotation.to_hf(),
            "tie_word_embeddings": config.tie_word_embeddings}


def _matrices(config: LlamaConfig) -> dict[str, np.ndarray]:
    seed = config.rotation.seed
    return {"resid": orthogonal_matrix(config.hidden_size, seed),
            "head": orthogonal_matrix(config.head_dim, seed),
            "mlp": rht_matrix(config.intermediate_size, seed)}  # fmt: skip


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def rotate_layer(layer: dict, config: LlamaConfig) -> dict:
    """Decoder layer's float parameters (a pure dict, `nnx.to_pure_dict` layout) rotated
    for a ``config`` from `rotate_config`; arrays keep their dtypes."""
    mats = _matrices(config)
    q, qh, qf = mats["resid"], mats["head"], mats["mlp"]
    attn, mlp = layer["self_attn"], layer["mlp"]
    dtype = np.asarray(attn["q_proj"]["kernel"]).dtype
    w_in = _f64(layer["input_layernorm"]["scale"])
    w_mlp = _f64(layer["post_attention_layernorm"]["scale"])
    out = {"input_layernorm": {"scale": np.ones_like(w_in).astype(dtype)},
           "post_attention_layernorm": {"scale": np.ones_like(w_mlp).astype(dtype)}}
    new_attn = {k: dict(v) for k, v in attn.items()}
    for name in ("q_proj", "k_proj", "v_proj"):
        new_attn[name]["kernel"] = q.T @ (w_in[:, None] * _f64(attn[name]["kernel"]))
    dh, kv, h = config.head_dim, config.num_kv_heads, config.num_heads
    v = new_attn["v_proj"]["kernel"].reshape(-1, kv, dh)
    new_attn["v_proj"]["kernel"] = (v @ qh).reshape(-1, kv * dh)
    if "bias" in attn["v_proj"]:
        new_attn["v_proj"]["bias"] = (_f64(attn["v_proj"]["bias"]).reshape(kv, dh) @ qh).ravel()
    o = _f64(attn["o_proj"]["kernel"]).reshape(h, dh, -1)
    o = np.einsum("ij,hjd->hid", qh.T, o).reshape(h * dh, -1)
    new_attn["o_proj"]["kernel"] = o @ q
    if "bias" in attn["o_proj"]:
        new_attn["o_proj"]["bias"] = _f64(attn["o_proj"]["bias"]) @ q
    new_mlp = {name: {"kernel": q.T @ (w_mlp[:, None] * _f64(mlp[name]["kernel"]))}
               for name in ("gate_proj", "up_proj")}  # fmt: skip
    new_mlp["down_proj"] = {"kernel": qf.T @ _f64(mlp["down_proj"]["kernel"]) @ q}
    out["self_attn"], out["mlp"] = new_attn, new_mlp
    return _cast({**layer, **out}, dtype)


def rotate_globals(parts: dict, config: LlamaConfig) -> dict:
    """``{"embed_tokens", "norm"[, "lm_head"]}`` (pure dicts) rotated for a ``config`` from
    `rotate_config`: a tied table and its final norm stay as they are (rotated online)."""
    if config.rotation.residual_online:
        return parts
    q = _matrices(config)["resid"]
    table = parts["embed_tokens"]["embedding"]
    dtype = np.asarray(table).dtype
    w = _f64(parts["norm"]["scale"])
    return _cast({"embed_tokens": {"embedding": _f64(table) @ q},
                  "norm": {"scale": np.ones_like(w)},
                  "lm_head": {"kernel": q.T @ (w[:, None] * _f64(parts["lm_head"]["kernel"]))}},
                 dtype)  # fmt: skip


def rotate(model, params: nnx.State, seed: int = 0):
    """``(model, params)`` rotated (see the module docstring): the same float function,
    with weights that quantize with smaller error below 4 bits.

    Args:
      model: a float jquant `Llama` (llama, mistral, qwen2 or qwen3).
      params: its float parameter State.
      seed: seeds every sign vector; recorded in the returned model's config.

    Raises:
      ValueError: as `rotate_config`, or ``params`` hold QArrays (rotate before quantizing).
    """
    from jquant.models.llama import abstract_model
    from jquant.qarray import QArray

    if any(isinstance(x, QArray) for x in
           jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))):  # fmt: skip
        raise ValueError("rotate: params are quantized; rotate the float model, then quantize")
    config = rotate_config(model.config, seed)
    pure = nnx.to_pure_dict(params)
    layers = {i: rotate_layer(pure["layers"][i], config) for i in range(config.num_layers)}
    names = ("embed_tokens", "norm", "lm_head")
    parts = rotate_globals({k: pure[k] for k in names if k in pure}, config)
    dtype = np.asarray(pure["embed_tokens"]["embedding"]).dtype
    graphdef, state = nnx.split(abstract_model(config, dtype=model.dtype, param_dtype=dtype))
    nnx.replace_by_pure_dict(state, {**pure, **parts, "layers": layers})
    new = nnx.merge(graphdef, state)
    return new, nnx.state(new)


def _cast(tree: dict, dtype) -> dict:
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)
