"""The priced table of automatic bit allocation: `Sensitivity`, `measure` and its cache.

`measure` runs `jquant.alloc.sensitivity` (statistics, then every tensor priced under every
candidate) and keeps the table under `cache_dir`, keyed by the weights, the tokens and the
candidates; `KERNEL_CANDIDATES` / `TABLE_CANDIDATES` are the formats priced by default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jquant import settings, tree
from jquant.alloc.pricing import Candidate, Option, candidate
from jquant.io import _gguf_types
from jquant.models.convert import EMBED_PATH, HEAD_PATH

_GPTQ = {"algorithm": "gptq", "algorithm_args": {"mse": True}}

#: What a decoder kernel (or an untied head) may become: GPTQ with a clip search per group,
#: asymmetric 3- to 6-bit codes in groups of 64 (a bf16 scale and zero point each: 3.5 to
#: 6.5 bits per weight), or int8 per output channel.
KERNEL_CANDIDATES: tuple[Candidate, ...] = (
    candidate("uint3-g64", weight="uint3", group_size=64, **_GPTQ),
    candidate("uint4-g64", weight="uint4", group_size=64, **_GPTQ),
    candidate("uint5-g64", weight="uint5", group_size=64, **_GPTQ),
    candidate("uint6-g64", weight="uint6", group_size=64, **_GPTQ),
    candidate("int8", weight="int8", **_GPTQ),
)
#: FP4 kernels a request may name (``--formats mxfp4,nvfp4``), not priced by default: E2M1
#: codes, GPTQ with a clip search per block, in the blocks and block scales each format fixes
#: (mxfp4: 32, E8M0, 4.25 bits per weight; nvfp4: 16, E4M3 and a per-tensor float32, 4.5).
FP4_CANDIDATES: tuple[Candidate, ...] = (
    candidate("mxfp4", weight="mxfp4", group_size=32, **_GPTQ),
    candidate("nvfp4", weight="nvfp4", group_size=16, **_GPTQ),
)
#: What the embedding table (and a tied head) may become: no Hessian for a gather, so
#: round-to-nearest with a searched clip per group, per-row int8, or bfloat16.
TABLE_CANDIDATES: tuple[Candidate, ...] = (
    candidate("uint4-g64", weight="uint4", group_size=64,
              algorithm_args={"clip_search": {"grid": 20}}),
    candidate("uint6-g64", weight="uint6", group_size=64,
              algorithm_args={"clip_search": {"grid": 20}}),
    candidate("int8", weight="int8"),
    candidate("bfloat16", skip=True, dtype="bfloat16"),
)

#: ``jquant allocate --gguf``: the kernel formats a GGUF file holds as they are, one per row
#: of `jquant.io._gguf_types.QUANT_TYPES` (ggml's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks:
#: group 32, float16 scales), by GPTQ.
GGUF_KERNEL_CANDIDATES: tuple[Candidate, ...] = tuple(
    candidate(f"{w}-g{g}", weight=w, group_size=g, scale_dtype=_gguf_types.SCALE_DTYPE, **_GPTQ)
    for w, g in _gguf_types.QUANT_TYPES
)
#: ``--gguf``'s table formats: the same blocks by round-to-nearest with a searched clip, or
#: float16 (F16).
GGUF_TABLE_CANDIDATES: tuple[Candidate, ...] = (
    *(candidate(f"{w}-g{g}", weight=w, group_size=g, scale_dtype=_gguf_types.SCALE_DTYPE,
                algorithm_args={"clip_search": {"grid": 20}})
      for w, g in _gguf_types.QUANT_TYPES),  # fmt: skip
    candidate("float16", skip=True, dtype="float16"),
)



@dataclasses.dataclass(frozen=True, kw_only=True)
class Sensitivity:
    """Every tensor priced under every candidate, and what the budget math needs."""

    # {path: {candidate name: Option}}; a tied model's table appears as EMBED_PATH (the
    # gather) and HEAD_PATH (the head's matmul), both for the table candidates.
    options: dict[str, dict[str, Option]]
    # Candidate name -> rule settings, for the kernels and for the table.
    kernel_candidates: dict[str, dict[str, Any]]
    table_candidates: dict[str, dict[str, Any]]
    tied: bool
    # Bytes of every leaf no candidate covers (norms, biases), and all weights' elements.
    fixed_bytes: int
    elements: int
    # The HF-style config (for --fit's KV cache) and the float model's calibration loss.
    config: dict[str, Any]
    loss: float
    tokens: int
    # A mixture-of-experts model's expert stacks (path -> experts E; priced as one tensor
    # each) and its top-k: a token reads k of each stack's E experts. Empty and 0 otherwise.
    experts: dict[str, int]
    experts_per_token: int

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        d = json.loads(text)
        d["options"] = {p: {n: Option(**o) for n, o in opts.items()}
                        for p, opts in d["options"].items()}  # fmt: skip
        return cls(**d)

    def smallest_bytes(self) -> int:
        return sum(min(b for _, b in g) for g in option_groups(self)[1]) + self.fixed_bytes


def _fingerprint(source, tokens, kernel_cands, table_cands, extra) -> str:
    """A key of the weights (read one layer at a time), tokens, candidates and ``extra``."""
    h = hashlib.sha256()
    parts = [("", source.part(n)) for n in ("embed_tokens", "norm", "lm_head")
             if n != "lm_head" or not source.config.tie_word_embeddings]  # fmt: skip
    layers = ((f"layers/{i}/", source.layer(i)) for i in range(source.config.num_layers))
    for prefix, state in (*parts, *layers):
        for path, value in tree.leaves(state):
            value = np.asarray(value)
            h.update(f"{prefix}{path}{value.shape}{value.dtype}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(json.dumps([[c.name, dict(c.settings)] for c in (*kernel_cands, *table_cands)],
                        sort_keys=True).encode())  # fmt: skip
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where priced tables are kept: ``sensitivity/`` under `jquant.settings.cache_dir`."""
    return settings.cache_dir() / "sensitivity"


def measure(model, params, tokens, *, config: Mapping[str, Any] | None = None,
            kernel_candidates: Sequence[Candidate] = KERNEL_CANDIDATES,
            table_candidates: Sequence[Candidate] = TABLE_CANDIDATES, batch_size: int = 2,
            cache: bool = True, spill_dir=None, progress: bool = True) -> Sensitivity:  # fmt: skip
    """Prices every tensor of a float jquant Llama-family model under every candidate.

    Args:
      model, params: the model and its float parameter State.
      tokens: calibration windows ``(samples, seq_len)`` (`jquant.calib.calibration_tokens`).
      config: the HF-style config dict (for `budget_bytes`' ``fit``); built from the model's
        config when None.
      kernel_candidates, table_candidates: the formats to price (names must be unique).
      batch_size: windows per forward/backward pass.
      cache: read and write the priced table under `cache_dir`, keyed by the weights, the
        tokens and the candidates.
      spill_dir: keep the layers' activations in files under this directory (default: in
        memory).
      progress: progress bars.
    """
    from jquant.calib.driver import ModelSource

    return measure_source(ModelSource(model, params), tokens, config=config,
                          kernel_candidates=kernel_candidates, table_candidates=table_candidates,
                          batch_size=batch_size, cache=cache, spill_dir=spill_dir,
                          progress=progress)  # fmt: skip


def measure_source(source, tokens, *, config: Mapping[str, Any] | None = None,
                   kernel_candidates: Sequence[Candidate] = KERNEL_CANDIDATES,
                   table_candidates: Sequence[Candidate] = TABLE_CANDIDATES,
                   batch_size: int = 2, cache: bool = True, spill_dir=None,
                   progress: bool = True) -> Sensitivity:  # fmt: skip
    """`measure` of a model given layer by layer: in memory (`jquant.calib.driver.ModelSource`)
    or read from a checkpoint one layer at a time (`jquant.calib.stream.StreamSource`).

    Each decoder layer is priced as soon as its statistics are complete
    (`jquant.alloc.sensitivity.sweep`) and its statistics dropped, so the process holds one
    layer's weights and statistics at a time, beside the layers' activations (on disk under
    ``spill_dir``) and the embedding's statistics. The arguments are `measure`'s.
    """
    from jquant.alloc import pricing, sensitivity
    from jquant.calib.activations import Activations
    from jquant.memory import memory_report

    for cands, what in ((kernel_candidates, "kernel"), (table_candidates, "table")):
        names = [c.name for c in cands]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{what} candidates need unique names, at least one: {names}")
    model_config = source.config
    config = dict(config) if config is not None else _hf_config(model_config)
    if cache:
        key = _fingerprint(source, tokens, kernel_candidates, table_candidates,
                           {"batch": batch_size})  # fmt: skip
        path = cache_dir() / f"{key}.json"
        if path.is_file():
            try:
                return Sensitivity.from_json(path.read_text())
            except (ValueError, TypeError, KeyError):
                pass  # a stale or damaged cache entry is measured again
    positions = int(np.asarray(tokens).size)
    priced: dict[str, dict[str, Option]] = {}

    def price_layer(prefix, state, stats):
        values = dict(tree.leaves(state))
        for rel, ks in stats.items():
            priced[prefix + rel] = pricing.price_kernel(
                values[rel], prefix + rel, ks, kernel_candidates, positions=positions)

    def buffers(shape, dtype, batch):
        return Activations(shape, dtype, batch, directory=spill_dir)

    totals = sensitivity.sweep(source, tokens, on_layer=price_layer, batch_size=batch_size,
                               activations=buffers, progress=progress)  # fmt: skip
    table = tree.unwrap(source.part("embed_tokens")["embedding"])
    options = {**priced, **pricing.price_table(table, totals, table_candidates)}
    del table
    leaves = source.leaves()
    report = memory_report(leaves)
    fixed = sum(_leaf_bytes(v) for p, v in leaves.items() if p not in options)
    stacks = {p: int(leaves[p].shape[0]) for p in options
              if getattr(leaves.get(p), "ndim", 0) == 3}  # fmt: skip
    result = Sensitivity(
        options=options,
        kernel_candidates={c.name: dict(c.settings) for c in kernel_candidates},
        table_candidates={c.name: dict(c.settings) for c in table_candidates},
        tied=bool(model_config.tie_word_embeddings), fixed_bytes=int(fixed),
        elements=int(report.weight_elements), config=config, loss=totals.loss,
        tokens=totals.tokens, experts=stacks,
        experts_per_token=int(model_config.num_experts_per_tok) if stacks else 0,
    )  # fmt: skip
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(result.to_json())
        os.replace(tmp, path)
    return result


def _hf_config(c) -> dict[str, Any]:
    return {"num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "hidden_size": c.hidden_size}  # fmt: skip


def _leaf_bytes(v) -> int:
    if not hasattr(v, "shape"):
        return 0
    return math.prod(v.shape) * np.dtype(v.dtype).itemsize



def option_groups(table: Sensitivity):
    """``(labels, groups)``: per group its options as ``(cost, bytes)`` and what each means
    (``{path: candidate name}``)."""
    labels, groups = [], []
    for path, opts in table.options.items():
        if path in (EMBED_PATH, HEAD_PATH) and table.tied:
            continue
        names = list(opts)
        labels.append([{path: n} for n in names])
        groups.append([(opts[n].cost, opts[n].nbytes) for n in names])
    if table.tied:
        emb, head = table.options[EMBED_PATH], table.options[HEAD_PATH]
        lab, grp = [], []
        for fe in emb:
            for fh in head:
                shared = fe == fh
                nbytes = emb[fe].nbytes + (0 if shared else head[fh].nbytes)
                lab.append({EMBED_PATH: fe, HEAD_PATH: fh})
                grp.append((emb[fe].cost + head[fh].cost, nbytes))
        labels.append(lab)
        groups.append(grp)
    return labels, groups

