"""Sharding QArrays across a device mesh, from the specs of the logical (float) weights.

A model's partitioning rules speak of logical weights: ``P(None, "model")`` for a
``(K, N)`` kernel split along its output features. A QArray stores that weight
as ``qvalue (N, Kbytes)`` and ``scale`` / ``zero_point (N, G)`` (contraction axis
last, see ``jquant.qarray``), so the same spec must be rewritten per leaf:

* the non-contraction axes keep their mesh axes, on ``qvalue`` and on the scales
  alike, so every shard holds the scales of its own rows;
* the contraction axis's mesh axes go to the last axis of ``qvalue``. This is
  allowed only for byte-wide formats with one group along K (per-channel or
  per-tensor), whose bytes are the K elements in order; packed sub-byte rows and
  grouped scales would be cut across groups, so sharding K is refused for them
  (shard the output axis instead, or gather K: it is the axis a matmul sums);
* size-1 scale axes (per-tensor) and double-quantized scales are replicated.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jquant.qarray import QArray


def storage_partition_spec(qarray: QArray, logical_spec) -> QArray:
    """The ``PartitionSpec`` of each storage leaf of ``qarray`` for a logical spec.

    Args:
      qarray: a QArray.
      logical_spec: a ``PartitionSpec`` (or None: replicated) over the logical
        shape ``qarray.shape``; shorter specs are padded with None.

    Returns:
      A QArray-shaped pytree (same static fields) whose leaves are PartitionSpecs:
      pass it, mapped to ``NamedSharding``, to ``jax.device_put`` or as
      ``in_shardings`` / ``out_shardings`` of ``jax.jit``.

    Raises:
      ValueError: if the spec is longer than the array's rank, or shards the
        contraction axis of a packed or grouped QArray.

    >>> import jax.numpy as jnp
    >>> from jquant.qarray import quantize_array
    >>> w = quantize_array(jnp.ones((256, 64)), "int4", group_size=128)
    >>> s = storage_partition_spec(w, P(None, "model"))
    >>> s.qvalue, s.scale
    (P('model', None), P('model', None))
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
        raise ValueError(
            f"storage_partition_spec: {P(*spec)} shards axis {axis} of {qarray!r}, its "
            "contraction axis; packed or grouped storage cannot be split along it. Shard "
            "another axis, or quantize per-channel with a byte-wide format"
        )
    return dataclasses.replace(
        qarray,
        qvalue=P(*other, k_spec),
        scale=_scale_spec(qarray.scale, other),
        zero_point=None if qarray.zero_point is None else _scale_spec(qarray.zero_point, other),
    )


def _scale_spec(scale, other):
    if isinstance(scale, QArray):  # double-quantized: a few bytes per row, replicate
        return jax.tree.map(lambda _: P(), scale)
    lead = scale.shape[:-1]
    return P(*(s if n > 1 else None for s, n in zip(other, lead)), None)


def shard_params(tree, logical_specs, mesh: Mesh):
    """``jax.device_put`` a parameter tree that may hold QArrays, from logical specs.

    Args:
      tree: parameters (dicts, NNX ``State``, ...) with arrays and QArrays.
      logical_specs: the same structure, with a ``PartitionSpec`` (or None:
        replicated) where ``tree`` has an array or a QArray; a QArray's spec is
        over its logical shape and is rewritten by :func:`storage_partition_spec`.
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
        specs = storage_partition_spec(leaf, spec) if isinstance(leaf, QArray) else spec or P()
        return jax.tree.map(
            lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P)
        )

    shardings = jax.tree.map(sharding_of, tree, logical_specs, is_leaf=_is_qarray)
    return jax.device_put(tree, shardings)


def _is_qarray(x) -> bool:
    return isinstance(x, QArray)
