"""``jquant allocate MODEL (--target-bits B | --target-size S | --fit DEVICE --context T
--batch N)``: choose a format per tensor for a budget and write the recipe."""

from __future__ import annotations

import json
import os
import sys

from jquant.cli import _args


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help="choose a format per tensor for a budget; write a recipe")
    _args.add_model_args(p, recipe=False)
    p.add_argument("--target-bits", type=_args.float_in(0.0, open_low=True),
                   help="average bits per weight, every weight counted")
    p.add_argument("--target-size", help="total weight bytes, e.g. 100MB or 1.5GiB")
    p.add_argument("--fit", metavar="DEVICE",
                   help="an accelerator of the memory report (H100, L4, 'TPU v5e', ...)")
    p.add_argument("--context", type=_args.int_at_least(1), help="with --fit: tokens per sequence")
    p.add_argument("--batch", type=_args.int_at_least(1), help="with --fit: sequences at once")
    p.add_argument("--kv-cache", default="bfloat16", help="with --fit: KV cache format")
    p.add_argument("--formats", help="comma-separated kernel candidates to choose from "
                   "(default: all of jquant.alloc.KERNEL_CANDIDATES; mxfp4 and nvfp4 "
                   "are also known)")
    p.add_argument("--gguf", action="store_true",
                   help="choose only formats GGUF holds as they are (Q4_0, Q4_1, Q5_0, Q5_1, "
                        "Q8_0 blocks, F16), so that jquant export --format gguf writes the "
                        "recipe's model; --formats then names jquant.alloc."
                        "GGUF_KERNEL_CANDIDATES")  # fmt: skip
    p.add_argument("--no-awq", action="store_true",
                   help="GPTQ rules without AWQ's input scales")
    p.add_argument("--name", help="recipe name (default: from the budget)")
    _args.add_calib_args(p)
    p.set_defaults(calib_samples=16)
    p.add_argument("-o", "--output", help="write the recipe YAML here (default: print it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the allocation as JSON")
    p.add_argument("--spill-dir", help="keep the layers' activations in files here (default: "
                   "in memory); the weights are read one layer at a time either way")


def _check_budget_flags(args) -> None:
    """Exactly one budget, and --context/--batch exactly with --fit."""
    from jquant import alloc

    kinds = [k for k in ("target_bits", "target_size", "fit") if getattr(args, k) is not None]
    if len(kinds) != 1:
        raise ValueError("give exactly one of --target-bits, --target-size and --fit (got "
                         f"{', '.join('--' + k.replace('_', '-') for k in kinds) or 'none'})")
    if args.fit is not None:
        alloc.find_device(args.fit)
        if args.context is None or args.batch is None:
            raise ValueError("--fit needs --context and --batch")
    elif args.context is not None or args.batch is not None:
        raise ValueError("--context and --batch size the KV cache of --fit; give --fit too")
    if args.target_size is not None:
        alloc.parse_size(args.target_size)


def run(args) -> int:
    from jquant import alloc, calib
    from jquant.alloc import request

    _check_budget_flags(args)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"--output {args.output!r} exists; pass --overwrite to replace it")
    with _args.flag("--formats"):
        kernel_candidates = request.select_candidates(args.formats, gguf=args.gguf)
    table_candidates = alloc.GGUF_TABLE_CANDIDATES if args.gguf else alloc.TABLE_CANDIDATES
    _args.check_calib(args)
    source, tokenizer, config = _float_source(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to encode the calibration text")
    tokens = calib.calibration_tokens(tokenizer, args.calib, samples=args.calib_samples,
                                      seq_len=args.calib_seq_len)  # fmt: skip
    table = alloc.measure_source(source, tokens, config=config,
                                 kernel_candidates=kernel_candidates,
                                 table_candidates=table_candidates, spill_dir=args.spill_dir,
                                 progress=not args.json)  # fmt: skip
    budget_kw = dict(target_bits=args.target_bits, target_size=args.target_size, fit=args.fit,
                     context=args.context, batch=args.batch)  # fmt: skip
    budget = alloc.budget_bytes(table, kv_cache=args.kv_cache, **budget_kw)
    allocation = alloc.allocate(table, budget)
    name = args.name or request.default_name(**budget_kw)
    text = allocation.recipe(name, awq=not args.no_awq).to_yaml()
    if args.output:
        request.write_recipe(text, args.output)
    if args.json:
        print(json.dumps({
            "recipe": args.output, "name": name, "budget_bytes": budget,
            "weight_bytes": allocation.weight_bytes, "active_bytes": allocation.active_bytes,
            "bits_per_weight": allocation.bits_per_weight,
            "predicted_delta_percent": allocation.predicted_percent,
            "formats": allocation.counts(), "choice": allocation.choice,
        }, indent=2))  # fmt: skip
    else:
        if not args.output:
            print(text)
        where = f" -> {args.output}" if args.output else ""
        print(f"{args.model} [{name}]{where}: {allocation.summary()}", file=sys.stderr)
    return 0


def _float_source(args):
    """``(source, tokenizer, HF config)`` of ``args.model``, read one layer at a time
    (`jquant.calib.stream.StreamSource`); refused when it is already quantized."""
    import jax.numpy as jnp

    from jquant import calib
    from jquant.calib.stream import StreamSource
    from jquant.io import MODELS, load_checkpoint
    from jquant.io.packed import is_packed
    from jquant.models.load import default_dtype

    quantized = ValueError(f"{args.model} is already quantized; allocate starts from float "
                           "weights")  # fmt: skip
    if args.keep_packed or (args.model not in MODELS and is_packed(args.model)):
        raise quantized
    ckpt = load_checkpoint(args.model, lazy=True)
    source = StreamSource(ckpt, dtype=default_dtype(), param_dtype=jnp.float32)
    if calib.is_quantized(source.layer(0)):
        raise quantized
    return source, ckpt.tokenizer, source.hf_config()
