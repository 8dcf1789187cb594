"""Memory math for big models: weights at each precision, KV cache, and what fits where.

    python examples/memory_math.py [--models llama-3-8b,llama-3-70b] [--batch 8]
                                   [--context 8192] [--tiny]

Models, precisions and the serving setting come from configs/examples/memory_math.yaml.
Nothing is allocated: the parameter tree is abstract (`jax.ShapeDtypeStruct` leaves from
`jquant.models.abstract_model`), quantized under `jax.eval_shape`, and weighed by
`jquant.memory_report`, which counts packed codes + scales (+ zero points) exactly.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

import jquant
from jquant.memory import ACCELERATORS
from jquant.models import LlamaConfig, abstract_model

SETTINGS = Path(__file__).resolve().parents[1] / "configs/examples/memory_math.yaml"


def abstract_params(hf_config: dict) -> nnx.State:
    """The bfloat16 parameter State of a Llama-shaped model, as shapes only."""
    model = abstract_model(LlamaConfig.from_hf(hf_config), param_dtype=jnp.bfloat16)
    return nnx.state(model, nnx.Param)


def weigh(params, precision: str):
    """``params`` quantized by the recipe ``precision`` (abstractly), or as they are."""
    if precision == "bfloat16":
        return params
    return jax.eval_shape(functools.partial(jquant.quantize, recipe=precision), params)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=str(SETTINGS), help="YAML with models and precisions")
    p.add_argument("--models", help="comma-separated keys of `models` (default: all but tiny)")
    p.add_argument("--batch", type=int, help="sequences served at once (default: settings)")
    p.add_argument("--context", type=int, help="tokens per sequence (default: settings)")
    p.add_argument("--tiny", action="store_true", help="only the tiny model (smoke tests)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Prints the tables; returns one dict per (model, precision, kv cache) row."""
    args = parse_args(argv)
    settings = yaml.safe_load(Path(args.settings).read_text(encoding="utf-8"))
    names = (["tiny"] if args.tiny else args.models.split(",") if args.models
             else [m for m in settings["models"] if m != "tiny"])  # fmt: skip
    batch, context = args.batch or settings["batch"], args.context or settings["context"]
    labels = {a: a.split(" (")[0].replace("GB", "G") for a in ACCELERATORS}  # "H100 80G"
    print(f"serving batch {batch} x context {context}; total = weights + KV cache + 10%; "
          "fits on one device of each kind: yes (y) or no (.)\n")
    print(f"{'model':<12} {'precision':<15} {'bits/w':>6} {'weights GB':>10} {'KV cache':>9} "
          f"{'KV GB':>6} {'total GB':>8}  " + "  ".join(labels.values()))
    rows = []
    for name in names:
        hf_config = settings["models"][name]
        params = abstract_params(hf_config)
        for precision in settings["precisions"]:
            qparams = weigh(params, precision)
            for kv in settings["kv_caches"]:
                r = jquant.memory_report(qparams, batch=batch, context=context, kv_cache=kv,
                                         config=hf_config)  # fmt: skip
                fits = "  ".join(("y" if r.fits_on[a] else ".").center(len(label))
                                 for a, label in labels.items())  # fmt: skip
                print(f"{name:<12} {precision:<15} {r.bits_per_weight:>6.3f} "
                      f"{r.weight_bytes / 1e9:>10.2f} {kv:>9} {r.kv_cache_bytes / 1e9:>6.2f} "
                      f"{r.total_bytes / 1e9:>8.2f}  {fits}".rstrip())
                rows.append({"model": name, "precision": precision, "kv_cache": kv,
                             "report": r, "params": qparams})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
