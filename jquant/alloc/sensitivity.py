"""Sensitivity: what quantizing one tensor alone costs the model's loss, predicted.

For a matmul ``y = x W`` (``W (K, N)``) whose weight changes by ``ΔW``, a second-order
expansion of the summed token cross-entropy ``L``, with the Fisher (squared gradients) for
the curvature, Kronecker-factored as K-FAC does and the output factor kept diagonal, gives

    ΔL / T ≈ ½ Σ_j G_j · ΔW[:, j]ᵀ H ΔW[:, j]

* ``H = E[x xᵀ]``: the input second moment GPTQ minimises against (`jquant.calib.stats`),
* ``G_j = Σ_s (∂L/∂y_sj)² / T``: how much the loss cares about output channel ``j``, summed
  over positions ``s`` and divided by the ``T`` predicted tokens,

so ``ΔL / T`` is the predicted increase of the mean cross-entropy, the log of perplexity.
Two things make it the right measure here. ``H`` scores the weight error the way the
algorithms make it (GPTQ trades a larger weight error for a smaller ``tr(ΔWᵀ H ΔW)``, which
a weight-space norm would count against it); and ``G`` says where in the network the error
lands (the same output error costs more in some layers than in others), which a per-layer
output error alone cannot. Both come from one forward and one backward pass per calibration
batch, so every tensor and every candidate format is priced without running the model again:
a candidate costs only its own quantization.

The embedding table is a gather, whose "input" is one-hot: the cost of a change ``ΔE`` is
``½ Σ_{v,d} C_vd ΔE_vd²`` with ``C_vd`` the squared gradients at the embedding's output
summed over the positions holding token ``v``. A tied LM head sees the same ``ΔE`` as a
matmul ``h Eᵀ`` and adds its own term.

A mixture-of-experts layer's expert stack ``(E, K, N)`` is one tensor with statistics per
expert, from the rows routed to each (`jquant.alloc.experts`).

Summing the predicted costs of every tensor a recipe quantizes predicts the whole recipe's
``Δ log perplexity``; `docs/allocation.md` shows how well, on SmolLM2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jquant import algorithms, tree
from jquant._tap import Rewired, Routed, tapping, with_taps
from jquant.alloc import experts
from jquant.calib import stats
from jquant.models.convert import EMBED_PATH, HEAD_PATH
from jquant.qarray import QArray
from jquant.recipe import Rule


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelStats:
    """What the cost of one matmul kernel needs (see the module docstring)."""

    # H = E[x xᵀ] and the other input statistics; per expert for an expert stack (an
    # expert without rows has zeros, `jquant.calib.stats.from_routed`).
    calibration: stats.Calibration
    grad_sq: np.ndarray  # (N,) G_j; (E, N) for an expert stack, over each expert's rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Statistics:
    """Gradient and input statistics of a model on calibration tokens."""

    # Decoder kernels and an untied head, by parameter path.
    kernels: dict[str, KernelStats]
    # (V, D) C_vd / T: squared gradients at the embedding output, summed per token id.
    embed_grad_sq: np.ndarray
    # The tied head's statistics (the final norm's output and the logits' gradients), as
    # for a kernel (D, V); None for an untied model (its head is in ``kernels``).
    tied_head: KernelStats | None
    # Predicted tokens T, and the float model's mean cross-entropy on them.
    tokens: int
    loss: float
    # Every position of the windows (T plus one per window): the calibration tokens an
    # expert's share of rows is measured against.
    positions: int


@jax.custom_vjp
def _probe(y, p):
    """Identity in ``y``; the cotangent of ``p`` (shape ``(N,)``) is ``Σ g²`` over every
    axis of ``y``'s cotangent ``g`` but the last."""
    return y


def _probe_fwd(y, p):
    return y, None


def _probe_bwd(_, g):
    g32 = g.astype(jnp.float32)
    return g, jnp.sum(g32 * g32, axis=tuple(range(g.ndim - 1)))


_probe.defvjp(_probe_fwd, _probe_bwd)


def _input_stats(x):
    """Unnormalised (sum x xᵀ, sum |x|, max |x|, count) of the rows of ``x (..., K)``."""
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    a = jnp.abs(x)
    return (jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST), jnp.sum(a, axis=0),
            jnp.max(a, axis=0), jnp.float32(x.shape[0]))  # fmt: skip


def _kernel_paths(state) -> list[str]:
    """Matmul kernels ``(K, N)`` and expert stacks ``(E, K, N)``."""
    return [path for path, value in tree.leaves(state)
            if path.endswith("kernel") and getattr(value, "ndim", 0) in (2, 3)]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "paths"))
def _layer_backward(graphdef, state, x, ctx, g_out, *, paths):
    """(∂L/∂x, {path: Σ g²}, {path: input stats}) of one decoder layer."""
    from jquant.models import blocks

    tapped = with_taps(state, set(paths))
    shapes = {p: _leaf(state, p).shape for p in paths}
    probes = {p: jnp.zeros(s[::2] if len(s) == 3 else s[-1:], jnp.float32)
              for p, s in shapes.items()}  # fmt: skip

    def f(x, probes):
        seen: dict[str, Any] = {}

        def handler(xin, tap):
            p = probes[tap.path]
            if isinstance(xin, Routed):  # an expert stack: rows sorted by expert
                seen[tap.path] = experts.routed_input_stats(xin.rows, xin.group_sizes)
                rows = experts.row_experts(xin.group_sizes, xin.rows.shape[0])
                return Rewired(tap.value, lambda y: experts.probe(y, p, rows))
            seen[tap.path] = _input_stats(xin)
            return Rewired(tap.value, lambda y: _probe(y, p))

        with tapping(handler):
            y = blocks.apply_layer(graphdef, tapped, x, ctx)
        return y, seen

    _, vjp, seen = jax.vjp(f, x, probes, has_aux=True)
    gx, gsq = vjp(g_out)
    return gx, gsq, seen


def _leaf(state, path):
    node = state
    for key in path.split("/"):
        node = node[int(key) if key.isdigit() else key]
    return tree.unwrap(node)


@functools.partial(jax.jit, static_argnames=("norm_graphdef", "tied", "softcap"))
def _head_backward(norm_graphdef, norm_params, weight, x, targets, valid, *, tied, softcap):
    """(summed CE, ∂L/∂x, Σ g² over the logits (V,), input stats of the head)."""
    probe = jnp.zeros((weight.shape[0] if tied else weight.shape[1],), jnp.float32)

    def f(x, probe):
        h = nnx.merge(norm_graphdef, norm_params)(x)
        w = weight.astype(jnp.float32)
        dims = (((h.ndim - 1,), (1 if tied else 0,)), ((), ()))
        logits = jax.lax.dot_general(h.astype(jnp.float32), w, dims)
        logits = _probe(logits, probe)
        if softcap is not None:  # Gemma 2's final soft-capping
            logits = jnp.tanh(logits / jnp.float32(softcap)) * jnp.float32(softcap)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, logz - picked, 0.0)), _input_stats(h)

    loss, vjp, hstats = jax.vjp(f, x, probe, has_aux=True)
    gx, gsq = vjp(jnp.float32(1.0))
    return loss, gx, gsq, hstats


@functools.partial(jax.jit, static_argnames=("vocab",))
def _row_grad_sq(g0, ids, *, vocab):
    g = g0.reshape(-1, g0.shape[-1]).astype(jnp.float32)
    return jax.ops.segment_sum(g * g, ids.reshape(-1), num_segments=vocab)


def collect(model, params: nnx.State, tokens, *, batch_size: int = 2,
            progress: bool = True) -> Statistics:  # fmt: skip
    """Gradient and input statistics of a jquant Llama-family model on ``tokens``.

    Args:
      model: the `jquant.models.Llama` (its structure and config).
      params: its float parameter State.
      tokens: int windows ``(samples, seq_len)``; every position but the last predicts the
        next token.
      batch_size: windows per forward/backward pass.
      progress: show a progress bar over the batches.
    """
    from jquant.models import blocks

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"sensitivity needs int token windows (samples, seq_len >= 2), got "
                         f"{tokens.dtype}{list(tokens.shape)}")  # fmt: skip
    config = model.config
    tied = config.tie_word_embeddings
    graphdefs = [blocks.layer_graphdef(model, i) for i in range(config.num_layers)]
    paths = [tuple(_kernel_paths(blocks.layer_params(params, i)))
             for i in range(config.num_layers)]  # fmt: skip
    norm_gd = nnx.graphdef(model.norm)
    head_w = (params["embed_tokens"]["embedding"] if tied else params["lm_head"]["kernel"])
    head_w = tree.unwrap(head_w)
    sums: dict[str, list] = {}
    gsq: dict[str, np.ndarray] = {}
    rows = np.zeros((config.vocab_size, config.hidden_size), np.float64)
    loss_sum, predicted, positions = 0.0, 0, 0
    batches = range(0, tokens.shape[0], batch_size)
    for start in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress):
        ids = jnp.asarray(tokens[start:start + batch_size], jnp.int32)
        x, ctx = blocks.embed(model, params, ids)
        xs = [x]
        for i in range(config.num_layers):
            xs.append(blocks.run_layer(graphdefs[i], blocks.layer_params(params, i), xs[-1],
                                       ctx.at(config, i)))  # fmt: skip
        targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
        valid = jnp.arange(ids.shape[1])[None, :] < ids.shape[1] - 1
        valid = jnp.broadcast_to(valid, ids.shape)
        loss, g, head_gsq, head_stats = _head_backward(
            norm_gd, params["norm"], head_w, xs[-1], targets, valid, tied=tied,
            softcap=config.final_logit_softcap)  # fmt: skip
        loss_sum += float(loss)
        predicted += int(ids.shape[0] * (ids.shape[1] - 1))
        positions += int(ids.size)
        _add(sums, gsq, "head", head_stats, head_gsq)
        for i in reversed(range(config.num_layers)):
            g, layer_gsq, seen = _layer_backward(
                graphdefs[i], blocks.layer_params(params, i), xs[i], ctx.at(config, i), g,
                paths=paths[i])  # fmt: skip
            for p in paths[i]:
                _add(sums, gsq, f"layers/{i}/{p}", seen[p], layer_gsq[p])
        rows += np.asarray(_row_grad_sq(g, ids, vocab=config.vocab_size), np.float64)
    kernels = {path: _kernel_stats(sums[path], gsq[path], predicted)
               for path in sums if path != "head"}  # fmt: skip
    head = _kernel_stats(sums["head"], gsq["head"], predicted)
    if not tied:
        kernels[HEAD_PATH] = head
    return Statistics(
        kernels=kernels, embed_grad_sq=(rows / predicted).astype(np.float32),
        tied_head=head if tied else None, tokens=predicted, loss=loss_sum / predicted,
        positions=positions,
    )  # fmt: skip


def _add(sums, gsq, key, input_stats, grad_sq):
    h, s, m, n = (np.asarray(a, np.float64) for a in input_stats)
    if key not in sums:
        sums[key] = [h, s, m, n]
        gsq[key] = np.asarray(grad_sq, np.float64)
        return
    acc = sums[key]
    acc[0] += h
    acc[1] += s
    acc[2] = np.maximum(acc[2], m)
    acc[3] += n
    gsq[key] += np.asarray(grad_sq, np.float64)


def _kernel_stats(acc, grad_sq, predicted: int) -> KernelStats:
    h, s, m, n = acc
    d = np.maximum(n, 1.0)  # an expert without rows: zeros
    calib = stats.Calibration(
        hessian=jnp.asarray(h / d[..., None, None], jnp.float32),
        mean_abs=jnp.asarray(s / d[..., None], jnp.float32),
        max_abs=jnp.asarray(m, jnp.float32), count=jnp.asarray(n, jnp.float32),
    )  # fmt: skip
    return KernelStats(calibration=calib, grad_sq=(grad_sq / predicted).astype(np.float32))


# ---- candidates and their costs -------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """One way to store a tensor: a recipe rule's settings (without its pattern)."""

    name: str
    settings: Mapping[str, Any]

    def rule(self, pattern: str = ".") -> Rule:
        return Rule(pattern=pattern, **self.settings)

    def resolved(self, path: str) -> Rule:
        """The rule made concrete for a 2-D tensor at ``path`` (skip rules as they are)."""
        rule = self.rule()
        return rule if rule.skip else rule.resolve(path, 2)


def candidate(name: str, **settings) -> Candidate:
    """A `Candidate`; its settings are checked as a rule's are.

    >>> candidate("int8", weight="int8").rule().weight
    'int8'
    """
    c = Candidate(name=name, settings=dict(settings))
    try:
        c.rule()
    except ValueError as e:
        raise ValueError(f"candidate {name!r}: {e}") from None
    return c


@dataclasses.dataclass(frozen=True)
class _Key:
    """A hashable stand-in for a rule in jit's static arguments (keyed by its settings)."""

    text: str
    rule: Rule = dataclasses.field(compare=False, hash=False)


def _delta(w, rule: Rule, path: str, calib, *, positions: int = 0):
    """``(W - dequantized, nbytes)`` of ``w`` under a resolved rule (skip: a float cast); an
    expert stack expert by expert (`jquant.alloc.experts.stack_quantized`; ``positions``:
    the calibration tokens)."""
    if rule.skip:
        dtype = jnp.float32 if rule.dtype is None else jnp.dtype(rule.dtype)
        w32 = jnp.asarray(w, jnp.float32)
        return w32 - w32.astype(dtype).astype(jnp.float32), math.prod(w.shape) * dtype.itemsize
    if experts.is_stack(w):
        q = experts.stack_quantized(w, rule, calib, positions=positions, quantize=_quantize)
    else:
        q, _ = _quantize(w, calib, rule, path)
    return _residual(w, q), q.nbytes


def _quantize(w, calib, rule: Rule, path: str):
    """``(qarray, {})`` of a 2-D ``w`` by ``rule``'s algorithm, one ``jit`` per rule."""
    settings = {k: v for k, v in rule.to_dict().items() if k != "pattern"}
    return _quantize_jit(w, calib, key=_Key(repr(sorted(settings.items())), rule))


@functools.partial(jax.jit, static_argnames=("key",))
def _quantize_jit(w, calib, *, key: _Key):
    rule = key.rule
    out = algorithms.get(rule.algorithm)(w, rule, path="tensor", calibration=calib)
    q, _ = algorithms.split_result(rule.algorithm, out)
    assert isinstance(q, QArray)
    return q, {}


@jax.jit
def _residual(w, q: QArray):
    return jnp.asarray(w, jnp.float32) - q.dequantize(jnp.float32)


@jax.jit
def _kernel_cost(dw, h, g):
    """½ Σ_j g_j ΔW[:, j]ᵀ H ΔW[:, j] for ``ΔW (K, N)``."""
    return 0.5 * jnp.sum(jnp.dot(h, dw, precision=jax.lax.Precision.HIGHEST) * dw * g[None, :])


@jax.jit
def _rows_cost(de, c):
    """½ Σ C ⊙ ΔE² (the gather)."""
    return 0.5 * jnp.sum(c * de * de)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Option:
    """A candidate for one tensor: its predicted cost (Δ mean CE) and its bytes."""

    cost: float
    nbytes: int


def price(params: nnx.State, statistics: Statistics, kernel_candidates, table_candidates, *,
          progress: bool = True) -> dict[str, dict[str, Option]]:  # fmt: skip
    """Every tensor's `Option` under every candidate: ``{path: {candidate name: Option}}``.

    Decoder kernels (and an untied head) get ``kernel_candidates`` with the statistics
    ``collect`` gathered (GPTQ uses their ``H``), an expert stack one candidate for all its
    experts, priced expert by expert (`jquant.alloc.experts`); the embedding table gets
    ``table_candidates``. A tied model's table is priced twice: as the embedding (path
    ``embed_tokens/embedding``) and as the head (path ``lm_head/kernel``, the same ``ΔE``
    seen by the head's matmul); the allocator adds the two when the table stays shared.
    """
    values = dict(tree.leaves(params))
    out: dict[str, dict[str, Option]] = {}
    jobs = [(p, c) for p in statistics.kernels for c in kernel_candidates]
    bar = tqdm(total=len(jobs) + len(table_candidates), desc="pricing", unit="option",
               disable=not progress)  # fmt: skip
    for path, cand in jobs:
        ks = statistics.kernels[path]
        w = values[path]
        rule = cand.resolved(path)
        dw, nbytes = _delta(w, rule, path, ks.calibration, positions=statistics.positions)
        if experts.is_stack(w):
            cost = experts.stack_cost(dw, *experts.cost_statistics(ks.calibration, ks.grad_sq))
        else:
            cost = _kernel_cost(dw, ks.calibration.hessian, jnp.asarray(ks.grad_sq))
        out.setdefault(path, {})[cand.name] = Option(cost=float(cost), nbytes=int(nbytes))
        bar.update()
    table = values[EMBED_PATH]
    c = jnp.asarray(statistics.embed_grad_sq)
    for cand in table_candidates:
        rule = cand.resolved(EMBED_PATH)
        de, nbytes = _delta(table, rule, EMBED_PATH, None)
        out.setdefault(EMBED_PATH, {})[cand.name] = Option(
            cost=float(_rows_cost(de, c)), nbytes=int(nbytes))
        if statistics.tied_head is not None:
            head = statistics.tied_head
            cost = _kernel_cost(de.T, head.calibration.hessian, jnp.asarray(head.grad_sq))
            out.setdefault(HEAD_PATH, {})[cand.name] = Option(cost=float(cost),
                                                             nbytes=int(nbytes))
        bar.update()
    bar.close()
    return out
