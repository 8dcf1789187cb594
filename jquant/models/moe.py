"""Mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE): a router picks ``k`` experts per
token, each expert is a gated MLP, and their outputs are summed with the routing weights.

Terminology: an **expert** is one gated MLP ``down(act(gate(x)) * up(x))``; the **router**
(``gate`` in transformers' names) scores every expert per token; a token's **top-k** are the
``k`` experts of highest routing probability.

Routing, as transformers' ``MixtralTopKRouter`` / ``Qwen3MoeTopKRouter`` /
``OlmoeTopKRouter`` compute it::

    p = softmax(x @ router.T)            # float32, over the E experts
    w, idx = top_k(p, k)                 # the k largest probabilities and their experts
    w = w / sum(w)                       # Mixtral always; Qwen-MoE, OLMoE when norm_topk_prob
    y = sum_j w_j * expert_{idx_j}(x)

The experts' weights are stacked along a leading expert axis, ``(E, K, N)`` in the Dense
layout, float arrays or QArrays (each expert's ``(K, N)`` slice quantized along its own
``K``). Tokens are sorted by expert and multiplied by one `grouped_matmul` per projection
(``jquant._grouped``): tiles of one expert's rows, each times that expert's weight
(dequantized one expert at a time), so the work is the routed tokens' only, not every token
times every expert, and no float copy of a QArray stack is made. Inside an
`jquant._expert_parallel.expert_parallel` block (the serving runner's, under a mesh with an
``"ep"`` axis) the routed experts run split over devices instead, with the same routing.

Parameter paths of an MoE layer (beside the attention and norms of `jquant.models.llama`)::

    layers/{i}/mlp/gate/weight                        (E, D)     router, HF layout, float
    layers/{i}/mlp/experts/{gate,up}_proj/kernel      (E, D, F)
    layers/{i}/mlp/experts/down_proj/kernel           (E, F, D)
    layers/{i}/mlp/shared_expert/{gate,up,down}_proj/kernel   Qwen2-MoE's shared expert (an
    layers/{i}/mlp/shared_expert_gate/kernel          (D, 1)  MLP every token goes through,
                                                               weighted by sigmoid(x @ gate))

The router is a ``weight`` rather than a ``kernel`` so that recipes' ``kernel$`` rules leave
it in float (a rule that names it still quantizes it; it is dequantized before use).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jquant import _expert_parallel, _grouped, _tap, ops
from jquant.models.config import LlamaConfig
from jquant.qarray import QArray


def _dense(w, dtype) -> jax.Array:
    return w.dequantize(dtype) if isinstance(w, QArray) else w.astype(dtype)


def grouped_matmul(x: jax.Array, w: jax.Array | QArray, group_sizes: jax.Array) -> jax.Array:
    """Rows of ``x (M, K)`` times their group's matrix of ``w (E, K, N)``: rows
    ``sum(group_sizes[:e]) ..`` ``+ group_sizes[e]`` use ``w[e]``. Returns ``(M, N)``.

    ``w`` may be a QArray stack quantized along K (each expert dequantized to ``x.dtype``
    as its rows need it) or a calibration `Tap` (`jquant._tap.resolve_grouped`);
    ``group_sizes`` is int ``(E,)`` and sums to at most ``M`` (rows past the sum come back as
    zeros). See `jquant._grouped.grouped_matmul`.

    >>> x = jnp.ones((3, 2)); w = jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])
    >>> grouped_matmul(x, w, jnp.array([1, 2], jnp.int32))[:, 0].tolist()
    [1.0, 2.0, 2.0]
    """
    if isinstance(w, _tap.Tap):
        w, output = _tap.resolve_grouped(x, w, group_sizes)
        return output(grouped_matmul(x, w, group_sizes))
    return _grouped.grouped_matmul(x, w, group_sizes)


def route(logits: jax.Array, k: int, *, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """``(weights (T, k) float32, experts (T, k) int32)`` of router logits ``(T, E)``:
    softmax in float32, the top ``k`` probabilities, renormalized to sum 1 if ``normalize``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


class ExpertDense(nnx.Module):
    """E stacked Dense kernels ``(E, K, N)`` (arrays or a QArray), applied by `Experts.mlp`."""

    def __init__(self, e: int, k: int, n: int, *, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (e, k, n), param_dtype))


class Experts(nnx.Module):
    """E gated MLPs ``down(act(gate(x)) * up(x))`` on rows sorted by expert."""

    def __init__(self, config: LlamaConfig, act: Callable, *, param_dtype, rngs: nnx.Rngs):
        e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = ExpertDense(e, d, f, **kw)
        self.up_proj = ExpertDense(e, d, f, **kw)
        self.down_proj = ExpertDense(e, f, d, **kw)
        self.act = act

    def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
        return self.mlp(x, group_sizes, *self.stacks())

    def stacks(self) -> tuple:
        """The ``(gate, up, down)`` stacks' values."""
        return tuple(p.kernel.get_value() for p in (self.gate_proj, self.up_proj,
                                                    self.down_proj))  # fmt: skip

    def mlp(self, x: jax.Array, group_sizes: jax.Array, gate, up, down) -> jax.Array:
        """The experts' MLP on rows ``x`` sorted by expert, with the stacks given."""
        h = self.act(grouped_matmul(x, gate, group_sizes)) * grouped_matmul(x, up, group_sizes)
        return grouped_matmul(h, down, group_sizes)


class Router(nnx.Module):
    """The router's ``(E, D)`` weight (HF layout): logits ``x @ weight.T`` in float32."""

    def __init__(self, e: int, d: int, *, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (e, d), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = _dense(self.weight.get_value(), x.dtype)
        return jnp.einsum("td,ed->te", x, w, preferred_element_type=jnp.float32)


class SharedGate(nnx.Module):
    """Qwen2-MoE's ``shared_expert_gate``: ``x @ kernel``, kernel ``(D, 1)`` (float or QArray)."""

    def __init__(self, d: int, *, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d, 1), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.qdot(x, self.kernel.get_value())


class MoE(nnx.Module):
    """A sparse MoE block in place of the MLP: routing as in the module docstring.

    Args:
      config: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size`` and
        ``norm_topk_prob`` are read.
      act: the experts' activation (the config's ``hidden_act``).
      shared: Qwen2-MoE's shared expert (a dense MLP module) or None; its output, times
        ``sigmoid(x @ shared_expert_gate)``, is added to the routed experts'.
    """

    def __init__(self, config: LlamaConfig, act: Callable, *, shared: nnx.Module | None = None,
                 param_dtype, rngs: nnx.Rngs):  # fmt: skip
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.gate = Router(config.num_experts, config.hidden_size, **kw)
        self.experts = Experts(config, act, **kw)
        self.shared_expert = shared
        if shared is not None:
            self.shared_expert_gate = SharedGate(config.hidden_size, param_dtype=param_dtype,
                                                 rngs=rngs)  # fmt: skip
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.normalize = config.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        shape, k = x.shape, self.top_k
        tokens = x.reshape(-1, shape[-1])
        weights, experts = route(self.gate(tokens), k, normalize=self.normalize)
        plan = _expert_parallel.current()
        if plan is not None:  # experts split over devices: `jquant._expert_parallel`
            out = _expert_parallel.routed(plan, tokens, weights, experts,
                                          self.experts.stacks(), self.experts.mlp)  # fmt: skip
        else:
            flat = experts.reshape(-1)  # token t's j-th choice at t * k + j
            order = jnp.argsort(flat, stable=True)  # (T * k,) grouped by expert
            source = order // k  # the token each sorted row comes from
            sizes = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
            y = self.experts(tokens[source], sizes)
            y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
            out = jnp.zeros_like(tokens).at[source].add(y)
        if self.shared_expert is not None:
            gate = jax.nn.sigmoid(self.shared_expert_gate(tokens))
            out = out + gate * self.shared_expert(tokens)
        return out.reshape(shape)


def route_to_every_expert(module: nnx.Module) -> None:
    """Makes every `MoE` block under ``module`` send each token to all of its experts (top-k
    = E). Calibration runs its statistics passes so when a recipe calibrates each expert on
    every token (``experts: {tokens: all}``); the outputs of such a pass are not the model's."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, MoE):
            m.top_k = m.num_experts
