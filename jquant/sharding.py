"""Sharding QArrays across a device mesh, from the specs of the logical (float) weights.

A model's partitioning rules speak of logical weights: ``P(None, "model")`` for a
``(K, N)`` kernel split along its output features. A QArray stores that weight
as ``qvalue (N, Kbytes)`` and ``scale`` / ``zero_point (N, G)`` (contraction axis
last, see ``jquant.qarray``), so the same spec must be rewritten per leaf:

* the non-contraction axes keep their mesh axes, on ``qvalue`` and on the scales
  alike, so every shard holds the scales of its own rows;
* the contraction axis's mesh axes go to the last axis of ``qvalue``. For byte-wide
  formats with one group along K (per-channel or per-tensor) the bytes are the K
  elements in order, so any split is allowed. Packed sub-byte rows and grouped scales
  may be split only at group boundaries: given the mesh's axis sizes, a split over
  ``n`` devices is allowed when K holds ``G`` full groups (no short last group),
  ``G % n == 0`` and a group packs into whole bytes; then each shard holds ``G / n``
  whole groups, and the scales' group axis is split the same way. Anything else is
  refused (shard the output axis instead, or gather K: it is the axis a matmul sums);
* size-1 scale axes (per-tensor), double-quantized scales and an act-order ``perm`` (K
  indices, `jquant._perm`) are replicated.

Tensor parallelism for the Llama family (``jquant.models.llama``) builds on this:
:func:`tp_logical_specs` gives Megatron-style specs for a parameter State (falling back
to replicated, with a note, for any leaf that cannot be split evenly),
:func:`kv_cache_spec` the KV cache's, :func:`make_tp_mesh` a 1-D ``"tp"`` mesh, and
:func:`shard_for_tp` does all of it at once; :func:`per_device_bytes` reports the
memory each device ends up holding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jquant.kernels._formats import packed_group_bytes
from jquant.qarray import QArray, is_qarray
from jquant.tree import map_with_path


def storage_partition_spec(
    qarray: QArray, logical_spec, mesh_shape: Mapping[str, int] | Mesh | None = None
) -> QArray:
    """The ``PartitionSpec`` of each storage leaf of ``qarray`` for a logical spec.

    Args:
      qarray: a QArray.
      logical_spec: a ``PartitionSpec`` (or None: replicated) over the logical
        shape ``qarray.shape``; shorter specs are padded with None.
      mesh_shape: the mesh's axis sizes (``{"tp": 8}``, or a ``Mesh``). Needed only
        to split the contraction axis of packed or grouped storage, which is allowed
        at group boundaries (see the module docstring).

    Returns:
      A QArray-shaped pytree (same static fields) whose leaves are PartitionSpecs:
      pass it, mapped to ``NamedSharding``, to ``jax.device_put`` or as
      ``in_shardings`` / ``out_shardings`` of ``jax.jit``.

    Raises:
      ValueError: if the spec is longer than the array's rank, or shards the
        contraction axis of a packed or grouped QArray without ``mesh_shape``, or
        where the split would cut a group (the message gives K, the groups and
        the number of devices).

    >>> import jax.numpy as jnp
    >>> from jquant.qarray import quantize_array
    >>> w = quantize_array(jnp.ones((256, 64)), "int4", group_size=128)
    >>> s = storage_partition_spec(w, P(None, "model"))
    >>> s.qvalue, s.scale
    (P('model', None), P('model', None))
    >>> s = storage_partition_spec(w, P("tp", None), {"tp": 2})  # 2 groups over 2 devices
    >>> s.qvalue, s.scale
    (P(None, 'tp'), P(None, 'tp'))
    """
    spec = tuple(logical_spec or ())
    if len(spec) > qarray.ndim:
        raise ValueError(
            f"storage_partition_spec: {P(*spec)} has {len(spec)} entries but the QArray "
            f"has shape {qarray.shape}"
        )
    spec = spec + (None,) * (qarray.ndim - len(spec))
    axis = qarray.ndim + qarray.axis
    k_spec, other = spec[axis], spec[:axis] + spec[axis + 1 :]
    if k_spec is not None and (qarray.format.packed or qarray.num_groups > 1):
        _check_group_aligned(qarray, P(*spec), axis, k_spec, mesh_shape)
    # The scales' group axis follows K's split (it has G > 1 entries only when grouped).
    return dataclasses.replace(
        qarray,
        qvalue=P(*other, k_spec),
        scale=_scale_spec(qarray.scale, other, k_spec),
        zero_point=None
        if qarray.zero_point is None
        else _scale_spec(qarray.zero_point, other, k_spec),
        perm=None if qarray.perm is None else P(None),  # K indices: small, replicated
    )


def _check_group_aligned(qarray: QArray, spec, axis: int, k_spec, mesh_shape) -> None:
    """Raises unless splitting the contraction axis over ``k_spec`` keeps groups whole."""
    where = f"storage_partition_spec: {spec} shards axis {axis} of {qarray!r}, its contraction axis"
    if mesh_shape is None:
        raise ValueError(
            f"{where}; packed or grouped storage cannot be split along it without the "
            "mesh's axis sizes (pass mesh_shape to split at group boundaries). Shard "
            "another axis, or quantize per-channel with a byte-wide format"
        )
    sizes = dict(getattr(mesh_shape, "shape", mesh_shape))
    names = k_spec if isinstance(k_spec, tuple) else (k_spec,)
    missing = [a for a in names if a not in sizes]
    if missing:
        raise ValueError(f"{where}; mesh axes {missing} are not in the mesh {sizes}")
    n = math.prod(sizes[a] for a in names)
    reason = group_split_problem(qarray, n)
    if reason is not None:
        raise ValueError(
            f"{where}, over {n} devices (mesh axes {names}): {reason}, so a shard would cut "
            "a group. Shard another axis, use fewer devices, or a group size that divides K / n"
        )


def group_split_problem(qarray: QArray, n: int) -> str | None:
    """Why ``qarray``'s contraction axis cannot be split into ``n`` shards of whole
    groups, or None when it can (or when it is byte-wide and per-channel: any split).

    >>> import jax.numpy as jnp
    >>> from jquant.qarray import quantize_array
    >>> group_split_problem(quantize_array(jnp.ones((512, 8)), "int4", group_size=128), 8)
    'K=512 holds 4 groups of 128, which do not split evenly over 8 devices'
    """
    k, gs, g, fmt = qarray.k, qarray.group_size, qarray.num_groups, qarray.format
    if n == 1 or (g == 1 and not fmt.packed):
        return None
    if g == 1:
        return f"K={k} is one group of packed {fmt.name} codes (per-channel)"
    if k != g * gs:
        return f"K={k} is {g} groups of {gs}, the last one short ({k - (g - 1) * gs})"
    if g % n:
        return f"K={k} holds {g} groups of {gs}, which do not split evenly over {n} devices"
    if fmt.packed and packed_group_bytes(gs, fmt.bits) * 8 != gs * fmt.bits:
        return f"a group of {gs} {fmt.name} codes does not pack into whole bytes"
    if qarray.qvalue.shape[-1] != g * packed_group_bytes(gs, fmt.bits):
        return f"qvalue has {qarray.qvalue.shape[-1]} bytes per row, not {g} whole groups"
    return None


def _scale_spec(scale, other, k_spec):
    if isinstance(scale, QArray):  # double-quantized: a few bytes per row, replicate
        return jax.tree.map(lambda _: P(), scale)
    lead, groups = scale.shape[:-1], scale.shape[-1]
    return P(*(s if n > 1 else None for s, n in zip(other, lead)), k_spec if groups > 1 else None)


def shard_params(tree, logical_specs, mesh: Mesh):
    """``jax.device_put`` a parameter tree that may hold QArrays, from logical specs.

    Args:
      tree: parameters (dicts, NNX ``State``, ...) with arrays and QArrays.
      logical_specs: the same structure, with a ``PartitionSpec`` (or None:
        replicated) where ``tree`` has an array or a QArray; a QArray's spec is
        over its logical shape and is rewritten by :func:`storage_partition_spec`
        (with ``mesh``'s axis sizes, so K may be split at group boundaries); a QArray of
        PartitionSpecs gives its storage leaves' specs as they are.
      mesh: the device mesh the spec's axis names refer to.

    Returns:
      ``tree`` with every leaf placed on ``mesh``.

    >>> import jax.numpy as jnp
    >>> from jquant.qarray import quantize_array
    >>> mesh = jax.make_mesh((1,), ("model",))
    >>> params = {"kernel": quantize_array(jnp.ones((8, 4)), "int8")}
    >>> sharded = shard_params(params, {"kernel": P(None, "model")}, mesh)
    >>> sharded["kernel"].qvalue.sharding.spec
    P('model', None)
    """

    def sharding_of(leaf, spec):
        if isinstance(spec, QArray):
            specs = spec
        elif isinstance(leaf, QArray):
            specs = storage_partition_spec(leaf, spec, mesh.shape)
        else:
            specs = spec or P()
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
        )

    shardings = jax.tree.map(sharding_of, tree, logical_specs, is_leaf=is_qarray)
    return jax.device_put(tree, shardings)


# ---- tensor parallelism for the Llama family ------------------------------------------

# Megatron-style: a column-parallel Dense splits its output features N (and its bias), a
# row-parallel one its input features K, so that attention heads and MLP hidden units stay
# on one device between the two and a block needs one all-reduce (of the row-parallel
# output). The embedding and the LM head are split along the vocabulary.
_COLUMN = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
_ROW = frozenset({"o_proj", "down_proj"})
_HEADS = {"q_proj": "num_heads", "o_proj": "num_heads", "k_proj": "num_kv_heads",
          "v_proj": "num_kv_heads"}  # fmt: skip


def _tp_rule(parent: str, name: str, axis: str):
    """The logical spec of the last dims of a Llama leaf (None: replicated by design), and
    whether a rule knows the leaf at all."""
    if parent in _COLUMN:
        return {"kernel": (None, axis), "bias": (axis,)}.get(name), name in ("kernel", "bias")
    if parent in _ROW:
        return {"kernel": (axis, None)}.get(name), name in ("kernel", "bias")
    if (parent, name) == ("embed_tokens", "embedding"):
        return (axis, None), True
    if (parent, name) == ("lm_head", "kernel"):
        return (None, axis), True
    if name == "scale" and parent.endswith("norm"):
        return None, True
    return None, False


def tp_logical_specs(params, tp: int, axis: str = "tp", *, config=None):
    """Megatron-style tensor-parallel logical specs for a Llama-family parameter tree.

    Rules, by parameter path (``jquant.models.llama``'s docstring), applied to a leaf's
    last two logical dims (its last one for biases), so layers stacked along a leading
    axis get None there:

    * ``{q,k,v,gate,up}_proj``: column-parallel, kernel ``P(None, axis)``, bias ``P(axis)``;
    * ``{o,down}_proj``: row-parallel, kernel ``P(axis, None)``; its bias is replicated;
    * ``embed_tokens/embedding (V, D)``: ``P(axis, None)``; ``lm_head/kernel (D, V)``:
      ``P(None, axis)`` (split along the vocabulary);
    * norms are replicated.

    A leaf falls back to replicated, with a note, when the axis to split is not divisible
    by ``tp``, when a QArray's contraction axis cannot be split at group boundaries (see
    :func:`storage_partition_spec`), when ``config`` is given and the attention heads
    (``num_heads`` for q/o, ``num_kv_heads`` for k/v) do not divide by ``tp`` (so no head
    is cut in two), or when no rule knows its path. Replication is always correct: the
    compiler moves data as needed.

    Args:
      params: a parameter tree (``nnx.State``, nested dicts) of arrays, QArrays or
        ``jax.ShapeDtypeStruct``s.
      tp: the number of devices along ``axis``.
      axis: the mesh axis name.
      config: optional ``LlamaConfig`` (anything with ``num_heads``, ``num_kv_heads``),
        for the head checks.

    Returns:
      ``(specs, notes)``: ``specs`` has the structure of ``params`` with a
      ``PartitionSpec`` over each leaf's logical shape (``P()`` where replicated), for
      :func:`shard_params`; ``notes`` is one line per fallback, ``"path (shape): reason"``.

    >>> import jax.numpy as jnp
    >>> params = {"layers": {"0": {"mlp": {"down_proj": {"kernel": jnp.ones((64, 32))}}}},
    ...           "embed_tokens": {"embedding": jnp.ones((30, 32))}}
    >>> specs, notes = tp_logical_specs(params, 4)
    >>> specs["layers"]["0"]["mlp"]["down_proj"]["kernel"], specs["embed_tokens"]["embedding"]
    (P('tp', None), P())
    >>> notes
    ['embed_tokens/embedding (30, 32): axis 0 (30) is not divisible by tp=4; replicated']
    """
    if tp < 1:
        raise ValueError(f"tp_logical_specs: tp={tp} must be >= 1")
    notes: list[str] = []

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        spec, reason = _tp_leaf_spec(path, leaf, shape, tp, axis, config)
        if reason is not None:
            notes.append(f"{path} {shape}: {reason}; replicated")
        return spec

    specs = map_with_path(one, params)
    return specs, notes


def _tp_leaf_spec(path: str, leaf, shape, tp: int, axis: str, config):
    """``(spec, None)``, or ``(P(), reason)`` for a fallback."""
    parts = path.split("/")
    parent, name = (["", *parts])[-2:]
    rule, known = _tp_rule(parent, name, axis)
    if not known:
        return P(), "no tensor-parallel rule for this path"
    if rule is None or tp == 1:
        return P(), None
    if len(shape) < len(rule):
        return P(), f"rank {len(shape)} is below the rule's {P(*rule)}"
    spec = (None,) * (len(shape) - len(rule)) + rule
    dim = spec.index(axis)
    if shape[dim] % tp:
        return P(), f"axis {dim} ({shape[dim]}) is not divisible by tp={tp}"
    heads = _HEADS.get(parent) if config is not None else None
    if heads is not None and getattr(config, heads) % tp:
        return P(), f"{heads}={getattr(config, heads)} is not divisible by tp={tp}"
    if isinstance(leaf, QArray) and dim == len(shape) + leaf.axis:
        reason = group_split_problem(leaf, tp)
        if reason is not None:
            return P(), f"{leaf.qtype} contraction axis: {reason}"
    return P(*spec), None


def kv_cache_spec(num_kv_heads: int, tp: int, axis: str = "tp") -> tuple[P, list[str]]:
    """The spec of the KV cache's keys and values ``(layers, batch, max_len, kv_heads,
    head_dim)``: split along the kv heads (as the column-parallel k/v projections are)
    when ``tp`` divides them, else replicated, with a note.

    >>> kv_cache_spec(8, 4)
    (P(None, None, None, 'tp', None), [])
    >>> kv_cache_spec(2, 4)[1]
    ['KV cache: num_kv_heads=2 is not divisible by tp=4; replicated']
    """
    if tp > 1 and num_kv_heads % tp:
        return P(), [f"KV cache: num_kv_heads={num_kv_heads} is not divisible by tp={tp}; "
                     "replicated"]  # fmt: skip
    return P(None, None, None, axis, None), []


def shard_kv_cache(cache, mesh: Mesh, axis: str = "tp"):
    """Places a ``jquant.models.KVCache`` on ``mesh`` by :func:`kv_cache_spec` (the slot
    mask and index replicated). Returns ``(cache, notes)``."""
    spec, notes = kv_cache_spec(cache.k.shape[3], mesh.shape[axis], axis)
    kv, rest = NamedSharding(mesh, spec), NamedSharding(mesh, P())
    placed = cache._replace(
        k=jax.device_put(cache.k, kv), v=jax.device_put(cache.v, kv),
        valid=jax.device_put(cache.valid, rest), index=jax.device_put(cache.index, rest),
    )  # fmt: skip
    return placed, notes


def make_tp_mesh(tp: int, axis: str = "tp", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``axis`` over the first ``tp`` devices (of ``jax.devices()``).

    Raises:
      ValueError: ``tp`` < 1 or more devices asked for than there are.

    >>> make_tp_mesh(1).shape
    OrderedDict([('tp', 1)])
    """
    devices = list(jax.devices() if devices is None else devices)
    if tp < 1 or tp > len(devices):
        raise ValueError(
            f"make_tp_mesh: tp={tp} needs {tp} devices but {len(devices)} "
            f"{'is' if len(devices) == 1 else 'are'} available"
            + (" (tp must be >= 1)" if tp < 1 else "")
            + ("; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N devices"
               if devices and devices[0].platform == "cpu" and tp > len(devices) else "")
        )
    return Mesh(np.array(devices[:tp]), (axis,))


def shard_for_tp(params, tp: int | Mesh, axis: str = "tp", *, config=None):
    """Places a Llama-family parameter tree for tensor parallelism.

    Args:
      params: as for :func:`tp_logical_specs`, with arrays and QArrays.
      tp: a number of devices (a mesh over the first ``tp``, :func:`make_tp_mesh`), or
        a ``Mesh`` with an ``axis`` axis.
      axis, config: as for :func:`tp_logical_specs`.

    Returns:
      ``(params, notes)``: the placed tree, and one line per leaf left replicated.

    >>> sharded, notes = shard_for_tp(params, 8)  # doctest: +SKIP
    >>> per_device_bytes(sharded)  # doctest: +SKIP
    """
    mesh = tp if isinstance(tp, Mesh) else make_tp_mesh(tp, axis)
    specs, notes = tp_logical_specs(params, mesh.shape[axis], axis, config=config)
    return shard_params(params, specs, mesh), notes


def per_device_bytes(tree) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s arrays (QArrays' codes and scales included) held by each device:
    the sum of the sizes of its addressable shards, so a replicated leaf counts in full on
    every device.

    >>> list(per_device_bytes({"w": jax.device_put(np.ones((4, 2), np.float32))}).values())
    [32]
    """
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return dict(sorted(held.items(), key=lambda item: item[0].id))


def parse_mesh(text: str) -> dict[str, int]:
    """The axis sizes of a serving mesh written ``tp=N`` or ``tp=N,ep=M`` (``jquant serve
    --mesh``): tensor parallel over N devices, and expert parallel over M (MoE models).

    >>> parse_mesh("tp=2"), parse_mesh("tp=2,ep=4")
    ({'tp': 2}, {'tp': 2, 'ep': 4})

    Raises:
      ValueError: anything else, or a size below 1; the message starts with ``text`` (repr).
    """
    match = re.fullmatch(r"tp=([0-9]+)(?:,ep=([0-9]+))?", text.strip())
    sizes = {} if not match else {"tp": int(match.group(1))}
    if match and match.group(2) is not None:
        sizes["ep"] = int(match.group(2))
    if not sizes or min(sizes.values()) < 1:
        raise ValueError(f"{text!r}: expected tp=N with N >= 1 devices, e.g. tp=2, or "
                         "tp=N,ep=M (MoE experts split over M >= 1), e.g. tp=2,ep=4")  # fmt: skip
    return sizes
