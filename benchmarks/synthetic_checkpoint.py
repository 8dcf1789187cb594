"""Hugging Face checkpoints with real architectures' exact shapes and random weights, written
in bounded memory: models larger than this machine's RAM, without a hub download.

    python benchmarks/synthetic_checkpoint.py --shape llama3-8b -o /work/synth/llama3-8b
    python benchmarks/synthetic_checkpoint.py --shape qwen2.5-14b -o /work/synth/qwen2.5-14b
    python benchmarks/synthetic_checkpoint.py --shape qwen2.5-14b --layers 2 -o /tmp/q2

The output directory is what `save_pretrained` writes for transformers' `LlamaForCausalLM` /
`Qwen2ForCausalLM` in bfloat16: `config.json` (the real model's, `--layers` aside),
`model-0000K-of-0000N.safetensors` shards of at most 5 GB, `model.safetensors.index.json`
(`weight_map`, `metadata.total_size`), and `synthetic.json` (shape, seed, this script), with no
tokenizer. `jquant.io.load_checkpoint(dir)` and the CLI read it as any HF directory; it exists
so that `docs/scale.md` can measure quantizing a model that does not fit in memory
(`qwen2.5-14b` is 29.5 GB of bf16 against 24 GiB of RAM). Shapes: `SHAPES`.

What the values model, so that quantization error and scale spread look like a real model's
(the numbers are the module constants below):
  * linear weights (out, in): N(0, `LINEAR_GAIN` / sqrt(in)) times a per-output-channel and a
    per-input-channel scale, each log-normal (`OUT_SPREAD`, `IN_SPREAD`: a few x across
    channels) and normalised to RMS 1. q/k/v of a layer share one input scale, and so do
    gate/up: they read the same normed residual stream. In those inputs a few hidden channels,
    the same in every layer, are `OUTLIER_GAIN` x larger (the outlier features of real LLMs).
  * RMSNorm weights: log-normal around 1 (`NORM_SPREAD`), the outlier channels `NORM_OUTLIER`
    x larger.
  * embeddings: N(0, `EMBED_STD`) with a log-normal per-token row scale; q/k/v biases:
    N(0, `BIAS_STD`).
The N(0, 1) factor of a weight row is a window, at a random offset and with a random sign,
of one pool of `POOL_SIZE` iid normals per seed: each row (and each quantization group in it)
is exactly iid Gaussian, but two rows may share a shifted stretch of values. Copying is ~20x
faster than drawing normals, which on a 2-core machine is minutes instead of an hour for the
14B shape. Not modelled: real correlations between weights, low-rank structure, heavy tails
beyond the channel scales, any real function: the outputs are noise, so only weight-space
metrics (error, scales, bytes, time, memory) mean anything, never perplexity.

Every tensor's offsets, signs and scales come from its own generator, seeded by `--seed` and
its name, so `tensor_values` regenerates any one without the rest. Tensors are generated
`CHUNK_ELEMS` float32 values at a time, cast to bfloat16 (ml_dtypes) and streamed behind a
header whose offsets were all computed first: peak memory stays a few hundred MB (the pool,
one chunk, its bfloat16 copy) whatever the model's size.
The directory is written as `<out>.partial-XXXX` (one per run, so two runs never write into
each other's) and renamed when complete, so an interrupted run never leaves a directory that
looks whole. At the end it prints bytes, seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

LINEAR_GAIN = 1.0  # weight std = LINEAR_GAIN / sqrt(in_features), as trained LLMs roughly keep
OUT_SPREAD = 0.3  # sigma of log(per-output-channel scale): p1..p99 spans ~4x
IN_SPREAD = 0.35  # sigma of log(per-input-channel scale): p1..p99 spans ~5x
OUTLIER_CHANNELS = 6  # hidden channels that are outliers in q/k/v and gate/up inputs
OUTLIER_GAIN = (4.0, 10.0)  # their extra magnitude, log-uniform in this range
NORM_SPREAD = 0.25  # sigma of log(RMSNorm weight)
NORM_OUTLIER = (3.0, 8.0)  # extra RMSNorm weight on the outlier channels
EMBED_STD = 0.02
EMBED_ROW_SPREAD = 0.25  # sigma of log(per-token row scale)
BIAS_STD = 0.02
CHUNK_ELEMS = 1 << 24  # float32 values generated at once (64 MiB)
POOL_SIZE = 1 << 24  # N(0, 1) values that rows are windows of (64 MiB)
SHARD_BYTES = 5 * 10**9  # transformers' max_shard_size="5GB"

_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip
_QWEN25_14B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 13824, "max_position_embeddings": 131072,
    "max_window_layers": 48, "model_type": "qwen2", "num_attention_heads": 40,
    "num_hidden_layers": 48, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 152064,
}  # fmt: skip
_TINY = {"bos_token_id": 1, "eos_token_id": 2, "hidden_size": 128, "intermediate_size": 352,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "vocab_size": 4096, "max_position_embeddings": 512}  # fmt: skip
#: `--shape` name -> the architecture's transformers `config.json`.
SHAPES = {
    "llama3-8b": _LLAMA3_8B,  # meta-llama/Meta-Llama-3-8B
    "qwen2.5-14b": _QWEN25_14B,  # Qwen/Qwen2.5-14B
    "tiny": {**_LLAMA3_8B, **_TINY},  # a few MB, for smoke tests
    "tiny-qwen2": {**_QWEN25_14B, **_TINY, "max_window_layers": 2},  # the q/k/v bias layout
}


def config_for(shape: str, layers: int | None = None) -> dict:
    """The `config.json` dict of `shape`, with `num_hidden_layers` set to `layers` if given."""
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r} is unknown; choose one of {', '.join(SHAPES)}")
    config = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers={layers} must be at least 1")
        config["num_hidden_layers"] = layers
    return config


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and HF-layout shape, in transformers' state-dict order."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = config["model_type"] == "qwen2"  # Qwen2: q/k/v biases, no o_proj bias
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, d)
            if bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[f"{p}self_attn.o_proj.weight"] = (d, q)
        shapes[f"{p}mlp.gate_proj.weight"] = (f, d)
        shapes[f"{p}mlp.up_proj.weight"] = (f, d)
        shapes[f"{p}mlp.down_proj.weight"] = (d, f)
        shapes[f"{p}input_layernorm.weight"] = (d,)
        shapes[f"{p}post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _lognormal(seed: int, key: str, n: int, sigma: float) -> np.ndarray:
    """A positive float32 scale vector with RMS 1."""
    x = np.exp(sigma * _rng(seed, key).standard_normal(n))
    return (x / np.sqrt(np.mean(x * x))).astype(np.float32)


def _outliers(seed: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The hidden channels that are outliers in every layer, and a gain in [0, 1] for each."""
    rng = _rng(seed, "outlier-channels")
    channels = rng.choice(d, size=min(OUTLIER_CHANNELS, max(1, d // 64)), replace=False)
    return np.sort(channels), rng.uniform(0.0, 1.0, channels.size)


# Linear layers that read the same normed residual stream, so share an input scale.
_INPUT_GROUPS = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
                 "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp"}  # fmt: skip


def _input_scale(seed: int, config: dict, name: str, cols: int) -> np.ndarray:
    """Per-input-channel scale of linear weight `name`, shared by what reads the same input."""
    layer, _, proj = name.removeprefix("model.layers.").partition(".")
    group = _INPUT_GROUPS.get(proj.removesuffix(".weight"))
    if group is None:  # o_proj, down_proj, lm_head: their own scale, no residual outliers
        return _lognormal(seed, f"{name}/in", cols, IN_SPREAD)
    scale = _lognormal(seed, f"layer{layer}/{group}/in", cols, IN_SPREAD)
    channels, gain = _outliers(seed, config["hidden_size"])
    lo, hi = np.log(OUTLIER_GAIN)
    scale[channels] *= np.exp(lo + gain * (hi - lo)).astype(np.float32)
    return scale


def _vector(name: str, n: int, config: dict, seed: int) -> np.ndarray:
    if name.endswith(".bias"):
        return BIAS_STD * _rng(seed, name).standard_normal(n, dtype=np.float32)
    weight = np.exp(NORM_SPREAD * _rng(seed, name).standard_normal(n)).astype(np.float32)
    channels, gain = _outliers(seed, config["hidden_size"])
    lo, hi = np.log(NORM_OUTLIER)
    weight[channels] *= np.exp(lo + gain * (hi - lo)).astype(np.float32)
    return weight


@functools.lru_cache(maxsize=1)
def _pool(seed: int) -> np.ndarray:
    """`POOL_SIZE` iid N(0, 1) float32 values, that every weight matrix's rows are cut from."""
    return _rng(seed, "normal-pool").standard_normal(POOL_SIZE, dtype=np.float32)


def tensor_chunks(
    name: str, shape: tuple[int, ...], config: dict, seed: int, *, chunk_elems: int = CHUNK_ELEMS
) -> Iterator[np.ndarray]:
    """Tensor `name`'s float32 values, a block of whole rows at a time (row-major order).

    Each row's N(0, 1) values are a window of `_pool(seed)` at a random offset, with a random
    sign (see the module docstring). The values do not depend on `chunk_elems`.
    """
    if len(shape) == 1:
        yield _vector(name, shape[0], config, seed)
        return
    rows, cols = shape
    if name == "model.embed_tokens.weight":
        row_scale = EMBED_STD * _lognormal(seed, f"{name}/rows", rows, EMBED_ROW_SPREAD)
        col_scale = np.ones(cols, np.float32)
    else:
        std = float(LINEAR_GAIN / np.sqrt(cols))
        row_scale = std * _lognormal(seed, f"{name}/out", rows, OUT_SPREAD)
        col_scale = _input_scale(seed, config, name, cols)
    rng = _rng(seed, name)
    windows = np.lib.stride_tricks.sliding_window_view(_pool(seed), cols)
    offsets = rng.integers(0, windows.shape[0], rows)
    row_scale = row_scale * rng.choice(np.array([-1, 1], np.float32), rows)
    step = max(1, chunk_elems // cols)
    for start in range(0, rows, step):
        block = windows[offsets[start : start + step]]  # a copy: fancy indexing
        block *= row_scale[start : start + step, None]
        block *= col_scale
        yield block


def tensor_values(name: str, shape: tuple[int, ...], config: dict, seed: int) -> np.ndarray:
    """Tensor `name` whole, as float32 (before the bfloat16 rounding the files hold)."""
    return np.concatenate(list(tensor_chunks(name, shape, config, seed))).reshape(shape)


def _shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _header(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        end = offset + 2 * int(np.prod(shapes[name]))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the spec's padding: tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def write_checkpoint(
    out: str | os.PathLike, shape: str, *, layers: int | None = None, seed: int = 0,
    shard_bytes: int = SHARD_BYTES, chunk_elems: int = CHUNK_ELEMS, overwrite: bool = False,
    log=sys.stderr,
) -> dict:  # fmt: skip
    """Write the synthetic HF directory `out`; returns `{"bytes", "shards", "seconds"}`.

    Raises:
      FileExistsError: `out` exists and `overwrite` is False.
      ValueError: an unknown shape, `layers` < 1, or too little free disk for the tensors.
    """
    out, start = Path(out), time.perf_counter()
    config = config_for(shape, layers)
    shapes = tensor_shapes(config)
    total = sum(2 * int(np.prod(s)) for s in shapes.values())
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    free = shutil.disk_usage(partial).free
    if free < total + (64 << 20):
        partial.rmdir()
        raise ValueError(
            f"{shape} needs {total / 1e9:.1f} GB but {partial.parent} has "
            f"{free / 1e9:.1f} GB free; pass --layers to write fewer layers"
        )
    shards = _shards(shapes, shard_bytes)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    try:
        for file, names in zip(files, shards):
            with open(partial / file, "wb") as f:
                f.write(_header(names, shapes))
                for name in names:
                    for block in tensor_chunks(name, shapes[name], config, seed,
                                               chunk_elems=chunk_elems):  # fmt: skip
                        f.write(block.astype(ml_dtypes.bfloat16).view(np.uint16).data)
            if log:
                print(f"{file}: {len(names)} tensors, {time.perf_counter() - start:.0f} s",
                      file=log, flush=True)  # fmt: skip
        weight_map = {n: file for file, names in zip(files, shards) for n in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        about = {"generator": "benchmarks/synthetic_checkpoint.py", "shape": shape,
                 "layers": config["num_hidden_layers"], "seed": seed}  # fmt: skip
        (partial / "synthetic.json").write_text(json.dumps(about, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"bytes": total, "shards": len(files), "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, choices=list(SHAPES))
    p.add_argument("-o", "--out", required=True, help="the HF directory to write")
    p.add_argument("--layers", type=int, help="override num_hidden_layers (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    # A kill runs write_checkpoint's clean-up (SystemExit) instead of leaving `.partial-*`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    done = write_checkpoint(args.out, args.shape, layers=args.layers, seed=args.seed,
                            overwrite=args.overwrite)  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    gb = done["bytes"] / 1e9
    print(
        f"{args.out}: {done['bytes']} bytes ({gb:.2f} GB) in {done['shards']} shard(s), "
        f"{done['seconds']:.1f} s ({gb / done['seconds']:.2f} GB/s), peak RSS {peak:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
