"""``jquant inspect MODEL [--recipe R] [--batch B --context T --kv-cache F] [--report]``:
the memory report of a model, float or quantized."""

from __future__ import annotations

import json

from jquant.cli import _args


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="memory report of a model, float or quantized")
    _args.add_model_args(p)
    _args.add_memory_args(p)
    p.add_argument("--report", action="store_true", help="print one row per parameter")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from jquant.calib import quantize_loaded
    from jquant.memory import KV_FORMATS, memory_report
    from jquant.transform import format_report

    recipe = _args.recipe(args.recipe)
    if args.kv_cache not in KV_FORMATS:
        raise ValueError(
            f"--kv-cache {args.kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}"
        )
    model, params, _, config = _args.load(args)
    model, params, rows = quantize_loaded(model, params, recipe, report=True)
    report = memory_report(
        params, batch=args.batch, context=args.context, kv_cache=args.kv_cache, config=config,
        dtype=model.dtype, experts_per_token=model.config.num_experts_per_tok or None,
    )
    c = model.config
    sliding = sum(c.is_sliding(i) for i in range(c.num_layers))
    if args.json:
        print(json.dumps({
            "model_type": c.model_type,
            "layers": c.num_layers,
            "sliding_layers": sliding,
            "sliding_window": c.sliding_window,
            "weight_bytes": report.weight_bytes,
            "weights": report.weight_elements,
            "active_weight_bytes": report.active_bytes,
            "active_weights": report.active_elements,
            "bits_per_weight": report.bits_per_weight,
            "kv_cache_bytes": report.kv_cache_bytes,
            "total_bytes": report.total_bytes,
            "fits_on": report.fits_on,
        }, indent=2))  # fmt: skip
        return 0
    if rows is not None and args.report:
        print(format_report(rows), end="\n\n")
    window = f", {sliding} sliding (window {c.sliding_window})" if sliding else ""
    print(f"model: {c.model_type}, {c.num_layers} layers{window}, {c.num_heads} heads "
          f"({c.num_kv_heads} kv) of {c.head_dim}, vocabulary {c.vocab_size}")  # fmt: skip
    print(report.format())
    return 0
