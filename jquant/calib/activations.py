"""Calibration activations between decoder layers, and the memory a calibration needs.

`Activations` holds the ``(samples, seq_len, hidden)`` inputs of the layer being calibrated
on the host, in the model's compute dtype: in memory, or in a disk-backed file
(`numpy.memmap`) when they would not fit the memory budget. Every pass through a layer reads
them in micro-batches of ``batch`` windows, so the device only ever holds one micro-batch and
its intermediates, whatever the number of calibration windows.

`micro_batch_for` picks the micro-batch from the model's shapes; `estimate` prices a whole
calibration (the float layer, its statistics, GPTQ's working arrays, one micro-batch's
intermediates, the buffers) so that a run with a ``max_memory`` budget can refuse up front,
with the number it needs, instead of failing at layer 20.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jquant.algorithms._gptq_host import SWEEP_BYTES

#: Tokens per micro-batch `micro_batch_for` aims at when the model's intermediates allow.
TOKENS_PER_MICRO_BATCH = 8192
#: Bytes of one micro-batch's intermediates `micro_batch_for` stays under.
MICRO_BATCH_BYTES = 512 * 2**20
#: Python, JAX, its compiled programs and the tokenizer: what a streamed calibration of
#: SmolLM2-135M held beyond its buffers, layer and micro-batch (`docs/scale.md`).
FIXED_OVERHEAD = 700 * 2**20


class Placement:
    """Where calibration runs: the default device, or data-parallel over a mesh.

    With a mesh (one axis, ``axis``, over any number of devices and processes, e.g. every
    device after `jax.distributed.initialize`), each micro-batch's windows are split over
    the devices, every process holding the windows of its own devices; the statistics of a
    pass are then sums over devices (a collective XLA inserts) and come back replicated, as do
    the kernels quantized from them. Without one, everything runs on the default device.
    """

    def __init__(self, mesh: jax.sharding.Mesh | None = None, axis: str = "data"):
        self.mesh, self.axis = mesh, axis
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            if tuple(mesh.axis_names) != (axis,):
                raise ValueError(
                    f"calibration needs a one-axis mesh named {axis!r}, got axes "
                    f"{tuple(mesh.axis_names)}"
                )
            self._rows = NamedSharding(mesh, PartitionSpec(axis))
            self._replicated = NamedSharding(mesh, PartitionSpec())

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.devices.size

    @property
    def processes(self) -> int:
        return 1 if self.mesh is None else len({d.process_index for d in self.mesh.devices.flat})

    @property
    def process(self) -> int:
        return 0 if self.mesh is None else jax.process_index()

    def local_windows(self, samples: int) -> slice:
        """This process's share of ``samples`` windows (consecutive, equal shares)."""
        share = samples // self.processes
        return slice(self.process * share, (self.process + 1) * share)

    def batch(self, local) -> jax.Array:
        """One micro-batch from this process's rows: the global array over the mesh."""
        if self.mesh is None:
            return jnp.asarray(local)
        return jax.make_array_from_process_local_data(self._rows, np.asarray(local))

    def local(self, y) -> np.ndarray:
        """This process's rows of a micro-batch's output, in order."""
        if self.mesh is None:
            return np.asarray(y)
        shards = sorted(y.addressable_shards, key=lambda sh: sh.index[0].start or 0)
        starts = []
        out = []
        for sh in shards:  # a device may hold a copy of rows another local device has
            start = sh.index[0].start or 0
            if start not in starts:
                starts.append(start)
                out.append(np.asarray(sh.data))
        return np.concatenate(out)

    def solver(self, index: int):
        """The device that solves the ``index``-th kernel of a layer: the mesh's devices in
        turn (None without a mesh: the default device)."""
        if self.mesh is None:
            return None
        devices = list(self.mesh.devices.flat)
        return devices[index % len(devices)]

    def owns(self, device) -> bool:
        """Whether this process runs what `solver` gave to ``device``."""
        return device is None or device.process_index == jax.process_index()

    def on(self, device, tree):
        """``tree`` (arrays replicated over the mesh) as copies on ``device``, one of this
        process's devices."""
        if device is None:
            return tree

        def local(x):
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                x = x.addressable_shards[0].data  # a replica: the whole array
            return jax.device_put(x, device)

        return jax.tree.map(local, tree)

    def share(self, solved: dict, shapes: dict):
        """Every kernel's result replicated over the mesh: ``solved`` are this process's
        (on their devices), ``shapes`` the `jax.eval_shape` of the others', whose owners
        broadcast them bit for bit (as bytes: the broadcast sums the owner's values with the
        others' zeros, which would turn a ``-0.0`` into ``0.0``)."""
        if self.mesh is None:
            return solved
        if self.processes > 1:
            from jax.experimental import multihost_utils

            for path in sorted({*solved, *shapes}):  # the same order in every process
                mine = path in solved
                tree = solved[path] if mine else jax.tree.map(
                    lambda s: np.zeros(s.shape, s.dtype), shapes[path])  # fmt: skip
                leaves, treedef = jax.tree.flatten(tree)
                leaves = [np.asarray(x) for x in leaves]
                raw = [np.ascontiguousarray(x).reshape(-1).view(np.uint8) for x in leaves]
                got = multihost_utils.broadcast_one_to_all(raw, is_source=mine)
                out = [np.asarray(b).view(x.dtype).reshape(x.shape) for b, x in zip(got, leaves)]
                solved[path] = jax.tree.unflatten(treedef, out)
        # In one order everywhere: a put over several processes is a collective.
        return {path: self.replicate(solved[path]) for path in sorted(solved)}

    def replicate(self, tree):
        """``tree`` on every device of the mesh (the same values on every process)."""
        if self.mesh is None:
            return tree
        if self.processes > 1:
            # An array committed to this process's device cannot be put on another
            # process's (CPU and GPU have no cross-host transfers): each process puts its
            # own host copy on its devices instead. Arrays already over the mesh stay.
            tree = jax.tree.map(
                lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable
                else x, tree)  # fmt: skip
        return jax.device_put(tree, self._replicated)


class Activations:
    """``shape`` activations of ``dtype`` on the host (in memory, or in a file under
    ``directory``), read and written in micro-batches of ``batch`` windows; with a mesh
    `Placement`, ``shape`` and ``batch`` count this process's windows."""

    def __init__(self, shape: tuple[int, ...], dtype, batch: int, *, directory=None,
                 placement: Placement | None = None):  # fmt: skip
        self.shape, self.dtype, self.batch = tuple(shape), jnp.dtype(dtype), int(batch)
        self.placement = placement or Placement()
        self._file = None
        if directory is None:
            self.array = np.empty(self.shape, self.dtype)
        else:
            fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=directory)
            os.close(fd)
            self._file = name
            self.array = np.memmap(name, dtype=self.dtype, mode="w+", shape=self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def batches(self) -> Iterator[tuple[int, jax.Array]]:
        """``(first local window, array)`` of every micro-batch, in order."""
        for s in range(0, self.shape[0], self.batch):
            yield s, self.placement.batch(self.array[s : s + self.batch])

    def write(self, start: int, values) -> None:
        """Stores a micro-batch's output (this process's rows of it) from window ``start``."""
        values = self.placement.local(values)
        self.array[start : start + len(values)] = values

    def close(self) -> None:
        """Releases the buffer (and deletes its file)."""
        self.array = None
        if self._file is not None:
            os.remove(self._file)
            self._file = None


def micro_batch_for(config, samples: int, seq_len: int, *, multiple: int = 1,
                    budget: int = MICRO_BATCH_BYTES,
                    every_expert: bool = False) -> int:  # fmt: skip
    """The largest divisor of ``samples`` that is a multiple of ``multiple`` (the devices a
    micro-batch is split over) and keeps each device's share within
    `TOKENS_PER_MICRO_BATCH` tokens and ``budget`` bytes of intermediates (``every_expert``:
    the statistics passes send each token through every expert, `window_bytes`).

    >>> from jquant.arch import LlamaConfig
    >>> c = LlamaConfig(vocab_size=8, hidden_size=576, intermediate_size=1536, num_layers=1,
    ...                 num_heads=9, num_kv_heads=3)
    >>> micro_batch_for(c, 128, 512), micro_batch_for(c, 128, 512, multiple=2)
    (8, 16)

    Raises:
      ValueError: no such divisor (``samples`` not a multiple of ``multiple``).
    """
    per_window = window_bytes(config, seq_len, every_expert=every_expert)
    limit = multiple * max(1, min(TOKENS_PER_MICRO_BATCH // seq_len, budget // per_window))
    fits = [d for d in range(multiple, min(samples, limit) + 1, multiple) if samples % d == 0]
    if not fits:
        raise ValueError(
            f"{samples} calibration windows cannot be split evenly over {multiple} devices"
        )
    return max(fits)


def window_bytes(config, seq_len: int, *, every_expert: bool = False) -> int:
    """Float32 bytes of one window's largest intermediates in a decoder layer: the
    attention scores and probabilities, the MLP's intermediates (`_mlp_floats`), and a few
    hidden-size tensors."""
    d = config.hidden_size
    q = config.num_heads * config.head_dim
    scores = 2 * config.num_heads * seq_len * seq_len
    return 4 * seq_len * (6 * d + 3 * q + _mlp_floats(config, every_expert)) + 4 * scores


def _mlp_floats(config, every_expert: bool) -> int:
    """Floats per token of the widest layer's MLP intermediates: a dense MLP's three
    activations; an MoE layer's rows sorted by expert (top-k copies of each token, every
    expert with ``every_expert``), in and out, their three activations, and the shared
    expert's."""
    dense = 3 * config.intermediate_size
    if not config.moe_layers:
        return dense
    rows = config.num_experts if every_expert else config.num_experts_per_tok
    fe = config.moe_intermediate_size or config.intermediate_size
    moe = rows * (2 * config.hidden_size + 3 * fe) + 3 * config.shared_expert_intermediate_size
    return max(moe, dense if len(config.moe_layers) < config.num_layers else 0)


def _mlp_parts(config) -> tuple[int, int, tuple]:
    """``(parameters, statistics floats, (K, N) of each calibrated kernel)`` of the MLP of
    the largest layer kind: a dense MLP, or an MoE layer (router, E experts, a shared expert;
    one ``K x K`` matrix per expert and input)."""
    d, f = config.hidden_size, config.intermediate_size
    kinds = [] if len(config.moe_layers) == config.num_layers else [
        (3 * d * f, d * d + f * f, ((d, f), (f, d)))]  # fmt: skip
    if config.moe_layers:
        e, fs = config.num_experts, config.shared_expert_intermediate_size
        fe = config.moe_intermediate_size or f
        params = e * (3 * d * fe + d) + (3 * d * fs + d if fs else 0)
        stats = e * (d * d + fe * fe) + (d * d + fs * fs if fs else 0)
        kernels = ((d, fe), (fe, d)) + (((d, fs), (fs, d)) if fs else ())
        kinds.append((params, stats, kernels))
    return max(kinds, key=lambda kind: kind[0])


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What a calibration needs (bytes), part by part. The parts outside the layers (the
    embedding table, an untied head) are live only while the model is embedded or its head
    quantized, never with a layer: `total` is the larger of the two stages."""

    fixed: int
    layer: int
    statistics: int
    solve: int
    micro_batch: int
    activations: int
    outside_layers: int

    @property
    def layers_stage(self) -> int:
        return (self.fixed + self.layer + self.statistics + self.solve + self.micro_batch
                + self.activations)  # fmt: skip

    @property
    def outside_stage(self) -> int:
        return self.fixed + self.outside_layers + self.activations

    @property
    def total(self) -> int:
        return max(self.layers_stage, self.outside_stage)

    def describe(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f}"
                          for k, v in dataclasses.asdict(self).items())  # fmt: skip
        return f"{self.total / 2**30:.2f} GiB ({parts} GiB)"


def estimate(config, *, samples: int, seq_len: int, batch: int, compute_dtype,
             param_dtype, spill: bool, calibrated: bool = True,
             every_expert: bool = False) -> Estimate:  # fmt: skip
    """The peak memory of a layer-by-layer quantization, by part (an upper estimate).

    While a layer is processed (the largest kind, where dense and MoE layers mix):

    * the float layer twice (as read, and folded or being replaced by its QArrays);
    * the statistics of one layer (a ``K x K`` float32 matrix per distinct kernel input, per
      expert in an MoE layer);
    * GPTQ's working arrays for the kernel that needs the most (``K²`` floats for the
      factor, factored on the host in place, and six of the sweep's float32 arrays of
      ``K x N`` floats, or of the columns one sweep takes,
      `jquant.algorithms._gptq_host.SWEEP_BYTES`);
    * one micro-batch's intermediates (`window_bytes`);
    * the two activation buffers between layers, unless spilled to disk.

    Outside the layers: the largest parameter outside them (the embedding table, or an
    untied head) twice (as read, and its quantized or written copy), with the activations.
    """
    d = config.hidden_size
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    p_item = jnp.dtype(param_dtype).itemsize
    mlp_params, mlp_stats, mlp_kernels = _mlp_parts(config)
    layer = (d * (q + 2 * kv) + q * d + mlp_params) * p_item
    stats = 4 * (d * d + q * q + mlp_stats) if calibrated else 0
    kernels = ((d, q), (d, kv), (q, d), *mlp_kernels)  # (K, N) of q, k/v, o and the MLP's
    # Besides H (in the statistics): the factor U, made in place from one copy of H by
    # LAPACK, and the sweep's float32 K x cols arrays, cols the columns of one eager sweep
    # (`_gptq_host.sweep_columns`: XLA's buffers for a sweep of Llama-3-8B's whole down_proj
    # were 1.23 GiB = 5.6 K·N floats with the mse clip search). A traced factorization (on
    # an accelerator) holds about 7 K² in device memory instead.
    solve = max(4 * k * k + 6 * min(4 * k * n, SWEEP_BYTES) for k, n in kernels)
    solve = solve if calibrated else 0
    micro = batch * window_bytes(config, seq_len, every_expert=every_expert)
    acts = 0 if spill else 2 * samples * seq_len * d * jnp.dtype(compute_dtype).itemsize
    outside = 2 * config.vocab_size * d * p_item
    return Estimate(fixed=FIXED_OVERHEAD, layer=2 * layer, statistics=stats, solve=solve,
                    micro_batch=micro, activations=acts, outside_layers=outside)  # fmt: skip
