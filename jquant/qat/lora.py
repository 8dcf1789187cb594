"""QLoRA: low-rank adapters trained on a frozen quantized base.

The base is any quantized tree (`jquant.quantize` with e.g. the ``nf4`` recipe: NF4 in
groups of 64 with double-quantized scales, as in QLoRA). Adapters are a plain dict beside
it, ``{path: {"a": (K, r), "b": (r, N)}}``, that optax trains; :func:`apply` puts them on
the base as `LoRAWeight` leaves, which `jquant.ops` runs as ``x @ base + s * (x @ a) @ b``
(``s = alpha / rank``), so the base stays packed in training and in serving. Then:

* keep them apart: serve ``apply(base, adapters)`` as it is;
* :func:`merge`: one float tree, ``dequantize(base) + s * a @ b``;
* :func:`requantize`: ``jquant.quantize(merge(...), recipe)``, a plain quantized model;
* :func:`save` them to a file of their own, which :func:`load` reads back and ``jquant serve
  --lora NAME=PATH`` serves beside the base, several adapters in one batch.

The file is safetensors: tensors ``<path>/a`` and ``<path>/b`` (``<path>`` the kernel's
parameter path, e.g. ``layers/0/self_attn/q_proj/kernel``), and ``__metadata__`` strings
``format`` (``"jquant.lora"``), ``version`` (``"1"``), ``rank``, ``alpha`` (JSON: a number
or null), ``targets`` (a JSON list of the regexes) and ``base_model`` (free text, "" when
unknown). Every adapter of one file has the same rank.

>>> base = jquant.quantize(params, "nf4")                                   # doctest: +SKIP
>>> adapters = lora.init(base, [r"attn/.*_proj/kernel$"], rank=8, key=key)  # doctest: +SKIP
>>> logits = model_fn(lora.apply(base, adapters, alpha=16))                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant import transform, tree
from jquant._lora import LoRAWeight
from jquant.io import _safetensors
from jquant.qarray import QArray

#: The ``format`` and ``version`` a LoRA file's metadata names.
FORMAT, VERSION = "jquant.lora", "1"


class LoRA(NamedTuple):
    """Adapters and how they apply: what :func:`save` writes and :func:`load` returns."""

    adapters: dict[str, dict[str, jax.Array]]  # {path: {"a": (K, r), "b": (r, N)}}
    alpha: float | None = None  # scale alpha / r (None: 1), as `apply` takes it
    targets: tuple[str, ...] = ()  # the regexes `init` was given (a record)
    base_model: str = ""  # what the base was (a record, e.g. "smollm2-135m")


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


def check(base, adapters) -> None:
    """Raises ValueError naming the first adapter of ``adapters`` that does not fit
    ``base``: a path ``base`` lacks, keys other than ``a`` and ``b``, or shapes that are not
    ``a (K, r)``, ``b (r, N)`` for the 2-D kernel ``(K, N)`` at that path."""
    have = dict(tree.leaves(base))
    for path, ad in adapters.items():
        if path not in have:
            raise ValueError(f"lora: adapter {path!r} has no parameter in the base tree")
        if set(ad) != {"a", "b"}:
            raise ValueError(f"lora: adapter {path!r} needs keys a and b, got {sorted(ad)}")
        shape = tuple(have[path].shape)
        (ka, ra), (rb, nb) = ad["a"].shape, ad["b"].shape
        if len(shape) != 2 or (ka, nb) != shape or ra != rb:
            raise ValueError(f"lora: adapter {path!r} has a {tuple(ad['a'].shape)} and b "
                             f"{tuple(ad['b'].shape)}; the kernel is {shape}")


def scales(adapters, alpha: float | None) -> dict[str, float]:
    """Each adapter's scale: ``alpha / r`` (its rank), 1 when ``alpha`` is None."""
    out = {}
    for path, ad in adapters.items():
        r = ad["a"].shape[1]
        out[path] = 1.0 if alpha is None else float(alpha) / r
    return out


def _map_adapted(base, adapters, alpha, fn):
    """``base`` with ``fn(value, adapter, scale)`` in place of each adapted kernel."""
    check(base, adapters)
    scale = scales(adapters, alpha)
    return tree.map_with_path(
        lambda p, v: fn(v, adapters[p], scale[p]) if p in adapters else v, base)


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


def save(path, adapters, *, alpha: float | None = None, targets: Sequence[str] = (),
         base_model: str = "") -> Path:  # fmt: skip
    """Writes ``adapters`` (and how they apply) to one safetensors file (the layout is in
    the module docstring); written beside ``path`` first, so a failed save leaves no file.

    Args:
      path: the file to write.
      adapters: ``{path: {"a": (K, r), "b": (r, N)}}``, all of one rank ``r``.
      alpha: the ``alpha`` of `apply` (scale ``alpha / r``; None: 1).
      targets: the regexes the adapters were made for (kept as a record).
      base_model: what the base model was (kept as a record).

    Returns:
      ``path`` as a Path.

    Raises:
      ValueError: no adapters, an adapter that is not ``{"a": (K, r), "b": (r, N)}``,
        adapters of different ranks, or an ``alpha`` that is not a finite number.

    >>> lora.save("adapter.safetensors", adapters, alpha=16)  # doctest: +SKIP
    """
    path = Path(path)
    if not adapters:
        raise ValueError("lora.save: no adapters to save")
    ranks = {}
    for name, ad in adapters.items():
        if not isinstance(ad, dict) or set(ad) != {"a", "b"}:
            got = sorted(ad) if isinstance(ad, dict) else type(ad).__name__
            raise ValueError(f"lora.save: adapter {name!r} needs keys a and b, got {got}")
        ranks[name] = _rank(name, tuple(ad["a"].shape), tuple(ad["b"].shape), "lora.save")
    if len(set(ranks.values())) != 1:
        raise ValueError(f"lora.save: one file holds adapters of one rank; got ranks "
                         f"{sorted(set(ranks.values()))}: save them apart")  # fmt: skip
    if alpha is not None and (isinstance(alpha, bool) or not math.isfinite(float(alpha))):
        raise ValueError(f"lora.save: alpha={alpha!r} must be a finite number or None")
    for name, ad in adapters.items():
        for key in ("a", "b"):
            if not jnp.issubdtype(ad[key].dtype, jnp.floating):
                raise ValueError(f"lora.save: adapter {name!r} has {key} of dtype "
                                 f"{ad[key].dtype}; adapters are floating point")  # fmt: skip
    tensors = [(f"{name}/{key}", np.asarray(adapters[name][key]))
               for name in sorted(adapters) for key in ("a", "b")]  # fmt: skip
    metadata = {"format": FORMAT, "version": VERSION, "rank": str(next(iter(ranks.values()))),
                "alpha": json.dumps(None if alpha is None else float(alpha)),
                "targets": json.dumps([str(t) for t in targets]), "base_model": base_model}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _safetensors.write_file(tmp, tensors, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path) -> LoRA:
    """The adapters :func:`save` wrote to ``path``, as NumPy arrays, with their metadata.

    Raises:
      ValueError: naming the file, when it is not a LoRA file of this format (a
        safetensors file without ``format`` ``jquant.lora``, another version), is
        truncated or corrupt (a header that does not parse, bytes past the file's end,
        metadata that contradicts the tensors), or holds a tensor that is not an adapter's.

    >>> lora.load("adapter.safetensors").alpha  # doctest: +SKIP
    16.0
    """
    path = Path(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"lora.load: {path} {why}")

    if not path.is_file():
        raise bad("is not a file")
    try:
        header, meta = _safetensors.read_header_and_metadata(path)
    except ValueError as e:
        raise bad(f"is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise bad(f"is not a jquant LoRA file (metadata format {fmt!r}, not {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise bad(f"has version {meta.get('version')!r}; this jquant reads {VERSION!r}")
    try:
        rank = int(meta["rank"])
        alpha = json.loads(meta["alpha"])
        targets = json.loads(meta["targets"])
        base_model = meta["base_model"]
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"has corrupt metadata ({type(e).__name__}: {e})") from None
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
        raise bad(f"has corrupt metadata: alpha {alpha!r} is not a number")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise bad(f"has corrupt metadata: targets {targets!r} is not a list of strings")
    size = path.stat().st_size
    adapters: dict[str, dict] = {}
    with open(path, "rb") as f:
        for name in sorted(header):
            entry = header[name]
            kernel, _, key = name.rpartition("/")
            if key not in ("a", "b") or not kernel:
                raise bad(f"holds tensor {name!r}, which is no adapter's <path>/a or <path>/b")
            begin, end = entry["offsets"]
            if not jnp.issubdtype(entry["dtype"], jnp.floating):
                raise bad(f"holds tensor {name!r} of dtype {entry['dtype'].name}; adapters are "
                          "floating point")  # fmt: skip
            if not (0 <= begin <= end) or end - begin != math.prod(entry["shape"]) * (
                    entry["dtype"].itemsize):  # fmt: skip
                raise bad(f"is corrupt: tensor {name!r} of shape {entry['shape']} "
                          f"{entry['dtype'].name} spans bytes {begin}..{end}")  # fmt: skip
            if end > size:
                raise bad(f"is truncated: tensor {name!r} ends at byte {end}, the file has "
                          f"{size}")  # fmt: skip
            adapters.setdefault(kernel, {})[key] = _safetensors.read_tensor(
                f, entry["dtype"], entry["shape"], begin, end)
    if not adapters:
        raise bad("holds no adapters")
    for kernel, ad in adapters.items():
        if set(ad) != {"a", "b"}:
            raise bad(f"is corrupt: adapter {kernel!r} has only {sorted(ad)}")
        try:
            r = _rank(kernel, ad["a"].shape, ad["b"].shape, "lora.load")
        except ValueError as e:
            raise bad(f"is corrupt: {e}") from None
        if r != rank:
            raise bad(f"is corrupt: adapter {kernel!r} has rank {r}, the metadata says {rank}")
    return LoRA(adapters, None if alpha is None else float(alpha), tuple(targets), base_model)


def _rank(name: str, a_shape: tuple, b_shape: tuple, op: str) -> int:
    """The rank of an adapter whose ``a`` and ``b`` have these shapes, or ValueError."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0] or a_shape[1] < 1:
        raise ValueError(f"{op}: adapter {name!r} has a {a_shape} and b {b_shape}; an "
                         "adapter is a (K, r) and b (r, N)")  # fmt: skip
    return int(a_shape[1])
