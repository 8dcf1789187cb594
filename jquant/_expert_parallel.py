"""Expert parallelism: the expert stacks of mixture-of-experts layers split over a mesh axis.

Terminology: the mesh has an **ep** axis (expert parallel) and usually a **tp** axis
(tensor parallel, `jquant.sharding`). Device ``i`` of the ep axis holds the **local
experts** ``i * E / ep .. (i + 1) * E / ep`` of every MoE layer: every storage leaf of an
expert stack with the leading expert axis (float weights, or a QArray's codes, scales, zero
points and act-order ``perm``). Where the tp axis splits every expert's hidden units F
evenly (`hidden_axis`), each device holds ``1 / tp`` of them as well (gate/up on their
output features, down on its input features, at group boundaries). Routers, shared experts
and everything else are placed by the tensor-parallel rules.

The routed experts then run in a ``shard_map`` over the mesh (`routed`): tokens and their
routing (the same router on every device) are replicated, as activations are under tensor
parallelism; each device keeps the (token, choice) pairs routed to its local experts, sorts
them by local expert, runs `jquant._grouped.grouped_matmul` on its local stacks, scatters
the weighted outputs into a ``(T, D)`` partial sum, and a ``psum`` over ep (and tp) adds the
partials. That psum is the all-reduce form of the token exchange: every device sees every
token and only ``(T, D)`` outputs cross devices, once per layer. An all-to-all dispatch
(each token sent only to its experts' devices) moves less data when tokens are many; it is
not built.

The MoE layer (`jquant.models.moe.MoE`) learns the plan from the `expert_parallel` context,
which the serving runner enters while it traces its programs; outside it MoE layers run as
before.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jquant.qarray import QArray
from jquant.sharding import group_split_problem, storage_partition_spec
from jquant.tree import leaves, map_with_path

EP_AXIS = "ep"
TP_AXIS = "tp"
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# An expert stack's path in a parameter tree (`jquant.models.moe`), layers stacked or listed.
EXPERT_PATH = re.compile(r"(?:^|/)experts/(gate_proj|up_proj|down_proj)/kernel$")


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Where MoE layers' experts live: a mesh with an ``"ep"`` axis (and optionally
    ``"tp"``). Hashable, so it can be a static argument of a jitted program."""

    mesh: Mesh  # the serving mesh; its "ep" axis splits the experts

    def __post_init__(self):
        if EP_AXIS not in self.mesh.shape:
            raise ValueError(f"ExpertParallel: the mesh has axes {tuple(self.mesh.shape)}; "
                             f"expert parallelism needs one named {EP_AXIS!r}")  # fmt: skip

    @property
    def ep(self) -> int:
        return self.mesh.shape[EP_AXIS]

    @property
    def tp(self) -> int:
        return self.mesh.shape.get(TP_AXIS, 1)


_PLAN: contextvars.ContextVar[ExpertParallel | None] = contextvars.ContextVar(
    "expert_parallel", default=None
)


@contextlib.contextmanager
def expert_parallel(plan: ExpertParallel | None):
    """Within the block, MoE layers traced run their experts by ``plan`` (None: as usual)."""
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def current() -> ExpertParallel | None:
    """The plan of the innermost `expert_parallel` block, or None."""
    return _PLAN.get()


def hidden_axis(gate, up, down, tp: int) -> str | None:
    """``"tp"`` when all three stacks of a layer (``(..., E, D, F)``, ``(..., E, F, D)``)
    split their hidden units F into ``tp`` whole parts: F divisible by ``tp``, a quantized
    down stack's groups along F not cut (`jquant.sharding.group_split_problem`), no
    act-order ``perm`` on down and no double-quantized scales. Else None (F not split)."""
    f = down.shape[-2]
    if tp == 1 or f % tp:
        return None
    for w in (gate, up, down):
        if isinstance(w, QArray) and (isinstance(w.scale, QArray)
                                      or isinstance(w.zero_point, QArray)):  # fmt: skip
            return None
    if isinstance(down, QArray) and (down.perm is not None
                                     or group_split_problem(down, tp) is not None):  # fmt: skip
        return None
    return TP_AXIS


def stack_specs(w, name: str, hidden: str | None, tp: int, lead: int = 0):
    """The ``PartitionSpec`` of each storage leaf of an expert stack ``w`` (``lead`` leading
    axes, e.g. stacked layers, then ``(E, K, N)``; ``name`` its projection): the expert axis
    on ``"ep"``, F on ``hidden`` (over ``tp`` devices). A QArray gets a QArray of specs (as
    `jquant.sharding.storage_partition_spec` gives); a leaf whose expert axis has size 1 (a
    scale shared by the stack) is not split."""
    rule = (hidden, None) if name == "down_proj" else (None, hidden)
    if not isinstance(w, QArray):
        return P(*(None,) * lead, EP_AXIS, *rule)
    specs = storage_partition_spec(w, P(*(None,) * (lead + 1), *rule), {TP_AXIS: tp})
    return _mark_experts(specs, w, w.shape[lead], lead)


def expert_specs(params, specs, ep: int, tp: int):
    """``(specs, notes)``: ``specs`` (a tree of logical specs over ``params``, e.g.
    `jquant.sharding.tp_logical_specs`'s) with every expert stack's replaced by its
    `stack_specs` (the expert axis over ep, F over tp where `hidden_axis` allows), for
    `jquant.sharding.shard_params`; ``notes``: one line per stack whose F stays whole.

    Raises:
      ValueError: a stack whose expert count ``ep`` does not divide, naming its path.
    """
    values = dict(leaves(params))
    notes: list[str] = []

    def one(path, spec):
        match = EXPERT_PATH.search(path)
        if match is None:
            return spec
        w, base = values[path], path[: path.rindex("experts/")]
        lead = len(w.shape) - 3
        if w.shape[lead] % ep:
            raise ValueError(f"{path} {tuple(w.shape)}: E={w.shape[lead]} experts do not "
                             f"split over ep={ep} devices; use an ep that divides "
                             f"{w.shape[lead]}")  # fmt: skip
        hidden = hidden_axis(*(values[f"{base}experts/{n}/kernel"] for n in _PROJECTIONS), tp)
        if hidden is None and tp > 1:
            notes.append(f"{path} {tuple(w.shape)}: hidden units not split over tp={tp}; "
                         "split over ep only")  # fmt: skip
        return stack_specs(w, match.group(1), hidden, tp, lead)

    return map_with_path(one, specs), notes


def _mark_experts(specs, w, experts: int, lead: int):
    def mark(spec, leaf):
        s = list(tuple(spec) + (None,) * (leaf.ndim - len(spec)))
        if leaf.ndim > lead and leaf.shape[lead] == experts:
            s[lead] = EP_AXIS
        return P(*s)

    return jax.tree.map(mark, specs, w, is_leaf=lambda s: isinstance(s, P))


def routed(plan: ExpertParallel, tokens: jax.Array, weights: jax.Array, experts: jax.Array,
           stacks: tuple, mlp: Callable) -> jax.Array:
    """The routed experts' summed output ``(T, D)`` under ``plan`` (module docstring).

    Args:
      plan: the mesh.
      tokens: ``(T, D)``, replicated.
      weights: ``(T, k)`` float32 routing weights; ``experts`` ``(T, k)`` int32 their experts.
      stacks: the layer's ``(gate, up, down)`` stacks, float or QArrays, placed by
        `stack_specs` (their expert axis split over ep).
      mlp: ``mlp(x, group_sizes, gate, up, down)``, the experts' MLP on rows sorted by
        expert (`jquant.models.moe`), run on the local stacks.
    """
    e = stacks[0].shape[0]
    if e % plan.ep:
        raise ValueError(f"expert parallelism: {e} experts do not split over ep={plan.ep} "
                         "devices")  # fmt: skip
    local, k = e // plan.ep, experts.shape[-1]
    hidden = hidden_axis(*stacks, plan.tp)
    specs = tuple(stack_specs(w, n, hidden, plan.tp) for w, n in zip(stacks, _PROJECTIONS))
    summed = (EP_AXIS, TP_AXIS) if hidden is not None else (EP_AXIS,)

    def body(tokens, weights, experts, gate, up, down):
        if hidden is not None and isinstance(down, QArray):  # its static K: the local part
            down = dataclasses.replace(down, k=down.k // plan.tp)
        slot = experts.reshape(-1) - jax.lax.axis_index(EP_AXIS) * local
        slot = jnp.where((slot >= 0) & (slot < local), slot, local)  # others' pairs: last
        order = jnp.argsort(slot, stable=True)
        sizes = jnp.bincount(slot, length=local + 1)[:local].astype(jnp.int32)
        source = order // k  # the token each sorted row comes from
        y = mlp(tokens[source], sizes, gate, up, down)  # rows past sum(sizes): zeros
        y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
        return jax.lax.psum(jnp.zeros_like(tokens).at[source].add(y), summed)

    # check_vma=False: grouped_matmul's lax.cond joins per-device products with constant
    # zeros, which the varying-axes check refuses; the psum makes the output the same on
    # every device, as out_specs=P() says.
    run = jax.shard_map(body, mesh=plan.mesh, in_specs=(P(), P(), P(), *specs),
                        out_specs=P(), check_vma=False)  # fmt: skip
    return run(tokens, weights, experts, *stacks)
