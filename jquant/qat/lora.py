"""QLoRA: low-rank adapters trained on a frozen quantized base.

The base is any quantized tree (`jquant.quantize` with e.g. the ``nf4`` recipe: NF4 in
groups of 64 with double-quantized scales, as in QLoRA). Adapters are a plain dict beside
it, ``{path: {"a": (K, r), "b": (r, N)}}``, that optax trains; :func:`apply` puts them on
the base as `LoRAWeight` leaves, which `jquant.ops` runs as ``x @ base + s * (x @ a) @ b``
(``s = alpha / rank``), so the base stays packed in training and in serving. Then:

* keep them apart: serve ``apply(base, adapters)`` as it is;
* :func:`merge`: one float tree, ``dequantize(base) + s * a @ b``;
* :func:`requantize`: ``jquant.quantize(merge(...), recipe)``, a plain quantized model.

>>> base = jquant.quantize(params, "nf4")                                   # doctest: +SKIP
>>> adapters = lora.init(base, [r"attn/.*_proj/kernel$"], rank=8, key=key)  # doctest: +SKIP
>>> logits = model_fn(lora.apply(base, adapters, alpha=16))                  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jquant import transform, tree
from jquant._lora import LoRAWeight
from jquant.qarray import QArray


def init(base, targets: Sequence[str] | str, *, rank: int = 8, key=None,
         dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:  # fmt: skip
    """Adapters for every 2-D kernel of ``base`` whose path a ``targets`` regex finds.

    ``a`` is drawn from N(0, 1/K) and ``b`` is zero (Hu et al.), so the adapted model
    starts equal to the base.

    Args:
      base: the parameter tree (quantized or float) the adapters will sit on.
      targets: regular expressions searched in parameter paths, e.g.
        ``r"(q|k|v|o)_proj/kernel$"``.
      rank: adapter rank r.
      key: a `jax.random` key (default ``jax.random.key(0)``).
      dtype: adapter dtype.

    Raises:
      ValueError: a regex that matches no parameter (naming it), one that matches a
        parameter that is not a 2-D kernel ``(K, N)``, or a rank that is not a positive
        integer no larger than ``min(K, N)``.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("lora.init: give at least one target regex")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora.init: rank={rank!r} must be a positive integer")
    key = jax.random.key(0) if key is None else key
    leaves = tree.leaves(base)
    compiled = []
    for t in targets:
        try:
            compiled.append(re.compile(t))
        except re.error as e:
            raise ValueError(
                f"lora.init: target {t!r} is not a valid regular expression: {e}") from None
    adapters = {}
    for pattern in compiled:
        hits = [(p, v) for p, v in leaves if pattern.search(p)]
        if not hits:
            sample = [p for p, _ in leaves[:3]]
            raise ValueError(f"lora.init: target {pattern.pattern!r} matches no parameter "
                             f"({len(leaves)} paths, e.g. {sample})")
        for path, value in hits:
            if path in adapters:
                continue
            shape = tuple(getattr(value, "shape", ()))
            if (len(shape) != 2 or path.rsplit("/", 1)[-1] == "embedding"
                    or (isinstance(value, QArray) and value.axis != -2)):
                raise ValueError(f"lora.init: target {pattern.pattern!r} matches {path} of "
                                 f"shape {shape}; adapters go on 2-D kernels (K, N) only")
            k, n = shape
            if rank > min(k, n):
                raise ValueError(f"lora.init: rank={rank} exceeds min(K, N)={min(k, n)} of "
                                 f"{path}")
            key, sub = jax.random.split(key)
            a = jax.random.normal(sub, (k, rank), jnp.float32) / np.float32(math.sqrt(k))
            adapters[path] = {"a": a.astype(dtype), "b": jnp.zeros((rank, n), dtype)}
    return adapters


def _check(have: dict, adapters) -> None:
    for path, ad in adapters.items():
        if path not in have:
            raise ValueError(f"lora: adapter {path!r} has no parameter in the base tree")
        if set(ad) != {"a", "b"}:
            raise ValueError(f"lora: adapter {path!r} needs keys a and b, got {sorted(ad)}")
        k, n = tuple(have[path].shape)
        (ka, ra), (rb, nb) = ad["a"].shape, ad["b"].shape
        if (ka, nb) != (k, n) or ra != rb:
            raise ValueError(f"lora: adapter {path!r} has a {tuple(ad['a'].shape)} and b "
                             f"{tuple(ad['b'].shape)}; the kernel is ({k}, {n})")


def _scale(adapters, alpha: float | None) -> dict[str, float]:
    out = {}
    for path, ad in adapters.items():
        r = ad["a"].shape[1]
        out[path] = 1.0 if alpha is None else float(alpha) / r
    return out


def _map_adapted(base, adapters, alpha, fn):
    """``base`` with ``fn(value, adapter, scale)`` in place of each adapted kernel."""
    _check(dict(tree.leaves(base)), adapters)
    scales = _scale(adapters, alpha)
    return tree.map_with_path(
        lambda p, v: fn(v, adapters[p], scales[p]) if p in adapters else v, base)


def apply(base, adapters, *, alpha: float | None = None):
    """``base`` with each adapted kernel replaced by a `LoRAWeight` (``scale = alpha / r``;
    1 when ``alpha`` is None). Traceable: call it inside the loss."""
    return _map_adapted(base, adapters, alpha,
                        lambda w, ad, scale: LoRAWeight(w, ad["a"], ad["b"], scale))


def merge(base, adapters, *, alpha: float | None = None, dtype=None):
    """A float tree: each adapted kernel is ``dequantize(base) + scale * a @ b`` (in
    ``dtype``, default the base's); other leaves are returned as they are."""

    def merged(w, ad, scale):
        w32 = w.dequantize(jnp.float32) if isinstance(w, QArray) else w.astype(jnp.float32)
        delta = ad["a"].astype(jnp.float32) @ ad["b"].astype(jnp.float32)
        return (w32 + np.float32(scale) * delta).astype(dtype or w.dtype)

    return _map_adapted(base, adapters, alpha, merged)


def requantize(base, adapters, recipe, *, alpha: float | None = None):
    """``jquant.quantize(merge(base, adapters), recipe)``: adapters folded into a quantized
    model (leaves already quantized and not adapted stay as they are)."""
    return transform.quantize(merge(base, adapters, alpha=alpha), recipe)


def num_trainable(adapters) -> int:
    """Adapter parameters (what the optimizer trains)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


def memory(base, adapters, *, optimizer_slots: int = 2) -> dict[str, int]:
    """Bytes of the frozen base (packed), the adapters and the optimizer state
    (``optimizer_slots`` adapter-sized arrays: 2 for Adam), and their total."""
    from jquant.memory import memory_report

    base_bytes = memory_report(base).weight_bytes
    ad = int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(adapters)))  # fmt: skip
    out = {"base": base_bytes, "adapters": ad, "optimizer": optimizer_slots * ad}
    out["total"] = sum(out.values())
    return out
