"""Hugging Face `LlamaForCausalLM` state dict → `Llama` parameters.

HF names a tensor ``model.layers.0.self_attn.q_proj.weight`` and stores linear weights as
``(out, in)``; jquant's path is ``layers/0/self_attn/q_proj/kernel`` with the Dense layout
``(in, out)``. The map between them is mechanical (`hf_name`), so no per-tensor table exists
to fall out of date.

`params_from_hf` builds the whole model; `global_params_from_hf` and `layer_params_from_hf`
build it a part at a time (for models larger than host memory, from a lazily loaded
checkpoint). All three convert each parameter by one function, `_param`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant._param_shapes import hf_name as hf_name
from jquant.models.config import LlamaConfig
from jquant.models.llama import DecoderLayer, Llama, abstract_model
from jquant.qarray import QArray
from jquant.tree import unwrap

# HF buffers and duplicates that carry no information for the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _ignored(name: str, config: LlamaConfig) -> bool:
    # A tied model's state_dict() lists the shared matrix twice, once as lm_head.weight.
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    return name.endswith(_IGNORED_SUFFIXES)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _param(tensors: Mapping[str, np.ndarray], path: tuple, shape: tuple[int, ...],
           config: LlamaConfig, param_dtype) -> jax.Array:  # fmt: skip
    """The parameter at jquant `path` (of Dense/Embed `shape`) from its HF tensor: found by
    name, its shape checked, transposed to ``(in, out)`` if a kernel, cast to `param_dtype`.

    A `jquant.io.LazyTensors` is checked from its header shape before anything is read, and
    read straight in `param_dtype` (a bf16 file read as bf16 makes no float32 copy).
    """
    from jquant.io import LazyTensors  # io is optional until a checkpoint is read

    name = hf_name(path)
    transpose = path[-1] == "kernel"  # the last two axes (an MoE expert stack: per expert)
    hf_shape = (*shape[:-2], shape[-1], shape[-2]) if transpose else shape
    if name not in tensors:
        raise ValueError(
            f"missing tensor {name!r} (for parameter {'/'.join(map(str, path))}, "
            f"shape {hf_shape} in HF layout); the checkpoint has {len(tensors)} tensors "
            f"and does not match this config ({config.model_type}, "
            f"{config.num_layers} layers, qkv_bias={config.qkv_bias})"
        )
    lazy = isinstance(tensors, LazyTensors)
    if not lazy and isinstance(tensors[name], QArray):
        # Imported quantized (another library's checkpoint, a packed GGUF tensor): kept as
        # it is; its logical shape is jquant's (a kernel's is (in, out)).
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"quantized tensor {name!r} has logical shape {tuple(tensors[name].shape)}, "
                f"the model needs {shape} (jquant layout: kernels (in, out))"
            )
        return tensors[name]
    found = tensors.shape(name) if lazy else tuple(np.shape(tensors[name]))
    if found != hf_shape:
        raise ValueError(
            f"tensor {name!r} has shape {found}, expected {hf_shape} "
            "(HF layout: linear weights are (out_features, in_features)); the config "
            "and the weights disagree"
        )
    array = tensors.read(name, np.dtype(param_dtype)) if lazy else np.asarray(tensors[name])
    return jnp.asarray(np.swapaxes(array, -1, -2) if transpose else array, param_dtype)


# ---- mixture-of-experts layouts --------------------------------------------------------
# jquant's MoE paths map (by `hf_name`) to one stacked tensor per projection,
# ``model.layers.{i}.mlp.experts.{gate,up,down}_proj.weight`` (E, out, in), and the router
# ``model.layers.{i}.mlp.gate.weight``. Checkpoints store experts otherwise: transformers 5's
# save_pretrained (and the Hub's files) one Linear per expert, ``...mlp.experts.{e}.{proj}``
# (Qwen-MoE) or ``...block_sparse_moe.experts.{e}.w1/w3/w2`` and ``...block_sparse_moe.gate``
# (Mixtral); transformers 5's in-memory state_dict fuses ``mlp.experts.gate_up_proj``
# (E, 2F, D: gate rows first) and ``mlp.experts.down_proj`` (E, D, F).

_MIXTRAL_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _moe_parts(tensors, path: tuple) -> tuple[list[str], str] | None:
    """``(source names, how)`` of an MoE parameter the checkpoint stores otherwise than
    under its `hf_name`; None when the name itself is there or no other layout is."""
    if path[0] != "layers" or path[2] != "mlp" or hf_name(path) in tensors:
        return None
    layer = f"model.layers.{path[1]}"
    if path[3] == "gate":  # the router
        name = f"{layer}.block_sparse_moe.gate.weight"
        return ([name], "one") if name in tensors else None
    if path[3] != "experts":
        return None
    proj = path[4]
    fused = f"{layer}.mlp.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
    if fused in tensors:
        return [fused], {"gate_proj": "first", "up_proj": "second"}.get(proj, "one")
    mixtral = f"{layer}.block_sparse_moe.experts.{{}}.{_MIXTRAL_W[proj]}.weight"
    for pattern in (f"{layer}.mlp.experts.{{}}.{proj}.weight", mixtral):
        if pattern.format(0) in tensors:
            names, e = [], 0
            while pattern.format(e) in tensors:
                names.append(pattern.format(e))
                e += 1
            return names, "stack"
    return None


def _moe_tensor(tensors, names: list[str], how: str, param_dtype) -> np.ndarray:
    """The HF-layout tensor `_moe_parts` describes, assembled from its sources."""
    from jquant.io import LazyTensors

    def read(n):
        if isinstance(tensors, LazyTensors):
            return tensors.read(n, np.dtype(param_dtype))
        if isinstance(tensors[n], QArray):
            raise ValueError(f"tensor {n!r} is quantized; jquant assembles MoE experts from "
                             "float tensors only")  # fmt: skip
        return np.asarray(tensors[n])

    if how == "stack":
        return np.stack([read(n) for n in names])
    array = read(names[0])
    if how == "one":
        return array
    half = array.shape[-2] // 2
    return array[..., :half, :] if how == "first" else array[..., half:, :]



def _fill(state: nnx.State, prefix: tuple, tensors: Mapping[str, np.ndarray],
          config: LlamaConfig, param_dtype) -> set[str]:  # fmt: skip
    """Replaces every placeholder of `state` (the parameters under jquant path `prefix`) by
    its tensor from `tensors`; returns the HF names it read."""
    pure: dict = {}
    used = set()
    for path, var in nnx.to_flat_state(state):
        full = (*prefix, *path)
        source, parts = tensors, _moe_parts(tensors, full)
        if parts is not None:
            source = {hf_name(full): _moe_tensor(tensors, *parts, param_dtype)}
            used.update(parts[0])
        shape = tuple(var.get_value().shape)
        _set(pure, path, _param(source, full, shape, config, param_dtype))
        used.add(hf_name(full))
    nnx.replace_by_pure_dict(state, pure)
    return used


def _check_extra(names, config: LlamaConfig) -> None:
    extra = sorted(n for n in names if not _ignored(n, config))
    if extra:
        raise ValueError(
            f"{len(extra)} tensor(s) are not part of this {config.model_type} model, e.g. "
            f"{', '.join(extra[:5])}; the checkpoint has parts jquant's Llama model lacks"
        )


def params_from_hf(
    tensors: Mapping[str, np.ndarray | QArray],
    config: LlamaConfig,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
) -> tuple[Llama, nnx.State]:
    """Builds a `Llama` and its parameter State from HF-named tensors.

    Args:
      tensors: ``{hf_name: array}`` in HF layout (linear weights ``(out, in)``), e.g.
        ``jquant.io.load_checkpoint(...).tensors`` or a torch ``state_dict()`` as numpy.
        A `jquant.io.LazyTensors` is read one tensor at a time, each in `param_dtype`.
        A `QArray` value (an importer's quantized tensor) is kept as it is; its logical
        shape must be the parameter's in jquant's layout (a kernel's ``(in, out)``).
      config: the architecture the tensors must match.
      dtype: the model's compute dtype.
      param_dtype: dtype the parameters are stored in.

    Returns:
      ``(model, params)``: the module (holding the parameters) and ``nnx.state(model)``.

    Raises:
      ValueError: a tensor is missing, has the wrong shape, or is not part of the model;
        the message names the tensor, the expected shape and the one found.
    """
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, param_dtype=param_dtype))
    used = _fill(state, (), tensors, config, param_dtype)
    _check_extra(set(tensors) - used, config)
    model = nnx.merge(graphdef, state)
    return model, nnx.state(model)


def params_to_hf(params) -> dict[str, np.ndarray | QArray]:
    """The inverse of `params_from_hf`: ``{hf_name: tensor}`` of a parameter State (or nested
    dict), floats as numpy arrays in HF layout (kernels transposed to ``(out, in)``, an MoE
    expert stack per expert: ``(E, out, in)``), QArrays
    kept as they are (logical ``(in, out)``). A tied model has no ``lm_head.weight``.

    What the exporters of quantized checkpoints take (`jquant.io.gptq_awq.write_gptq`).
    """
    from jquant.tree import leaves

    out: dict[str, np.ndarray | QArray] = {}
    for path, value in leaves(params):
        keys = tuple(path.split("/"))
        if isinstance(value, QArray):
            out[hf_name(keys)] = value
        else:
            array = np.asarray(value)
            out[hf_name(keys)] = np.swapaxes(array, -1, -2) if keys[-1] == "kernel" else array
    return out


# ---- one part at a time ---------------------------------------------------------------
# A model larger than host memory is built a part at a time from a `jquant.io.LazyTensors`:
# the global parameters (embedding, final norm, untied head), then each decoder layer, each
# read, used (quantized, say) and dropped before the next. `params_from_hf(...)[1]` is these
# parts together: ``params["layers"][i]`` equals `layer_params_from_hf(..., i)`.

_LAYER_PREFIX = "model.layers."


def layer_params_from_hf(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig, layer: int, *, param_dtype=jnp.float32
) -> nnx.State:
    """The parameter State of decoder layer `layer` alone, reading only its tensors.

    Args:
      tensors: as for `params_from_hf`; typically a `jquant.io.LazyTensors`
        (``jquant.io.load_checkpoint(src, lazy=True).tensors``), of which only the tensors
        named ``model.layers.{layer}.*`` are read, each straight in `param_dtype`.
      config: the architecture.
      layer: which decoder layer, ``0 <= layer < config.num_layers``.
      param_dtype: dtype the parameters are stored in.

    Returns:
      An `nnx.State` with the structure and values of ``params["layers"][layer]`` of
      `params_from_hf` (`self_attn`, `mlp` and the norms).

    Raises:
      ValueError: `layer` is out of range, or one of its tensors is missing, misshapen, or
        not part of the model (as `params_from_hf` words it).

    >>> ckpt = jquant.io.load_checkpoint("smollm2-135m", lazy=True)  # doctest: +SKIP
    >>> config = LlamaConfig.from_hf(ckpt.config)  # doctest: +SKIP
    >>> layer0 = layer_params_from_hf(ckpt.tensors, config, 0)  # doctest: +SKIP
    """
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"{layer=} is out of range: the model has {config.num_layers} layers")
    abstract = nnx.eval_shape(
        lambda: DecoderLayer(config, param_dtype=param_dtype, rngs=nnx.Rngs(0), layer=layer)
    )
    state = nnx.state(abstract)
    used = _fill(state, ("layers", layer), tensors, config, param_dtype)
    prefix = f"{_LAYER_PREFIX}{layer}."
    _check_extra({n for n in tensors if n.startswith(prefix)} - used, config)
    return state


def global_params_from_hf(
    tensors: Mapping[str, np.ndarray], config: LlamaConfig, *, param_dtype=jnp.float32,
    part: str | None = None,
) -> nnx.State:
    """The parameter State of everything outside the decoder layers: `embed_tokens`, `norm`
    and, when the embeddings are untied, `lm_head`; reads only those tensors.

    Args, raises: as `layer_params_from_hf` (tensors not under ``model.layers.`` that are
      not part of the model are reported here).

    Returns:
      An `nnx.State` holding `params_from_hf`'s parameters less ``layers``; with ``part``
      (``"embed_tokens"``, ``"norm"`` or ``"lm_head"``) that group alone, the only tensors read.
    """
    state = nnx.state(abstract_model(config, param_dtype=param_dtype))
    del state["layers"]
    if part is not None:  # one group alone: an 8B model's embedding and head are 1 GB each
        if part not in state:
            raise ValueError(f"part {part!r} is not one of {', '.join(state)}")
        state = nnx.State({part: state[part]})
        _fill(state, (), tensors, config, param_dtype)
        return state
    used = _fill(state, (), tensors, config, param_dtype)
    _check_extra({n for n in tensors if not n.startswith(_LAYER_PREFIX)} - used, config)
    return state


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
