"""Folding per-channel input scales into the op that produces the input.

AWQ and SmoothQuant rescale the input channels of a group of matmuls that share one
input: ``x W = (x / s) (diag(s) W)``. The division by ``s`` is folded into the op that
produces ``x``, so the float model computes exactly what it computed before (up to float
rounding) and only the weights the recipe quantizes, ``diag(s) W``, change:

* an RMSNorm before the matmuls: its weight is divided by ``s`` (a Gemma norm, which
  multiplies by ``1 + w``, gets ``(1 + w) / s - 1``);
* a Dense layer before them (``v_proj`` before ``o_proj``, ``up_proj`` before
  ``down_proj``): its output columns (and bias) are divided by ``s``.

A `Fold` names such a group by parameter paths relative to a decoder layer;
`llama_folds` lists the four of a decoder layer (the MLP reads ``pre_feedforward_layernorm``
in a Gemma 2/3 layer, ``post_attention_layernorm`` elsewhere). Under grouped-query attention the
``o_proj`` input holds each ``v_proj`` output channel once per query head of its group,
so the scale lives on ``v_proj``'s channels and is repeated (`Fold.expand`).

In a mixture-of-experts layer (`jquant.models.moe`) the MLP norm feeds the router, every
expert's ``gate_proj`` / ``up_proj`` (stacks ``(E, D, F)``) and, in Qwen2-MoE, the shared
expert and its gate: one scale per channel for all of them, and the router's weight is
rescaled too (``Fold.routers``), so routing is unchanged. Each expert's ``down_proj`` reads
its own ``up_proj``'s output: that fold has a scale per expert, ``(E, F)`` (``Fold.experts``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jquant.algorithms import awq


@dataclasses.dataclass(frozen=True)
class Fold:
    """Consumers sharing one input, and the parameter that produces it.

    Attributes:
      source: path of the producing parameter, relative to the layer: an RMSNorm weight
        (``input_layernorm/scale``) or a Dense kernel (``self_attn/v_proj/kernel``).
      consumers: kernel paths whose input is the source's output.
      repeat: ``(kv_heads, group, head_dim)`` when the consumers' input holds each source
        channel ``group`` times (grouped-query attention), else None.
      offset: a norm source multiplies by ``offset + weight`` (1 for Gemma, else 0).
      routers: paths of float weights ``(E, K)`` (HF layout, an MoE router) that read the
        same input: rescaled with the consumers (``W' = W · diag(s)``), never quantized.
      experts: the source and consumers are expert stacks ``(E, K, N)`` and each expert has
        its own scale: ``s`` is ``(E, N)`` of the source's output channels.
    """

    source: str
    consumers: tuple[str, ...]
    repeat: tuple[int, int, int] | None = None
    offset: float = 0.0
    routers: tuple[str, ...] = ()
    experts: bool = False

    @property
    def source_is_norm(self) -> bool:
        return not self.source.endswith("kernel")

    def expand(self, s):
        """The consumers' input scale ``(K,)`` of a scale over the source's channels."""
        return s if self.repeat is None else awq.expand_kv_scales(s, *self.repeat)

    def reduce(self, v):
        """The mean over the copies of each source channel of a ``(K,)`` input statistic."""
        return v if self.repeat is None else awq.reduce_kv_channels(v, *self.repeat)


def llama_folds(config, layer: int = 0) -> tuple[Fold, ...]:
    """The folds of decoder layer ``layer`` of any supported family (paths relative to
    ``layers/{layer}/``; a mixture-of-experts layer's differ from a dense one's)."""
    attn, mlp = "self_attn/", "mlp/"
    offset = config.norm_offset
    mlp_norm = "pre_feedforward_layernorm" if config.sandwich_norms else "post_attention_layernorm"
    attention = (
        Fold("input_layernorm/scale", tuple(f"{attn}{p}_proj/kernel" for p in "qkv"),
             offset=offset),  # fmt: skip
        Fold(
            f"{attn}v_proj/kernel",
            (f"{attn}o_proj/kernel",),
            repeat=(config.num_kv_heads, config.num_groups, config.head_dim),
        ),  # fmt: skip
    )
    if not config.is_moe(layer):
        return (*attention,
                Fold(f"{mlp_norm}/scale", (f"{mlp}gate_proj/kernel", f"{mlp}up_proj/kernel"),
                     offset=offset),
                Fold(f"{mlp}up_proj/kernel", (f"{mlp}down_proj/kernel",)))  # fmt: skip
    experts, shared = f"{mlp}experts/", f"{mlp}shared_expert/"
    readers = (f"{experts}gate_proj/kernel", f"{experts}up_proj/kernel")
    folds = [Fold(f"{experts}up_proj/kernel", (f"{experts}down_proj/kernel",), experts=True)]
    if config.shared_expert_intermediate_size:  # Qwen2-MoE
        readers += (f"{mlp}shared_expert_gate/kernel", f"{shared}gate_proj/kernel",
                    f"{shared}up_proj/kernel")  # fmt: skip
        folds.append(Fold(f"{shared}up_proj/kernel", (f"{shared}down_proj/kernel",)))
    norm = Fold(f"{mlp_norm}/scale", readers, offset=offset, routers=(f"{mlp}gate/weight",))
    return (*attention, norm, *folds)


def _variable(state: nnx.State, path: str):
    node = state
    for key in path.split("/"):
        node = node[int(key) if key.isdigit() else key]
    return node


def apply_fold(state: nnx.State, fold: Fold, s) -> None:
    """Divides ``fold.source``'s output by ``s`` and scales the consumers' input rows by
    it (and a router's input columns), in place in the layer State ``state`` (float leaves
    only).

    ``s`` is over the source's output channels (``(K,)`` for a norm, ``(N,)`` of a source
    kernel, ``(E, N)`` of an expert stack with ``fold.experts``); the consumers get
    ``fold.expand(s)``.
    """
    s = jnp.asarray(s, jnp.float32)
    src = _variable(state, fold.source)
    value = src.get_value()
    if fold.source_is_norm:
        w = (value.astype(jnp.float32) + fold.offset) / s - fold.offset
        src.set_value(w.astype(value.dtype))
    else:
        src.set_value((value.astype(jnp.float32) / s[..., None, :]).astype(value.dtype))
        bias_path = fold.source[: -len("kernel")] + "bias"
        try:
            bias = _variable(state, bias_path)
        except (KeyError, AttributeError):
            bias = None
        if bias is not None and bias.get_value() is not None:
            b = bias.get_value()
            bias.set_value((b.astype(jnp.float32) / s).astype(b.dtype))
    rows = fold.expand(s)
    for path in fold.consumers:
        var = _variable(state, path)
        w = var.get_value()
        var.set_value((w.astype(jnp.float32) * rows[..., None]).astype(w.dtype))
    for path in fold.routers:
        var = _variable(state, path)
        w = var.get_value()
        var.set_value((w.astype(jnp.float32) * rows).astype(w.dtype))
