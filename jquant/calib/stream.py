"""Quantizing a checkpoint larger than memory: read a layer, quantize it, write it, resume.

`quantize_to_disk` reads the float checkpoint one tensor at a time (`jquant.io`'s lazy
loading: Hugging Face safetensors directories, sharded or not, and GGUF files), quantizes
one decoder layer at a time (calibrated layer by layer as `jquant.calib.quantize_model`
does, or with a data-free recipe), and writes each finished layer to the packed checkpoint
at once (`jquant.io.packed.PackedWriter`). The float model never exists whole in memory:
at any time the process holds one layer's float weights and its quantized copy, that
layer's input statistics, the calibration activations (on disk above the memory budget)
and one micro-batch of intermediates.

A run killed at layer ``k`` and started again with the same arguments continues at ``k``:
the finished layers are read back and only run, to bring the calibration activations to
layer ``k`` exactly as the first run had them, so the result is the checkpoint an
uninterrupted run writes (byte for byte on the same machine). Until the last part is
written the output is a hidden ``.NAME.partial`` directory, never loadable as a checkpoint.

>>> path, report = quantize_to_disk("org/Llama-3-8B", "w4a16-gptq-g128", "out/llama-w4",
...                                 max_memory="4GB")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import transform, tree
from jquant.calib import activations as acts_
from jquant.calib._gguf_bound import within_gguf
from jquant.calib.data import DEFAULT_CORPUS
from jquant.calib.driver import SEQUENTIAL, calibrate, needs_calibration
from jquant.recipe import Recipe
from jquant.tree import unwrap

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_bytes(text: str | int | float) -> int:
    """``"4GB"`` → 4e9, ``"4GiB"`` → 4·2³⁰, a plain number is bytes.

    >>> parse_bytes("1.5GiB"), parse_bytes("800MB"), parse_bytes(1024)
    (1610612736, 800000000, 1024)
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"memory size {text!r}: expected a number with a unit, like 4GB or 6GiB")
    unit = (m.group(2) or "").upper()
    base = 1024 ** ("KMGT".index(unit[0]) + 1) if unit.endswith("IB") else _UNITS[unit[:1]]
    return int(float(m.group(1)) * base)


class StreamSource:
    """A checkpoint's float layers read from disk one at a time (`calibrate`'s source).

    Args:
      ckpt: a `jquant.io.Checkpoint` loaded with ``lazy=True``.
      dtype: the compute dtype (activations).
      param_dtype: the dtype float weights are read in (bfloat16 halves a layer's bytes;
        float32 keeps `jquant.models.load`'s numbers).
      untie: give the model its own LM head, a copy of a tied embedding (the recipe names
        the head apart from the embedding).
      rotation_seed: rotate the model as it is read (`jquant.rotate`), with this seed;
        None: as stored.
    """

    def __init__(self, ckpt, *, dtype, param_dtype, untie: bool = False,
                 rotation_seed: int | None = None):  # fmt: skip
        from jquant.arch import LlamaConfig
        from jquant.models.llama import abstract_model
        from jquant.rotate import rotate_config

        self.ckpt, self.dtype, self.param_dtype = ckpt, dtype, param_dtype
        config = LlamaConfig.from_hf(ckpt.config)
        if rotation_seed is not None:
            config = rotate_config(config, rotation_seed)
        self.tied_source = untie and config.tie_word_embeddings
        if self.tied_source:
            config = dataclasses.replace(config, tie_word_embeddings=False)
        self.config = config
        self.model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
        self._abstract = nnx.state(self.model)

    def leaves(self) -> dict[str, Any]:
        return dict(tree.leaves(self._abstract))

    def abstract_layer(self, i: int) -> nnx.State:
        """Layer ``i``'s State with shape placeholders (no memory)."""
        return self._abstract["layers"][i]

    def layer(self, i: int) -> nnx.State:
        from jquant.models.convert import layer_params_from_hf
        from jquant.rotate import rotate_layer

        state = layer_params_from_hf(self.ckpt.tensors, self.config, i,
                                     param_dtype=self.param_dtype)  # fmt: skip
        if self.config.rotation is not None:
            nnx.replace_by_pure_dict(state, rotate_layer(nnx.to_pure_dict(state), self.config))
        return state

    def part(self, name: str) -> nnx.State:
        """``embed_tokens``, ``norm`` or ``lm_head`` (read from disk on each call)."""
        from jquant.rotate import rotate_globals

        rotation = self.config.rotation
        if rotation is None or rotation.residual_online:
            return self._stored(name)
        parts = {n: self._stored(n) for n in ("embed_tokens", "norm", "lm_head")}
        rotated = rotate_globals({n: nnx.to_pure_dict(p) for n, p in parts.items()},
                                 self.config)  # fmt: skip
        nnx.replace_by_pure_dict(parts[name], rotated[name])
        return parts[name]

    def _stored(self, name: str) -> nnx.State:
        from jquant.models.convert import global_params_from_hf

        if name == "lm_head" and self.tied_source:
            table = self._stored("embed_tokens")["embedding"]
            head = jax.tree.map(lambda v: v, self._abstract["lm_head"])
            head["kernel"].set_value(jnp.asarray(unwrap(table)).T)
            return head
        config = self.config
        if self.tied_source:
            config = dataclasses.replace(config, tie_word_embeddings=True)
        return global_params_from_hf(self.ckpt.tensors, config, param_dtype=self.param_dtype,
                                     part=name)[name]  # fmt: skip

    def hf_config(self) -> dict[str, Any]:
        """The checkpoint's config as written: untied when the recipe unties the head."""
        from jquant.rotate import rotated_hf_config

        config = dict(self.ckpt.config)
        if self.tied_source:
            config["tie_word_embeddings"] = False
        if self.config.rotation is not None:
            config = rotated_hf_config(config, self.config)
        return config


def quantize_to_disk(
    source, recipe: Recipe | str, output, *, tokens=None, calib: str = DEFAULT_CORPUS,
    samples: int = 128, seq_len: int = 512, max_memory: str | int | None = None,
    micro_batch: int | None = None, sequential: str = "layer", dtype=None,
    param_dtype=jnp.float32, resume: bool = True, overwrite: bool = False,
    spill_dir=None, placement: acts_.Placement | None = None, progress: bool = True,
    allow_larger: bool = False,
) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Quantizes a checkpoint layer by layer into a packed checkpoint, in bounded memory.

    Args:
      source: anything `jquant.io.load_checkpoint` reads (registry name, HF directory with
        sharded safetensors, ``.gguf`` file, hub id), read lazily.
      recipe: a `Recipe`, a shipped recipe name or a YAML path.
      output: the packed checkpoint directory to write (`jquant.io.packed.PackedWriter`).
      tokens: calibration windows ``(samples, seq_len)``; default: cut from ``calib`` with
        the checkpoint's tokenizer (only when the recipe calibrates).
      calib, samples, seq_len: the calibration corpus and its windows.
      max_memory: a budget (bytes, or ``"4GB"``, ``"6GiB"``): the activations go to disk
        and the micro-batch shrinks as needed to stay within `activations.estimate`; a
        budget the run cannot fit is refused before any work, with the number it needs.
      micro_batch: windows per pass (default: from the model's shapes and the budget).
      sequential: as `quantize_model`.
      dtype: compute dtype (default `jquant.models.default_dtype()`).
      param_dtype: dtype the float weights are read in.
      resume: continue an unfinished run of the same source, recipe and calibration.
      overwrite: replace ``output`` and discard any unfinished run.
      spill_dir: keep the activations in a file under this directory (default: only when
        ``max_memory`` requires it, under the system's temporary directory).
      placement: run data-parallel over a mesh (`activations.Placement`); with several
        processes every process reads the checkpoint and process 0 writes the output.
      progress: show progress bars.
      allow_larger: from a GGUF file, store the embedding table and LM head as the recipe
        says even where that is larger than the file; by default they keep the file's
        format where the recipe's is larger, or the run is refused where jquant has no
        format equal to the file's (`jquant.calib._gguf_bound.within_gguf`).

    Returns:
      ``(path, report)``: the checkpoint and a report dict (as `jquant.calib.apply_recipe`'s,
      plus ``peak_estimate`` bytes, ``micro_batch``, ``spilled`` and ``resumed_layers``).
    """
    from jquant.io import load_checkpoint
    from jquant.io.packed import PackedWriter
    from jquant.models.convert import head_apart
    from jquant.models.load import default_dtype

    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if sequential not in SEQUENTIAL:
        raise ValueError(f"sequential must be one of {SEQUENTIAL}, got {sequential!r}")
    place = placement or acts_.Placement()
    ckpt = load_checkpoint(source, lazy=True)
    dtype = dtype or default_dtype()
    seed = None if recipe.rotation is None else recipe.rotation["seed"]
    probe = StreamSource(ckpt, dtype=dtype, param_dtype=param_dtype)
    # A rotated model's untied table and head are not the file's: none is kept from it.
    recipe, kept = within_gguf(recipe, ckpt.source, probe.leaves(),
                               allow_larger=allow_larger or seed is not None)  # fmt: skip
    src = StreamSource(ckpt, dtype=dtype, param_dtype=param_dtype,
                       untie=head_apart(recipe, probe.config), rotation_seed=seed)  # fmt: skip
    rotated = dataclasses.replace(recipe, rotation=None)  # what quantizes the rotated layers
    config = src.config
    calibrated = needs_calibration(recipe)
    if calibrated and tokens is None:
        if ckpt.tokenizer is None:
            raise ValueError(
                f"recipe {recipe.name!r} needs calibration text, and {source} has no "
                "tokenizer to encode it; pass tokens"
            )
        from jquant.calib.data import calibration_tokens

        tokens = calibration_tokens(ckpt.tokenizer, calib, samples=samples, seq_len=seq_len)
    if calibrated:
        tokens = np.asarray(tokens)
        samples, seq_len = (int(n) for n in tokens.shape)
    batch, spill, need = _fit(config, samples, seq_len, calibrated=calibrated,
                              dtype=dtype, param_dtype=param_dtype, max_memory=max_memory,
                              micro_batch=micro_batch, placement=place,
                              every_expert=recipe.experts.tokens == "all")  # fmt: skip
    fingerprint = {
        "source": str(source), "recipe": recipe.to_yaml(), "sequential": sequential,
        "dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(param_dtype).name,
        "tokens": None if not calibrated else hashlib.sha256(
            np.ascontiguousarray(tokens, np.int64).tobytes()).hexdigest(),
        "processes": place.processes, "devices": place.devices,
    }  # fmt: skip
    writing = place.process == 0
    writer = None
    if writing:
        writer = PackedWriter(output, config=src.hf_config(), fingerprint=fingerprint,
                              overwrite=overwrite, resume=resume)  # fmt: skip
    done = _done_parts(writer, place)
    resumed = sorted(int(p.split(".")[1]) for p in done if p.startswith("layers."))

    def keep(prefix: str, leaves: dict[str, Any]) -> None:
        if prefix.startswith("layers/"):
            part = "layers." + f"{int(prefix.split('/')[1]):05d}"
            if writing:
                writer.write(part, {prefix + p: v for p, v in leaves.items()})
            sizes.add(leaves)
        else:
            head.update({prefix + p: v for p, v in leaves.items()})

    head: dict[str, Any] = {}
    sizes = _Sizes()
    for i in resumed:
        sizes.add(_stored_layer(writer, output, src, i))
    spill = spill or spill_dir is not None
    spill_to = None
    if spill and calibrated:
        spill_to = tempfile.mkdtemp(prefix="jquant-activations-", dir=spill_dir)
    try:
        if calibrated:
            report = calibrate(
                src, rotated, tokens, keep=keep, progress=progress, micro_batch=batch,
                sequential=sequential, placement=place,
                activations=lambda shape, dt: acts_.Activations(
                    shape, dt, batch // place.processes, directory=spill_to, placement=place),
                done=lambda i: _stored_layer(writer, output, src, i)
                if f"layers.{i:05d}" in done else None,
            ).to_dict()  # fmt: skip
            report["calibrated"] = True
            report["corpus"] = calib
        else:
            report = _data_free(src, rotated, keep, done, progress)
        for name, leaves in _rest(src, rotated, head, kept):  # a group at a time: 1 GB each at 8B
            if writing and name not in writer.done:  # a resumed run may have written it
                writer.write(name, leaves)
            sizes.add(leaves)
            del leaves
    finally:
        if spill_to is not None:
            shutil.rmtree(spill_to, ignore_errors=True)
    report.update(seconds=time.perf_counter() - start, peak_estimate=need, micro_batch=batch,
                  spilled=spill, resumed_layers=resumed, recipe=recipe.name,
                  model=str(source), **sizes.stats())  # fmt: skip
    path = Path(output)
    if writing:
        path = writer.finish(tokenizer=ckpt.tokenizer, recipe=recipe, report=report)
    if place.processes > 1:  # every process returns once the checkpoint is there to load
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jquant.calib.stream: checkpoint written")
    return path, report


class _Sizes:
    """Weight bytes and bits per weight summed part by part, as `jquant.eval.weight_stats`
    counts them for a whole model."""

    def __init__(self):
        self.bytes = self.elements = self.q_bytes = self.q_elements = 0

    def add(self, leaves) -> None:
        from jquant.memory import memory_report
        from jquant.qtypes import QTYPES

        r = memory_report(dict(leaves) if isinstance(leaves, dict) else leaves)
        self.bytes += r.weight_bytes
        for name, u in r.by_format.items():
            self.elements += u.elements
            if name in QTYPES:
                self.q_bytes += u.nbytes
                self.q_elements += u.elements

    def stats(self) -> dict[str, Any]:
        return {
            "weight_bytes": self.bytes,
            "bits_per_weight": 8.0 * self.bytes / max(self.elements, 1),
            "quantized_bits_per_weight":
                8.0 * self.q_bytes / self.q_elements if self.q_elements else None,
        }  # fmt: skip


def _done_parts(writer, place) -> frozenset[str]:
    """The parts an earlier run finished: process 0's writer knows; over several processes
    every process must agree, so they take process 0's list."""
    done = writer.done if writer is not None else frozenset()
    if place.processes == 1:
        return done
    from jax.experimental import multihost_utils

    mask = np.zeros(1 << 16, np.uint8)
    for p in done:
        if p.startswith("layers."):
            mask[int(p.split(".")[1])] = 1
    mask = multihost_utils.broadcast_one_to_all(mask)
    return frozenset(f"layers.{i:05d}" for i in np.flatnonzero(mask))


def _stored_layer(writer, output, src: StreamSource, i: int) -> nnx.State:
    """Layer ``i`` as an earlier run wrote it, in the layer's State structure."""
    part = f"layers.{i:05d}"
    if writer is None:  # another process of a multi-process run: process 0 writes
        from jquant.io._packed_writer import read_written

        stored = read_written(output, part)
    else:
        stored = writer.read(part)
    prefix = f"layers/{i}/"
    return tree.map_with_path(lambda p, v: stored[prefix + p], src.abstract_layer(i))


def _data_free(src: StreamSource, recipe: Recipe, keep, done, progress: bool) -> dict:
    """Every decoder layer through `jquant.quantize`, one at a time."""
    from tqdm.auto import tqdm

    rows = []
    seconds = []
    for i in tqdm(range(src.config.num_layers), desc="quantizing", unit="layer",
                  disable=not progress):  # fmt: skip
        t0 = time.perf_counter()
        if f"layers.{i:05d}" in done:
            continue
        layer = nnx.State({"layers": {i: src.layer(i)}})
        q, layer_rows = transform.quantize(layer, recipe, report=True)
        rows.extend(layer_rows)
        keep(f"layers/{i}/", dict(tree.leaves(q["layers"][i])))
        seconds.append(time.perf_counter() - t0)
    return {"calibrated": False, "layer_seconds": seconds,
            "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip


def _rest(src: StreamSource, recipe: Recipe, head: dict[str, Any], kept: dict[str, Any]):
    """``(part name, leaves by path)`` of each group outside the layers (embedding, final
    norm, an untied head), quantized by the recipe (a calibrated head as calibrated) or read
    as `kept` says (path -> a function reading its QArray), read and yielded one at a time."""
    for name in ("embed_tokens", "norm", "lm_head"):
        if name == "lm_head" and src.config.tie_word_embeddings:
            continue
        if packed := {p: read() for p, read in kept.items() if p.startswith(name + "/")}:
            yield name, packed
            continue
        if name == "lm_head" and head:
            yield name, dict(head)
            continue
        part = nnx.State({name: src.part(name)})
        leaves = dict(tree.leaves(transform.quantize(part, recipe)))
        del part
        yield name, leaves
        del leaves


def _fit(config, samples, seq_len, *, calibrated, dtype, param_dtype, max_memory,
         micro_batch, placement, every_expert=False) -> tuple[int, bool, int]:  # fmt: skip
    """``(micro-batch, spill activations to disk, estimated peak bytes)`` within the budget."""
    devices = placement.devices
    first = micro_batch or (acts_.micro_batch_for(config, samples, seq_len, multiple=devices,
                                                  every_expert=every_expert)
                            if calibrated else 1)  # fmt: skip
    options = [(first, False), (first, True)]
    if micro_batch is None and calibrated:
        options += [(d, True) for d in range(first - devices, 0, -devices)
                    if samples % d == 0]  # fmt: skip
    best = None
    for batch, spill in options:
        est = acts_.estimate(config, samples=samples if calibrated else 0, seq_len=seq_len,
                             batch=batch if calibrated else 0, compute_dtype=dtype,
                             param_dtype=param_dtype, spill=spill, calibrated=calibrated,
                             every_expert=every_expert)  # fmt: skip
        best = best or (batch, spill, est)
        if max_memory is None or est.total <= parse_bytes(max_memory):
            return batch, spill, est.total
        best = (batch, spill, est)
    budget = parse_bytes(max_memory)
    raise ValueError(
        f"--max-memory {budget / 2**30:.2f} GiB is too small for this model: at least "
        f"{best[2].total / 2**30:.2f} GiB is needed with the activations on disk and "
        f"{best[0]} window(s) per micro-batch ({best[2].describe()})"
    )
