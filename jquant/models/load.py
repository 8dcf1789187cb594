"""`load`: any supported source → ``(model, params, tokenizer)``."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.models.config import LlamaConfig
from jquant.models.convert import params_from_hf
from jquant.models.llama import Llama, abstract_model


def default_dtype():
    """float32 on CPU (XLA's CPU bf16 dots are ~20x slower than f32), bfloat16 elsewhere."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def load(source, *, dtype=None, param_dtype=jnp.float32, with_config: bool = False,
         packed: bool = False) -> tuple:  # fmt: skip
    """Loads a Llama-family model from a registry name, packed or HF directory, ``.gguf`` or
    hub id.

    Args:
      source: anything `jquant.io.load_checkpoint` accepts, a `jquant.io.Checkpoint`, or a
        packed checkpoint directory (`jquant.io.packed.save_packed`; tried after registry
        names, before HF directories), whose parameters come back as stored: QArrays stay
        QArrays, never materialized in float.
      dtype: compute dtype (activations, KV cache); default `default_dtype()`.
      param_dtype: dtype of the float parameters (float32 keeps the baseline exact; a
        quantization recipe starts from these). A packed checkpoint keeps its stored dtypes.
      with_config: also return the checkpoint's HF-style config dict (what
        `jquant.memory_report(config=...)` reads) as a fourth element.
      packed: a GGUF source keeps its quantized matrices as QArrays (`jquant.io.load_gguf`'s
        ``packed``). Another library's quantized HF directory (GPTQ, AWQ,
        compressed-tensors) always loads as its QArrays.

    Returns:
      ``(model, params, tokenizer)``: the `Llama` module, its parameter ``nnx.State`` (the
      tree `jquant.quantize` rewrites; paths like ``layers/0/mlp/up_proj/kernel``), and the
      checkpoint's tokenizer (None if it has none); plus the HF config dict with
      ``with_config=True``. The module holds the same arrays as
      ``params``; to run other parameters use ``jquant.models.forward(model, qparams, ...)``.

    >>> model, params, tokenizer = load("smollm2-135m")  # doctest: +SKIP
    >>> model.config.num_layers  # doctest: +SKIP
    30
    """
    from jquant.io import MODELS, Checkpoint, load_checkpoint  # io is optional until first use
    from jquant.io.packed import is_packed

    if isinstance(source, Checkpoint):
        ckpt = source
    elif os.fspath(source) not in MODELS and is_packed(os.fspath(source)):
        model, params, tokenizer, config = load_packed(source, dtype=dtype)
        return (model, params, tokenizer, config) if with_config else (model, params, tokenizer)
    else:
        ckpt = load_checkpoint(os.fspath(source), packed=packed)
    config = LlamaConfig.from_hf(ckpt.config)
    model, params = params_from_hf(
        ckpt.tensors, config, dtype=dtype or default_dtype(), param_dtype=param_dtype
    )
    if with_config:
        return model, params, ckpt.tokenizer, dict(ckpt.config)
    return model, params, ckpt.tokenizer


def load_packed(directory, *, dtype=None) -> tuple:
    """Loads a packed checkpoint (`jquant.io.packed.save_packed`), quantized weights straight
    into QArrays: no float copy of a quantized weight is ever made.

    Args:
      directory: a directory `save_packed` wrote.
      dtype: compute dtype of the model (activations, KV cache); default `default_dtype()`.
        Parameters keep their stored dtypes.

    Returns:
      ``(model, params, tokenizer, config)``: the `Llama` module holding ``params``, the
      parameter ``nnx.State`` (QArrays where the checkpoint has them), the `jquant.io.Tokenizer`
      (or None) and the HF-style config dict.

    Raises:
      ValueError: as `jquant.io.packed.read_packed` (naming the directory, and the file and
        arrays a damaged one has).
    """
    from jquant.io.packed import read_packed

    arrays, tokenizer, config = read_packed(directory)
    model, params = model_from_arrays(arrays, config, dtype=dtype)
    return model, params, tokenizer, config


def model_from_arrays(arrays, config, *, dtype=None) -> tuple:
    """``(model, params)`` holding ``arrays`` as they are (QArrays stay QArrays).

    Args:
      arrays: ``{jquant path: array or QArray}`` for every parameter of the model
        (``layers/0/mlp/up_proj/kernel``; kernels in the Dense layout ``(in, out)``, a
        QArray's logical shape), as `jquant.io.packed.read_packed` and the importers of
        other libraries' quantized checkpoints return them.
      config: the HF-style config dict.
      dtype: compute dtype of the model; default `default_dtype()`.

    Raises:
      ValueError: a parameter is missing or extra, or has the wrong logical shape,
        naming it.
    """
    model: Llama = abstract_model(LlamaConfig.from_hf(config), dtype=dtype or default_dtype())
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    paths = {"/".join(map(str, keys)) for keys, _ in flat}
    if paths != set(arrays):
        missing, extra = sorted(paths - set(arrays)), sorted(set(arrays) - paths)
        raise ValueError(
            f"the parameters do not match the model: missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}, not in the model {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''}"
        )
    out = []
    for keys, var in flat:
        path = "/".join(map(str, keys))
        want, got = tuple(var.get_value().shape), tuple(arrays[path].shape)
        if want != got:
            raise ValueError(f"parameter {path} has shape {got}, the model needs {want}")
        out.append((keys, var.replace(value=arrays[path])))
    model = nnx.merge(graphdef, nnx.from_flat_state(out))
    return model, nnx.state(model)
