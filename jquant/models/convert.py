"""Hugging Face `LlamaForCausalLM` state dict → `Llama` parameters.

HF names a tensor ``model.layers.0.self_attn.q_proj.weight`` and stores linear weights as
``(out, in)``; jquant's path is ``layers/0/self_attn/q_proj/kernel`` with the Dense layout
``(in, out)``. The map between them is mechanical (`hf_name`), so no per-tensor table exists
to fall out of date.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models.config import LlamaConfig
from jquant.models.llama import Llama, abstract_model
from jquant.tree import unwrap

# HF buffers and duplicates that carry no information for the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple) -> str:
    """The HF state-dict name of a jquant parameter path.

    >>> hf_name(("layers", 3, "mlp", "down_proj", "kernel"))
    'model.layers.3.mlp.down_proj.weight'
    >>> hf_name(("lm_head", "kernel"))
    'lm_head.weight'
    """
    *head, leaf = (str(p) for p in path)
    name = ".".join([*head, _HF_LEAF[leaf]])
    return name if head[0] == "lm_head" else f"model.{name}"


def _ignored(name: str, config: LlamaConfig) -> bool:
    # A tied model's state_dict() lists the shared matrix twice, once as lm_head.weight.
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    return name.endswith(_IGNORED_SUFFIXES)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf(
    tensors: Mapping[str, np.ndarray],
    config: LlamaConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> tuple[Llama, nnx.State]:
    """Builds a `Llama` and its parameter State from HF-named tensors.

    Args:
      tensors: ``{hf_name: array}`` in HF layout (linear weights ``(out, in)``), e.g.
        ``jquant.io.load_checkpoint(...).tensors`` or a torch ``state_dict()`` as numpy.
      config: the architecture the tensors must match.
      dtype: the model's compute dtype.
      param_dtype: dtype the parameters are stored in.

    Returns:
      ``(model, params)``: the module (holding the parameters) and ``nnx.state(model)``.

    Raises:
      ValueError: a tensor is missing, has the wrong shape, or is not part of the model;
        the message names the tensor, the expected shape and the one found.
    """
    abstract = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    graphdef, state = nnx.split(abstract)
    pure: dict = {}
    used = set()
    for path, var in nnx.to_flat_state(state):
        name = hf_name(path)
        transpose = path[-1] == "kernel"
        expected = tuple(var.get_value().shape)
        hf_shape = expected[::-1] if transpose else expected
        if name not in tensors:
            raise ValueError(
                f"missing tensor {name!r} (for parameter {'/'.join(map(str, path))}, "
                f"shape {hf_shape} in HF layout); the checkpoint has {len(tensors)} tensors "
                f"and does not match this config ({config.model_type}, "
                f"{config.num_layers} layers, qkv_bias={config.qkv_bias})"
            )
        array = np.asarray(tensors[name])
        if tuple(array.shape) != hf_shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(array.shape)}, expected {hf_shape} "
                "(HF layout: linear weights are (out_features, in_features)); the config "
                "and the weights disagree"
            )
        used.add(name)
        _set(pure, path, jnp.asarray(array.T if transpose else array, param_dtype))
    extra = sorted(n for n in set(tensors) - used if not _ignored(n, config))
    if extra:
        raise ValueError(
            f"{len(extra)} tensor(s) are not part of this {config.model_type} model, e.g. "
            f"{', '.join(extra[:5])}; the checkpoint has parts jquant's Llama model lacks"
        )
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    return model, nnx.state(model)


# ---- tied embeddings ------------------------------------------------------------------

EMBED_PATH, HEAD_PATH = "embed_tokens/embedding", "lm_head/kernel"


def untie(model: Llama, params: nnx.State) -> tuple[Llama, nnx.State]:
    """A tied model as an untied one: ``lm_head/kernel`` becomes a copy of the embedding
    table, transposed to the Dense layout ``(D, V)``. Logits are unchanged.

    An untied model passes through.
    """
    if not model.config.tie_word_embeddings:
        return model, params
    config = dataclasses.replace(model.config, tie_word_embeddings=False)
    graphdef, state = nnx.split(abstract_model(config, dtype=model.dtype,
                                               param_dtype=_table(params).dtype))  # fmt: skip
    pure = nnx.to_pure_dict(params)
    pure["lm_head"] = {"kernel": jnp.asarray(_table(params)).T}
    nnx.replace_by_pure_dict(state, pure)
    new = nnx.merge(graphdef, state)
    return new, nnx.state(new)


def _table(params: nnx.State):
    return unwrap(params["embed_tokens"]["embedding"])


def head_apart(recipe, config: LlamaConfig) -> bool:
    """Whether ``recipe`` treats a tied model's LM head apart from its embedding.

    In a tied model the head *is* the embedding table, at path ``embed_tokens/embedding``.
    A recipe names the head by ``lm_head/kernel`` all the same; when the rule it matches
    there treats the table otherwise than the embedding's rule (another format, or float
    beside a quantized embedding), the model must be untied (`untie`) so that each has its
    own copy. A recipe whose ``lm_head`` pattern matches nothing leaves the head tied.

    >>> from jquant.recipe import Recipe
    >>> r = Recipe.from_dict({"name": "r", "rules": [
    ...     {"pattern": "embed", "weight": "uint4", "group_size": 64},
    ...     {"pattern": "lm_head", "weight": "int8"}]})
    >>> head_apart(r, LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8,
    ...     num_layers=1, num_heads=1, num_kv_heads=1, tie_word_embeddings=True))
    True
    """
    if not config.tie_word_embeddings:
        return False
    head = recipe.match(HEAD_PATH)
    return head is not None and _treatment(head) != _treatment(recipe.match(EMBED_PATH))


def _treatment(rule):
    """What a rule does to a table: None for float as stored, else its settings."""
    if rule is None or (rule.skip and rule.dtype is None):
        return None
    out = rule.to_dict()
    out.pop("pattern")
    return out


def prepare_head(model: Llama, params: nnx.State, recipe) -> tuple[Llama, nnx.State]:
    """``(model, params)`` untied when `head_apart` says the recipe needs it, else as given."""
    if head_apart(recipe, model.config):
        return untie(model, params)
    return model, params
