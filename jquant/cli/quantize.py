"""``jquant quantize MODEL --recipe R [--calib CORPUS] -o DIR``: quantize (calibrating when
the recipe asks) and save a packed checkpoint."""

from __future__ import annotations

import json

from jquant.cli import _args


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize (calibrating if the recipe asks) and save packed")
    _args.add_model_args(p, recipe=False)
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    _args.add_calib_args(p)
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from jquant.calib import apply_recipe
    from jquant.eval import weight_stats
    from jquant.io.packed import check_output_directory, save_packed

    recipe = _args.recipe(args.recipe)
    if recipe is None:
        raise ValueError("--recipe float quantizes nothing; name a recipe")
    check_output_directory(args.output, overwrite=args.overwrite)
    _args.check_calib(args)
    model, params, tokenizer, config = _args.load(args)
    model, qparams, report = apply_recipe(
        model, params, recipe, tokenizer=tokenizer, calib=args.calib,
        samples=args.calib_samples, seq_len=args.calib_seq_len, progress=not args.json,
    )  # fmt: skip
    if not model.config.tie_word_embeddings:
        config = {**config, "tie_word_embeddings": False}  # untied for the recipe
    weight_bytes, bits, q_bits = weight_stats(qparams)
    report.update(
        weight_bytes=weight_bytes,
        bits_per_weight=bits,
        quantized_bits_per_weight=q_bits,
        recipe=recipe.name,
        model=args.model,
    )
    path = save_packed(args.output, config=config, params=qparams, tokenizer=tokenizer,
                       recipe=recipe, report=report, overwrite=args.overwrite)  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    else:
        print(
            f"{args.model} [{recipe.name}] -> {path}: weights {weight_bytes / 1e6:.2f} MB, "
            f"{bits:.3f} bits/weight ({q_bits or 0:.3f} in the quantized tensors), "
            f"quantized in {report['seconds']:.1f} s"
        )
    return 0
