"""Tensor parallelism for the serving engine: its parameters and paged cache on a mesh.

The rules are `jquant.sharding.tp_logical_specs` (Megatron-style: q/k/v/gate/up split on
their output features, o/down on their input features at group boundaries, the embedding
and the LM head on the vocabulary); the stacked decoder layers get None on their leading
layer axis. The paged cache is split on its kv-head axis when ``tp`` divides the kv heads.
What cannot be split (a dimension ``tp`` does not divide, a contraction axis whose groups do
not fall on shard boundaries, heads that would be cut) stays replicated and is listed in the
notes. The programs then run under GSPMD: the compiler inserts the all-reduces, and the
outputs equal the single-device run's up to float summation order.

A mesh with an ``"ep"`` axis beside ``"tp"`` adds expert parallelism
(`jquant._expert_parallel`): every MoE layer's expert stacks are split on their expert axis
over ep (and on their hidden units over tp where groups allow); the rest is placed as above
and replicated over ep.

>>> engine = Engine(model, params, tokenizer, mesh=2)  # doctest: +SKIP
>>> engine.tp_notes, engine.runner.per_device_bytes()  # doctest: +SKIP
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jquant._expert_parallel import EP_AXIS, EXPERT_PATH, expert_specs
from jquant.sharding import kv_cache_spec, make_tp_mesh, shard_params, tp_logical_specs

AXIS = "tp"


def as_mesh(mesh) -> Mesh:
    """An int ``tp`` as a mesh over the first ``tp`` devices; axis sizes ``{"tp": N, "ep":
    M}`` (`jquant.sharding.parse_mesh`) as a ``(tp, ep)`` mesh over the first ``N * M``; a
    Mesh must have a "tp" axis (and may have an "ep" one)."""
    if isinstance(mesh, Mesh):
        if AXIS not in mesh.shape:
            raise ValueError(f"the mesh has axes {tuple(mesh.shape)}; serving needs one named "
                             f"{AXIS!r}")  # fmt: skip
        return mesh
    if isinstance(mesh, dict) and EP_AXIS in mesh:
        tp, ep, devices = mesh.get(AXIS, 1), mesh[EP_AXIS], jax.devices()
        if min(tp, ep) < 1 or tp * ep > len(devices):
            raise ValueError(f"tp={tp},ep={ep} needs {tp * ep} devices but {len(devices)} "
                             "are available (tp and ep must be >= 1)")  # fmt: skip
        return Mesh(np.array(devices[: tp * ep]).reshape(tp, ep), (AXIS, EP_AXIS))
    return make_tp_mesh(int(mesh[AXIS] if isinstance(mesh, dict) else mesh), AXIS)


def describe(mesh) -> str:
    """``tp=N``, or ``tp=N,ep=M`` for a mesh with an "ep" axis."""
    shape = getattr(mesh, "shape", {})
    if EP_AXIS in shape:
        return ",".join(f"{axis}={shape[axis]}" for axis in (AXIS, EP_AXIS))
    return f"tp={mesh.devices.size}"


def runner_sharder(mesh, config):
    """``(shard, mesh, notes)``: ``shard(params, cache) -> (params, cache)`` places a
    `jquant.serve.runner.Runner`'s parameters (``embed``, stacked or listed ``layers``,
    ``norm``, optional ``head``) and `PagedCache` on ``mesh`` (an int tp or a Mesh)."""
    mesh = as_mesh(mesh)
    tp = mesh.shape[AXIS]
    notes: list[str] = []

    def shard(params, cache):
        if jax.process_count() > 1:
            # An array committed to this process's device cannot be put on the others'
            # devices: each process places its own host copy (the same values everywhere).
            params, cache = jax.tree.map(np.asarray, (params, cache))
        # tp_logical_specs knows the model's own paths: name the runner's parts after them.
        named = {"embed_tokens": params["embed"], "layers": params["layers"],
                 "norm": params["norm"]}  # fmt: skip
        if "head" in params:
            named["lm_head"] = params["head"]
        specs, leaf_notes = tp_logical_specs(named, tp, AXIS, config=config)
        if EP_AXIS in mesh.shape:
            leaf_notes = [n for n in leaf_notes if not EXPERT_PATH.search(n.split(" ")[0])]
            specs, ep_notes = expert_specs(named, specs, mesh.shape[EP_AXIS], tp)
            leaf_notes.extend(ep_notes)
        notes.extend(leaf_notes)
        placed = shard_params(named, specs, mesh)
        out = {"embed": placed["embed_tokens"], "layers": placed["layers"],
               "norm": placed["norm"]}  # fmt: skip
        if "head" in params:
            out["head"] = placed["lm_head"]
        kv_spec, kv_notes = kv_cache_spec(config.num_kv_heads, tp, AXIS)
        notes.extend(kv_notes)
        scale_spec = P(*tuple(kv_spec)[:4]) if len(kv_spec) else P()
        # The paged cache is (layers, pages, kv_heads, positions, head_dim): heads on axis 2.
        kv_spec = P(None, None, AXIS, None, None) if len(kv_spec) else P()
        scale_spec = P(None, None, AXIS, None) if len(scale_spec) else P()

        def put(x, spec):
            return None if x is None else jax.device_put(x, NamedSharding(mesh, spec))

        cache = cache._replace(k=put(cache.k, kv_spec), v=put(cache.v, kv_spec),
                               k_scale=put(cache.k_scale, scale_spec),
                               v_scale=put(cache.v_scale, scale_spec))  # fmt: skip
        return out, cache

    return shard, mesh, notes
