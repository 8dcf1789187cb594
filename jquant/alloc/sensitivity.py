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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jquant import tree
from jquant._tap import Rewired, Routed, input_key, tapping, with_taps
from jquant.alloc import experts
from jquant.calib import stats


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelStats:
    """What the cost of one matmul kernel needs (see the module docstring)."""

    # H = E[x xᵀ] and the other input statistics; per expert for an expert stack (an
    # expert without rows has zeros, `jquant.calib.stats.from_routed`).
    calibration: stats.Calibration
    grad_sq: np.ndarray  # (N,) G_j; (E, N) for an expert stack, over each expert's rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class Totals:
    """What a `sweep` gathers beside the decoder kernels' statistics."""

    # (V, D) C_vd / T: squared gradients at the embedding output, summed per token id.
    embed_grad_sq: np.ndarray
    # The tied head's statistics (the final norm's output and the logits' gradients), as
    # for a kernel (D, V); None for an untied model (its head is a kernel of its own).
    tied_head: KernelStats | None
    # Predicted tokens T, and the float model's mean cross-entropy on them.
    tokens: int
    loss: float
    # Every position of the windows (T plus one per window): the calibration tokens an
    # expert's share of rows is measured against.
    positions: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Statistics(Totals):
    """Gradient and input statistics of a model on calibration tokens (`collect`)."""

    # Decoder kernels and an untied head, by parameter path.
    kernels: dict[str, KernelStats]


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


def _input_owners(graphdef, state, x, ctx, paths) -> dict[str, str]:
    """Each kernel path -> the first of the paths whose matmuls read the same input (q/k/v,
    gate/up, an expert stack's gate/up share one ``H``): traced once, nothing computed."""
    from jquant.models import blocks

    first: dict[int, str] = {}
    owners: dict[str, str] = {}

    def record(xin, tap):
        owners[tap.path] = first.setdefault(input_key(xin), tap.path)
        return tap.value

    with tapping(record):
        jax.eval_shape(lambda s, x: blocks.apply_layer(graphdef, s, x, ctx),
                       with_taps(state, set(paths)), x)  # fmt: skip
    return owners


@functools.partial(jax.jit, static_argnames=("graphdef", "paths"))
def _layer_backward(graphdef, state, x, ctx, g_out, *, paths):
    """(∂L/∂x, {path: Σ g²}, {path: input stats}) of one decoder layer; the input stats
    once per shared input, under the first path that reads it (`_input_owners`)."""
    from jquant.models import blocks

    tapped = with_taps(state, set(paths))
    shapes = {p: _leaf(state, p).shape for p in paths}
    probes = {p: jnp.zeros(s[::2] if len(s) == 3 else s[-1:], jnp.float32)
              for p, s in shapes.items()}  # fmt: skip

    def f(x, probes):
        seen: dict[str, Any] = {}
        first: set[int] = set()

        def handler(xin, tap):
            p = probes[tap.path]
            owner = input_key(xin) not in first
            first.add(input_key(xin))
            if isinstance(xin, Routed):  # an expert stack: rows sorted by expert
                if owner:
                    seen[tap.path] = experts.routed_input_stats(xin.rows, xin.group_sizes)
                rows = experts.row_experts(xin.group_sizes, xin.rows.shape[0])
                return Rewired(tap.value, lambda y: experts.probe(y, p, rows))
            if owner:
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


def sweep(source, tokens, *, on_layer, batch_size: int = 2, activations=None,
          progress: bool = True) -> Totals:  # fmt: skip
    """Gathers the statistics of ``source``'s model on ``tokens`` one layer at a time.

    A forward pass stores every decoder layer's input, then a backward pass runs from the
    loss down, one layer at a time over every window: when the pass leaves layer ``i``, its
    kernels' statistics are complete, and ``on_layer("layers/i/", state, {path:
    KernelStats})`` receives them (paths relative to the prefix; ``state`` the layer's
    float State) before the next layer's are started; an untied head comes last (prefix
    ``"lm_head/"``, path ``"kernel"``). So at any time the process holds one layer's weights
    and statistics, the activations and the embedding's and head's statistics, whatever
    the depth of the model: what ``on_layer`` keeps is its own choice (`collect` keeps
    everything, `jquant.alloc.measure` only the prices).

    Args:
      source: the float model layer by layer (`jquant.calib.driver.ModelSource`, or a
        checkpoint read from disk, `jquant.calib.stream.StreamSource`).
      tokens: int windows ``(samples, seq_len)``; every position but the last predicts the
        next token.
      on_layer: called once per decoder layer (top first) and for an untied head.
      batch_size: windows per forward/backward pass.
      activations: ``(shape, dtype, batch) -> jquant.calib.activations.Activations``, the
        host buffers of the layers' inputs and gradients (default: in memory; pass one
        with a ``directory`` to keep them on disk).
      progress: show a progress bar over the layers.
    """
    from jquant.calib.activations import Activations
    from jquant.models import blocks

    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"sensitivity needs int token windows (samples, seq_len >= 2), got "
                         f"{tokens.dtype}{list(tokens.shape)}")  # fmt: skip
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    config, model = source.config, source.model
    layers = config.num_layers
    tied = config.tie_word_embeddings
    make = activations or (lambda shape, dtype, batch: Activations(shape, dtype, batch))
    shape = (tokens.shape[0], tokens.shape[1], config.hidden_size)
    dtype = model.dtype
    bar = tqdm(total=2 * layers + 3, desc="sensitivity", unit="pass", disable=not progress)
    xs = [make(shape, dtype, batch_size) for _ in range(layers + 1)]
    grads = make(shape, dtype, batch_size)  # ∂L/∂x at the current layer's output
    try:
        ids = {}
        ctxs = {}
        embed = {"embed_tokens": source.part("embed_tokens")}
        for s in range(0, tokens.shape[0], batch_size):
            ids[s] = jnp.asarray(tokens[s:s + batch_size], jnp.int32)
            x, ctxs[s] = blocks.embed(model, embed, ids[s])
            xs[0].write(s, x)
        del embed
        bar.update()
        for i in range(layers):
            graphdef, state = blocks.layer_graphdef(model, i), source.layer(i)
            for s, x in xs[i].batches():
                xs[i + 1].write(s, blocks.run_layer(graphdef, state, x,
                                                    ctxs[s].at(config, i)))  # fmt: skip
            del state
            bar.update()
        head_part = source.part("embed_tokens" if tied else "lm_head")
        head_w = tree.unwrap(head_part["embedding"] if tied else head_part["kernel"])
        norm_gd, norm = nnx.graphdef(model.norm), source.part("norm")
        head_in: list = []
        head_gsq = None
        loss_sum, predicted = 0.0, 0
        for s, x in xs[layers].batches():
            b = ids[s]
            targets = jnp.concatenate([b[:, 1:], b[:, :1]], axis=1)
            valid = jnp.broadcast_to(jnp.arange(b.shape[1])[None, :] < b.shape[1] - 1, b.shape)
            loss, g, gsq, head_stats = _head_backward(
                norm_gd, norm, head_w, x, targets, valid, tied=tied,
                softcap=config.final_logit_softcap)  # fmt: skip
            loss_sum += float(loss)
            predicted += int(b.shape[0] * (b.shape[1] - 1))
            _add_inputs(head_in, head_stats)
            head_gsq = _add_grad_sq(head_gsq, gsq)
            grads.write(s, g)
        del head_w, head_part
        bar.update()
        for i in reversed(range(layers)):
            graphdef, state = blocks.layer_graphdef(model, i), source.layer(i)
            paths = tuple(_kernel_paths(state))
            batch = jax.ShapeDtypeStruct((min(batch_size, shape[0]), *shape[1:]), dtype)
            owners = _input_owners(graphdef, state, batch, ctxs[0].at(config, i), paths)
            inputs: dict[str, list] = {o: [] for o in set(owners.values())}
            gsq: dict[str, Any] = dict.fromkeys(paths)
            for (s, x), (_, g) in zip(xs[i].batches(), grads.batches(), strict=True):
                g, layer_gsq, seen = _layer_backward(graphdef, state, x, ctxs[s].at(config, i),
                                                     g, paths=paths)  # fmt: skip
                grads.write(s, g)
                for o, acc in inputs.items():
                    _add_inputs(acc, seen[o])
                for p in paths:
                    gsq[p] = _add_grad_sq(gsq[p], layer_gsq[p])
            xs[i].close()
            calibs = {o: _calibration(acc) for o, acc in inputs.items()}
            del inputs
            on_layer(f"layers/{i}/", state, {
                p: KernelStats(calibration=calibs[owners[p]], grad_sq=_mean(gsq[p], predicted))
                for p in paths})  # fmt: skip
            del state, calibs
            bar.update()
        rows = np.zeros((config.vocab_size, config.hidden_size), np.float32)
        for s, g in grads.batches():
            rows += np.asarray(_row_grad_sq(g, ids[s], vocab=config.vocab_size))
        head = KernelStats(calibration=_calibration(head_in),
                           grad_sq=_mean(head_gsq, predicted))  # fmt: skip
        if not tied:
            on_layer("lm_head/", source.part("lm_head"), {"kernel": head})
        bar.update()
    finally:
        for buf in (*xs, grads):
            buf.close()
        bar.close()
    return Totals(embed_grad_sq=(rows / predicted).astype(np.float32),
                  tied_head=head if tied else None, tokens=predicted,
                  loss=loss_sum / predicted, positions=int(tokens.size))  # fmt: skip


def collect(model, params: nnx.State, tokens, *, batch_size: int = 2,
            progress: bool = True) -> Statistics:  # fmt: skip
    """Every kernel's statistics of a float jquant model on ``tokens``, kept in memory
    (`sweep` over the model's layers; for small models and tests: the statistics of a
    large model are hundreds of GB, which `jquant.alloc.measure` prices layer by layer
    instead).

    Args:
      model: the jquant model (its structure and config).
      params: its float parameter State.
      tokens, batch_size, progress: as `sweep`'s.
    """
    from jquant.calib.driver import ModelSource

    kernels: dict[str, KernelStats] = {}

    def keep(prefix, state, stats):
        kernels.update({prefix + p: ks for p, ks in stats.items()})

    totals = sweep(ModelSource(model, params), tokens, on_layer=keep, batch_size=batch_size,
                   progress=progress)  # fmt: skip
    fields = {f.name: getattr(totals, f.name) for f in dataclasses.fields(Totals)}
    return Statistics(kernels=kernels, **fields)


def _add_inputs(acc: list, input_stats) -> None:
    """Adds one batch's ``(Σ x xᵀ, Σ |x|, max |x|, rows)`` to ``acc`` (``Σ x xᵀ``, the one of
    size ``K²`` per kernel or expert, in float32, the rest in float64)."""
    h = np.asarray(input_stats[0], np.float32)
    s, m, n = (np.asarray(a, np.float64) for a in input_stats[1:])
    if not acc:
        acc.extend([h.copy(), s, m, n])
        return
    acc[0] += h
    acc[1] += s
    acc[2] = np.maximum(acc[2], m)
    acc[3] += n


def _add_grad_sq(total, grad_sq):
    g = np.asarray(grad_sq, np.float64)
    return g if total is None else total + g


def _mean(grad_sq, predicted: int) -> np.ndarray:
    return (grad_sq / predicted).astype(np.float32)


def _calibration(acc) -> stats.Calibration:
    """The `stats.Calibration` (means) of accumulated input sums."""
    h, s, m, n = acc
    d = np.maximum(n, 1.0)  # an expert without rows: zeros
    return stats.Calibration(
        hessian=jnp.asarray(h / d.astype(np.float32)[..., None, None]),
        mean_abs=jnp.asarray(s / d[..., None], jnp.float32),
        max_abs=jnp.asarray(m, jnp.float32), count=jnp.asarray(n, jnp.float32),
    )  # fmt: skip
