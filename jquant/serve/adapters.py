"""LoRA adapters per request: several adapters (and none) decoded in one batch, as S-LoRA and
Punica serve them.

Terminology: an *adapter* is one named LoRA (`jquant.qat.lora.LoRA`: an ``a (K, r)`` and a
``b (r, N)`` per adapted kernel, and its alpha); its *slot* is its 1-based number in the
`AdapterSet` (0: no adapter, the base); a step's *rows* are its sequences, each with the
slot of its request.

`AdapterSet.attach` turns every adapted kernel of the runner's weights into a
`jquant._lora.MultiLoRAWeight`: the base kernel as it was (packed, sharded), and every
adapter's ``a`` and ``b`` stacked, ``(A, K, r)`` and ``(A, r, N)`` (``A`` adapters, ``r``
their largest rank: a smaller one is padded with zeros, which add nothing; each adapter's
scale ``alpha / rank`` folded into its ``b``; zeros where an adapter leaves that kernel
alone). Every decoder layer gets the same set of adapted kernels, so the layers still stack
and run as one ``lax.scan``. The step program takes one more argument, the rows' slots
``(R,)``, and `bind_rows` hands them to every such weight inside the program, so requests
with different adapters, and without, share one compiled program and one step.

How a row meets its adapter (`jquant.ops`): ``x @ a`` for all ``A`` adapters at once (one
``(K, A * r)`` matmul), the other adapters' columns set to zero per row, then one
``(A * r, N)`` matmul by every ``b``: all adapters as one LoRA of rank ``A * r``, masked per
row. Decode is bound by memory traffic; this reads each adapter once per step, where a
gather of ``a[slot]``, ``b[slot]`` per row (Punica's BGMV in plain XLA) reads and writes
``R`` copies. Its cost grows with the adapters loaded, not with those a step uses: it suits
a handful of adapters, not hundreds (which want a segmented kernel, SGMV).

Under tensor parallelism the stacks are replicated on the mesh (the base stays sharded);
GSPMD splits the two small matmuls as it sees fit.

>>> lora_x = jquant.qat.lora.load("x.safetensors")  # doctest: +SKIP
>>> engine = Engine(model, params, tokenizer, adapters={"x": lora_x})  # doctest: +SKIP
>>> engine.generate(ids, SamplingParams(max_tokens=8), adapter="x")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jquant import tree
from jquant._lora import MultiLoRAWeight
from jquant.models import core
from jquant.qat import lora

__all__ = ["AdapterSet", "bind_rows"]

#: What an adapter's name may hold (it follows "<model>:" in a request's model id).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LAYER = re.compile(r"layers/(\d+)/(.+)")


class AdapterSet:
    """The adapters one engine serves, checked against its base model.

    Args:
      params: the base model's parameter State (float or quantized).
      adapters: ``{name: lora.LoRA}``, in slot order (the first is slot 1).
      dtype: the dtype the stacks are kept in (the model's compute dtype).

    Raises:
      ValueError: no adapters, a name that `NAME` does not match, or an adapter whose paths
        or shapes the base does not have, or on a kernel serving cannot adapt (only the
        decoder layers' 2-D kernels and ``lm_head``'s); each error names the adapter.
    """

    def __init__(self, params, adapters: Mapping[str, lora.LoRA], *, dtype=jnp.float32):
        if not adapters:
            raise ValueError("AdapterSet: no adapters given")
        have = dict(tree.leaves(params))
        self.names = tuple(adapters)
        self.dtype = dtype
        self._slot = {name: i + 1 for i, name in enumerate(self.names)}
        # per kernel path: one (a, b * scale) per adapter, None where it leaves it alone
        self._parts: dict[str, list] = {}
        for i, (name, loaded) in enumerate(adapters.items()):
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r} must match {NAME.pattern} (letters, "
                                 "digits, '.', '_', '-')")  # fmt: skip
            if not isinstance(loaded, lora.LoRA):
                raise ValueError(f"adapter {name!r}: expected a jquant.qat.lora.LoRA (what "
                                 f"lora.load returns), got {type(loaded).__name__}")  # fmt: skip
            for path in loaded.adapters:
                if path in have and (len(have[path].shape) != 2 or not (
                        _LAYER.fullmatch(path) or path.startswith("lm_head/"))):  # fmt: skip
                    raise ValueError(f"adapter {name!r}: {path} of shape "
                                     f"{tuple(have[path].shape)} cannot carry an adapter in "
                                     "serving (the decoder layers' 2-D kernels and lm_head's "
                                     "can)")  # fmt: skip
            try:
                lora.check(params, loaded.adapters)
            except ValueError as e:
                raise ValueError(f"adapter {name!r} does not fit this model: {e}") from None
            scales = lora.scales(loaded.adapters, loaded.alpha)
            for path, ad in loaded.adapters.items():
                b = np.asarray(ad["b"], np.float32) * np.float32(scales[path])
                self._parts.setdefault(path, [None] * len(adapters))[i] = (
                    np.asarray(ad["a"], np.float32), b)  # fmt: skip
        self.rank = max(a.shape[1] for parts in self._parts.values()
                        for a, _ in filter(None, parts))  # fmt: skip
        # Kernels adapted in some layer are adapted in every layer (zeros), so layers stack.
        self._in_layer = {m.group(2) for m in map(_LAYER.fullmatch, self._parts) if m}

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (0 for None: the base); ValueError naming the ones
        served when there is none of that name."""
        if name is None:
            return 0
        if name not in self._slot:
            raise ValueError(f"unknown adapter {name!r}; this engine serves "
                             f"{list(self.names)}")  # fmt: skip
        return self._slot[name]

    @staticmethod
    def salt(name: str | None) -> bytes:
        """What the prefix-cache digests of a request with adapter ``name`` start from: the
        keys and values differ per adapter, so their pages must not be shared."""
        if name is None:
            return b""
        return hashlib.blake2b(b"jquant.lora\0" + name.encode(), digest_size=16).digest()

    def _stack(self, path: str, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(a (A, K, r), b (A, r, N))`` of the kernel at ``path``, zero-padded."""
        count, r = len(self.names), self.rank
        a, b = np.zeros((count, k, r), np.float32), np.zeros((count, r, n), np.float32)
        for i, part in enumerate(self._parts.get(path, [None] * count)):
            if part is not None:
                a[i, :, : part[0].shape[1]], b[i, : part[1].shape[0]] = part
        return a, b

    def attach(self, w: dict) -> dict:
        """The runner's weights ``w`` (`jquant.models.core.weights`' form, possibly placed on
        a mesh) with every adapted kernel a `MultiLoRAWeight` (its rows unbound)."""

        def wrap(value, stacks: list[tuple[np.ndarray, np.ndarray]], stacked: bool = False):
            """``value`` with the stacks of its layer (each layer's, stacked, if ``stacked``)."""
            a, b = (jnp.asarray(np.stack(x) if stacked else x[0], self.dtype)
                    for x in zip(*stacks))  # fmt: skip
            sharding = getattr(jax.tree.leaves(value)[0], "sharding", None)
            if isinstance(sharding, NamedSharding):  # tensor parallel: replicate the stacks
                a, b = (jax.device_put(x, NamedSharding(sharding.mesh, P())) for x in (a, b))
            return MultiLoRAWeight(value, a, b)

        layers = w["layers"]
        if core.is_stacked(layers):
            count = jax.tree.leaves(layers)[0].shape[0]

            def stacked(p, v):
                if p not in self._in_layer:
                    return v
                k, n = v.shape[1:]
                return wrap(v, [self._stack(f"layers/{i}/{p}", k, n) for i in range(count)],
                            stacked=True)

            layers = tree.map_with_path(stacked, layers)
        else:
            layers = [tree.map_with_path(
                lambda p, v, i=i: wrap(v, [self._stack(f"layers/{i}/{p}", *v.shape)])
                if p in self._in_layer and v.ndim == 2 else v, state)
                for i, state in enumerate(layers)]  # fmt: skip
        out = {**w, "layers": layers}
        if "head" in w:
            out["head"] = tree.map_with_path(
                lambda p, v: wrap(v, [self._stack(f"lm_head/{p}", *v.shape)])
                if f"lm_head/{p}" in self._parts else v, w["head"])  # fmt: skip
        return out


def bind_rows(w, rows: jax.Array):
    """``w`` with each `MultiLoRAWeight`'s rows set to ``rows (R,)`` (broadcast over a
    stacked weight's leading layer axis, which ``lax.scan`` then slices)."""

    def bind(v):
        if not isinstance(v, MultiLoRAWeight):
            return v
        return dataclasses.replace(v, rows=jnp.broadcast_to(rows, v.a.shape[:-3] + rows.shape))

    return jax.tree.map(bind, w, is_leaf=lambda v: isinstance(v, MultiLoRAWeight))
