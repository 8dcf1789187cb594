"""``jquant export MODEL --format compressed-tensors|gptq|gptq-v1 -o DIR [--recipe R]``:
a quantized model written in another library's format (what vLLM and transformers load)."""

from __future__ import annotations

from jquant.cli import _args

FORMATS = ("compressed-tensors", "gptq", "gptq-v1")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a quantized model as compressed-tensors or GPTQ")
    _args.add_model_args(p)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors (vLLM, transformers), gptq (GPTQ v2 zero points) "
                        "or gptq-v1 (AutoGPTQ's, stored minus one)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def run(args) -> int:
    from jquant.calib import quantize_loaded
    from jquant.io import _packed_writer
    from jquant.io.compressed_tensors import write_compressed_tensors
    from jquant.io.gptq_awq import write_gptq
    from jquant.models import params_to_hf

    recipe = _args.recipe(args.recipe)
    _packed_writer.check_output_directory(args.output, overwrite=args.overwrite)
    model, params, tokenizer, config = _args.load(args)
    model, params = quantize_loaded(model, params, recipe)
    # A recipe that quantizes the head apart from a tied embedding unties the model.
    config = {**config, "tie_word_embeddings": model.config.tie_word_embeddings}
    if args.format == "compressed-tensors":
        out = write_compressed_tensors(params, config, tokenizer, args.output,
                                       overwrite=args.overwrite)  # fmt: skip
    else:
        version = 1 if args.format == "gptq-v1" else 2
        out = write_gptq(params_to_hf(params), config, tokenizer, args.output,
                         version=version, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {out} ({args.format})")
    return 0
