"""Memory math: what a parameter tree weighs, and what serving it needs.

The serving estimate follows the usual back-of-the-envelope rule:

    total = weights + KV cache + overhead
    KV cache = batch * context * bytes per token of the cache format
             = batch * context * 2 (K and V) * layers * kv_heads * (head_dim * bytes/elem
               (+ 2 bytes: one bfloat16 scale per token, head and layer, int8 / fp8))
    overhead = ``overhead`` (a fraction, default 10%) * (weights + KV cache)

``fits_on`` compares ``total`` with the memory of one accelerator of each kind.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import numpy as np

from jquant import tree
from jquant.models.cache import KV_CACHE_FORMATS, kv_format
from jquant.qarray import QArray

GB = 1e9

# Memory of one device, in bytes (vendor figures, decimal gigabytes).
ACCELERATORS: dict[str, float] = {
    "H100 80GB": 80 * GB,
    "A100 80GB": 80 * GB,
    "A100 40GB": 40 * GB,
    "L4 24GB": 24 * GB,
    "RTX 4090 24GB": 24 * GB,
    "TPU v5e (16GB/chip)": 16 * GB,
    "TPU v6e (32GB/chip)": 32 * GB,
}

#: The KV-cache formats (`jquant.models.cache.KV_CACHE_FORMATS`: one list for the memory
#: report, the serving cache and every command); their bytes come from the format itself.
KV_FORMATS = KV_CACHE_FORMATS


@dataclasses.dataclass(frozen=True, kw_only=True)
class FormatUsage:
    """Bytes held by all leaves of one format."""

    # Number of leaves (tensors) in this format.
    tensors: int
    # Logical elements (weights) they hold.
    elements: int
    # True storage bytes (packed values + scales + zero points).
    nbytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.elements, 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryReport:
    """Weights by format plus the serving estimate for one batch/context setting."""

    # Format name ("int4", "float32", ...) → usage. Float leaves are keyed by dtype.
    by_format: dict[str, FormatUsage]
    # Batch size and context length the KV cache is sized for.
    batch: int
    context: int
    # KV cache format (a name in KV_FORMATS) and its bytes.
    kv_cache: str
    kv_cache_bytes: int
    # Layers and K/V width (kv_heads * head_dim) the cache was sized from; 0 if unknown.
    layers: int
    kv_width: int
    # Fraction of (weights + KV cache) added for activations, workspace and runtime.
    overhead: float
    # What one token reads: every weight but the experts its router does not pick (a
    # mixture-of-experts layer's stacks count k of their E experts); the totals if dense.
    active_elements: int
    active_bytes: int
    # Experts each token is routed to, and experts per layer; 0 for a dense model.
    experts_per_token: int = 0
    experts: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.by_format.values())

    @property
    def weight_elements(self) -> int:
        return sum(u.elements for u in self.by_format.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / max(self.weight_elements, 1)

    @property
    def overhead_bytes(self) -> int:
        return int(self.overhead * (self.weight_bytes + self.kv_cache_bytes))

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def fits_on(self) -> dict[str, bool]:
        return {name: self.total_bytes <= cap for name, cap in ACCELERATORS.items()}

    def format(self) -> str:
        """A readable multi-line summary."""
        lines = [f"{'format':<12}{'tensors':>8}{'weights':>16}{'MB':>10}{'bits/w':>8}"]
        for name, u in sorted(self.by_format.items(), key=lambda kv: -kv[1].nbytes):
            lines.append(
                f"{name:<12}{u.tensors:>8}{u.elements:>16,}{u.nbytes / 1e6:>10.2f}"
                f"{u.bits_per_weight:>8.3f}"
            )
        lines.append(
            f"{'total':<12}{sum(u.tensors for u in self.by_format.values()):>8}"
            f"{self.weight_elements:>16,}{self.weight_bytes / 1e6:>10.2f}"
            f"{self.bits_per_weight:>8.3f}"
        )
        kv = (
            f"KV cache ({self.kv_cache}, batch {self.batch}, context {self.context}, "
            f"{self.layers} layers x {self.kv_width} K/V width): "
            f"{self.kv_cache_bytes / 1e6:.2f} MB"
        )
        if self.experts:
            lines.append(
                f"{'active':<12}{'':>8}{self.active_elements:>16,}"
                f"{self.active_bytes / 1e6:>10.2f}  (per token: {self.experts_per_token} of "
                f"{self.experts} experts)"
            )
        lines += [
            "",
            kv if self.layers else "KV cache: unknown (no attention layers recognised)",
            f"overhead ({self.overhead:.0%}): {self.overhead_bytes / 1e6:.2f} MB",
            f"total: {self.total_bytes / 1e9:.3f} GB",
            "fits on: " + ", ".join(
                f"{name} {'yes' if ok else 'no'}" for name, ok in self.fits_on.items()),
        ]  # fmt: skip
        return "\n".join(lines)


def _leaf_usage(leaf) -> tuple[str, int, int]:
    if isinstance(leaf, QArray):
        return leaf.qtype, leaf.size, leaf.nbytes
    shape = getattr(leaf, "shape", None)
    if shape is None:
        return "", 0, 0
    dtype = np.dtype(leaf.dtype)
    return dtype.name, math.prod(shape), math.prod(shape) * dtype.itemsize


# A mixture-of-experts stack ``(E, K, N)``: jquant's ``.../experts/{gate,up,down}_proj/kernel``.
_EXPERTS = re.compile(r"(?:^|/)experts/[^/]+/kernel$")
_K_PROJ = re.compile(r"(?:^|/)layers/(\d+)/.*k_proj/kernel$")
_K_NORM = re.compile(r"(?:^|/)layers/\d+/.*k_norm/scale$")
_Q = re.compile(r"(?:^|/)layers/\d+/.*(q_proj/kernel|q_norm/scale)$")


def _infer_kv(paths_and_leaves) -> tuple[int, int, int | None]:
    """``(layers, kv_width, head_dim)`` from ``layers/{i}/.../k_proj/kernel`` leaves (and a
    per-head ``k_norm``, where the model has one), else ``(0, 0, None)``. A q_norm as wide as
    q_proj's output spans the whole projection (OLMoE) and says nothing of the head."""
    layers, width, head_dim, q = set(), 0, None, {}
    for path, leaf in paths_and_leaves:
        if m := _K_PROJ.search(path):
            layers.add(int(m.group(1)))
            width = leaf.shape[-1]
        elif _K_NORM.search(path):
            head_dim = leaf.shape[-1]
        elif m := _Q.search(path):
            q[m.group(1)] = leaf.shape[-1]
    if len(q) == 2 and q["q_proj/kernel"] == q["q_norm/scale"]:
        head_dim = None
    return len(layers), width, head_dim


def memory_report(
    params,
    *,
    batch: int = 1,
    context: int = 4096,
    kv_cache: str = "bfloat16",
    layers: int | None = None,
    kv_width: int | None = None,
    head_dim: int | None = None,
    config: Mapping | None = None,
    overhead: float = 0.1,
    dtype="bfloat16",
    experts_per_token: int | None = None,
) -> MemoryReport:
    """Weighs a parameter tree (QArrays at their true storage) and sizes serving it.

    Args:
      params: a Linen dict, an NNX State or any pytree of arrays and QArrays.
      batch: sequences served at once.
      context: tokens per sequence held in the KV cache.
      kv_cache: KV cache format, one of ``KV_FORMATS``; its bytes per token are the
        serving cache's own (`jquant.models.cache.KVFormat.bytes_per_token`).
      layers, kv_width, head_dim: attention layers, K/V width (kv_heads * head_dim) and
        head_dim; taken from ``config`` (HF keys) if given, else inferred from
        ``layers/{i}/.../k_proj`` (and ``k_norm``). A quantized cache keeps one scale per
        token and head, so it needs ``head_dim``.
      config: a Hugging Face style config dict (num_hidden_layers,
        num_key_value_heads, head_dim or hidden_size / num_attention_heads).
      overhead: fraction of (weights + KV cache) added for runtime overhead.
      dtype: the compute dtype, which the ``none`` cache format stores.
      experts_per_token: a mixture-of-experts model's top-k (default: ``config``'s
        ``num_experts_per_tok``); with it, ``active_elements`` / ``active_bytes`` count
        ``k / E`` of each expert stack ``(E, K, N)``. Without it the active size is reported
        as the total (and ``format`` prints no active row).

    >>> r = memory_report({"w": np.zeros((4096, 4096), np.float16)})
    >>> r.weight_bytes, r.by_format["float16"].bits_per_weight
    (33554432, 16.0)
    """
    if kv_cache not in KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}")
    fmt = kv_format(kv_cache)
    for field, value in (("batch", batch), ("context", context)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{field} must be a positive integer, got {value!r}")
    if not 0 <= overhead < 10:
        raise ValueError(f"overhead={overhead!r} must be a fraction >= 0")
    leaves = tree.leaves(params)
    if experts_per_token is None and config is not None:
        experts_per_token = config.get("num_experts_per_tok")
    usage: dict[str, list[int]] = {}
    idle = [0, 0]  # elements and bytes of the experts a token does not read
    num_experts = set()
    for path, leaf in leaves:
        name, elements, nbytes = _leaf_usage(leaf)
        if elements:
            u = usage.setdefault(name, [0, 0, 0])
            u[0], u[1], u[2] = u[0] + 1, u[1] + elements, u[2] + nbytes
        if elements and _EXPERTS.search(path):
            e = leaf.shape[0]
            if experts_per_token is None:
                continue  # the active size is unknown: reported as the total
            if not 1 <= experts_per_token <= e:
                raise ValueError(f"experts_per_token={experts_per_token} is not in 1..{e} "
                                 f"(the experts of {path})")  # fmt: skip
            num_experts.add(e)
            idle[0] += elements * (e - experts_per_token) // e
            idle[1] += nbytes * (e - experts_per_token) // e
    if config is not None:
        heads = config["num_attention_heads"]
        head_dim = head_dim or config.get("head_dim") or config["hidden_size"] // heads
        layers = config["num_hidden_layers"] if layers is None else layers
        if kv_width is None:
            kv_width = config.get("num_key_value_heads", heads) * head_dim
    if layers is None or kv_width is None or head_dim is None:
        inferred = _infer_kv(leaves)
        layers = inferred[0] if layers is None else layers
        kv_width = inferred[1] if kv_width is None else kv_width
        head_dim = inferred[2] if head_dim is None else head_dim
    if head_dim is None:
        if fmt.quantized and layers:
            raise ValueError(f"kv_cache={kv_cache!r} keeps one scale per token and kv head: "
                             "pass head_dim= or config= (the parameter tree does not say it)")
        head_dim = kv_width  # unquantized bytes depend on the width alone
    if kv_width % max(head_dim, 1):
        raise ValueError(f"kv_width={kv_width} is not a multiple of head_dim={head_dim}")
    kv_heads = kv_width // head_dim if head_dim else 0
    kv_bytes = batch * context * fmt.bytes_per_token(kv_heads, head_dim, layers, dtype)
    elements, nbytes = (sum(u[i] for u in usage.values()) for i in (1, 2))
    return MemoryReport(
        by_format={k: FormatUsage(tensors=v[0], elements=v[1], nbytes=v[2])
                   for k, v in usage.items()},
        batch=batch, context=context, kv_cache=kv_cache, kv_cache_bytes=kv_bytes,
        layers=layers, kv_width=kv_width, overhead=overhead,
        active_elements=elements - idle[0], active_bytes=nbytes - idle[1],
        experts_per_token=experts_per_token if num_experts else 0,
        experts=max(num_experts, default=0),
    )  # fmt: skip

