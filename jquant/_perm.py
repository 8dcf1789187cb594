"""A QArray's input permutation (act-order checkpoints), and group indices <-> permutations.

A GPTQ checkpoint made with act-order (``desc_act``) assigns input row ``k`` of a weight to
group ``g_idx[k]``, and the rows of one group need not be consecutive. jquant stores such a
weight with its rows sorted by group (``perm = argsort(g_idx, stable)``): stored column ``j``
of the codes is logical row ``perm[j]``, so the stored groups are consecutive again and every
kernel and layout rule of `jquant.qarray` holds for the stored codes. A matmul then contracts
``x[..., perm]`` with the stored weight, which sums the same products as ``x @ w``.

`from_g_idx` and `to_g_idx` convert between a checkpoint's ``g_idx`` and ``perm`` (NumPy, at
load and export); `permute_input` is what every matmul of `jquant.ops` applies; `unpermute`
puts stored values back in logical order.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def check_perm(perm, k: int, lead: tuple[int, ...], *, values: bool) -> None:
    """Raises ValueError unless ``perm`` is an integer ``(k,)`` array, or ``(*stack, k)`` for
    QArrays stacked along leading axes ``stack`` (a prefix of the codes' leading axes
    ``lead``: layers stacked for ``lax.scan``), and, when ``values`` (a host array), holds a
    permutation of ``0..k-1`` in each row."""
    shape = tuple(perm.shape)
    if (not shape or shape[-1] != k or shape[:-1] != tuple(lead[: len(shape) - 1])
            or not jnp.issubdtype(perm.dtype, jnp.integer)):  # fmt: skip
        raise ValueError(f"QArray: perm must be an integer array of shape ({k},) (one stored "
                         f"position per input of k={k}; stacked: leading axes of {lead}), "
                         f"got {np.dtype(perm.dtype).name} {shape}")  # fmt: skip
    if values and not (np.sort(np.asarray(perm), axis=-1) == np.arange(k)).all():
        raise ValueError(f"QArray: perm is not a permutation of 0..{k - 1} (an input is "
                         "repeated or missing)")  # fmt: skip


def permute_input(x, w, axis: int):
    """``(x[..., perm] along axis, w without perm)``: the contraction of the two is ``x @ w``'s."""
    if w.perm.ndim != 1:
        raise ValueError(f"a matmul with a stacked QArray's perm of shape {w.perm.shape}: "
                         "slice the stack (as lax.scan over layers does) to one weight first")
    x = jnp.take(x, w.perm, axis=axis, unique_indices=True, indices_are_sorted=False)
    return x, dataclasses.replace(w, perm=None)


def unpermute(stored: jax.Array, perm) -> jax.Array:
    """Values in stored order along the last axis, back in logical order (``perm`` ``(k,)``,
    or stacked ``(*stack, k)`` over the leading axes of ``stored``)."""
    inverse = jnp.argsort(perm, axis=-1)
    if perm.ndim == 1:
        return jnp.take(stored, inverse, axis=-1)
    inverse = inverse.reshape(*perm.shape[:-1], *(1,) * (stored.ndim - perm.ndim), -1)
    return jnp.take_along_axis(stored, inverse, axis=-1)


def from_g_idx(g_idx: np.ndarray, k: int, group_size: int | None, name: str) -> np.ndarray | None:
    """The ``perm`` (int32 ``(k,)``) that sorts inputs by group index ``g_idx``, or None when
    they are in group order already (``g_idx[i] == i // group_size``: no runtime cost).

    Raises:
      ValueError: naming ``name``, when ``g_idx`` is not ``k`` integers, a group index is out
        of ``[0, G)``, or a group holds another number of inputs than ``group_size`` (the
        last group: what is left of ``k``).
    """
    g_idx = np.asarray(g_idx)
    groups = 1 if group_size is None else -(-k // group_size)
    if g_idx.shape != (k,) or not np.issubdtype(g_idx.dtype, np.integer):
        raise ValueError(f"{name} has shape {g_idx.shape} ({g_idx.dtype}), expected {k} "
                         "integer group indices (one per input)")  # fmt: skip
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise ValueError(f"{name} holds group indices in [{g_idx.min()}, {g_idx.max()}], "
                         f"outside [0, {groups - 1}] ({k} inputs, group_size={group_size})")
    counts = np.bincount(g_idx, minlength=groups)
    size = k if group_size is None else group_size
    want = np.full(groups, size)
    want[-1] = k - (groups - 1) * size
    if not np.array_equal(counts, want):
        bad = int(np.flatnonzero(counts != want)[0])
        raise ValueError(f"{name}: group {bad} holds {counts[bad]} inputs, expected "
                         f"{want[bad]} (group_size={group_size}, {k} inputs)")  # fmt: skip
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    return None if np.array_equal(perm, np.arange(k)) else perm


def to_g_idx(perm, k: int, group_size: int | None) -> np.ndarray:
    """The int32 ``g_idx`` of a QArray's ``perm`` (None: consecutive groups): logical input
    ``perm[j]`` is in the group of stored position ``j``."""
    stored = np.arange(k) // (k if group_size is None else group_size)
    if perm is None:
        return stored.astype(np.int32)
    g_idx = np.empty(k, np.int32)
    g_idx[np.asarray(perm)] = stored
    return g_idx
