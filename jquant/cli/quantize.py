"""``jquant quantize MODEL --recipe R [--calib CORPUS] -o DIR``: quantize (calibrating when
the recipe asks) and save a packed checkpoint, a decoder layer at a time
(`jquant.calib.stream.quantize_to_disk`): the float model is read one layer at a time and
never held whole, each finished layer is written at once, and a killed run started again
continues where it stopped. ``--data-parallel`` splits the calibration windows over this
process's devices; ``--coordinator HOST:PORT --num-processes N --process-id I``, started on
each of N processes (sharing the output's file system), over every device of every process,
and process 0 writes."""

from __future__ import annotations

import json

from jquant.cli import _args


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize (calibrating if the recipe asks) and save packed")
    _args.add_model_args(p, recipe=False)
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    _args.add_calib_args(p)
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output, and discard an unfinished run")  # fmt: skip
    p.add_argument("--no-resume", action="store_true",
                   help="refuse to continue an unfinished run into --output")  # fmt: skip
    p.add_argument("--max-memory", help="memory budget, e.g. 4GB: activations spill to disk "
                   "and micro-batches shrink to fit, or the run is refused up front")  # fmt: skip
    p.add_argument("--micro-batch", type=_args.int_at_least(1),
                   help="calibration windows per pass through a layer (default: from the "
                   "model's shapes)")  # fmt: skip
    p.add_argument("--sequential", choices=("layer", "module"), default="layer",
                   help="calibrate a layer's kernels on its float inputs (layer), or each on "
                   "the outputs of the kernels quantized before it (module)")  # fmt: skip
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype float weights are read in (bfloat16 halves a layer)")  # fmt: skip
    p.add_argument("--allow-larger", action="store_true",
                   help="from a GGUF file, store the embedding table and LM head as the recipe "
                   "says even where that is larger than the file's own format (by default "
                   "they keep the file's format, or the run is refused)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _args.add_distributed_args(p)


def run(args) -> int:
    from jquant.calib.stream import parse_bytes, quantize_to_disk
    from jquant.io.packed import check_output_directory

    recipe = _args.recipe(args.recipe)
    if recipe is None:
        raise ValueError("--recipe float quantizes nothing; name a recipe")
    check_output_directory(args.output, overwrite=args.overwrite)
    _args.check_calib(args)
    _args.check_distributed(args)
    if args.max_memory is not None:
        with _args.flag("--max-memory"):
            parse_bytes(args.max_memory)
    placement = _args.placement(args)
    path, report = quantize_to_disk(
        args.model, recipe, args.output, calib=args.calib, samples=args.calib_samples,
        seq_len=args.calib_seq_len, max_memory=args.max_memory, micro_batch=args.micro_batch,
        sequential=args.sequential, param_dtype=args.param_dtype, resume=not args.no_resume,
        overwrite=args.overwrite, placement=placement,
        progress=not args.json and placement.process == 0, allow_larger=args.allow_larger,
    )  # fmt: skip
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    else:
        q_bits = report["quantized_bits_per_weight"]
        resumed = report["resumed_layers"]
        again = f", {len(resumed)} layers from an earlier run" if resumed else ""
        print(
            f"{args.model} [{recipe.name}] -> {path}: weights "
            f"{report['weight_bytes'] / 1e6:.2f} MB, {report['bits_per_weight']:.3f} "
            f"bits/weight ({q_bits or 0:.3f} in the quantized tensors), quantized in "
            f"{report['seconds']:.1f} s{again}"
        )
    return 0
