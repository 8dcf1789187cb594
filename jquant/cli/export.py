"""``jquant export MODEL --format compressed-tensors|gptq|gptq-v1 -o DIR [--recipe R]``, or
``--format gguf -o FILE.gguf``: a quantized model written in another library's format (what
vLLM and transformers load; GGUF: what llama.cpp loads)."""

from __future__ import annotations

import os

from jquant.cli import _args

FORMATS = ("compressed-tensors", "gptq", "gptq-v1", "gguf")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a quantized model as compressed-tensors, GPTQ or GGUF")
    _args.add_model_args(p)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="compressed-tensors (vLLM, transformers), gptq (GPTQ v2 zero points), "
                        "gptq-v1 (AutoGPTQ's, stored minus one) or gguf (llama.cpp; one file, "
                        "with a gguf-* recipe)")  # fmt: skip
    p.add_argument("-o", "--output", required=True,
                   help="directory to write (gguf: the .gguf file)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output (gguf: an existing file)")


def run(args) -> int:
    from jquant.calib import quantize_loaded
    from jquant.io import _packed_writer
    from jquant.io.compressed_tensors import write_compressed_tensors
    from jquant.io.gguf_export import write_gguf
    from jquant.io.gptq_awq import write_gptq
    from jquant.models import params_to_hf

    recipe = _args.recipe(args.recipe)
    gguf = args.format == "gguf"
    if gguf and os.path.exists(args.output) and not (args.overwrite
                                                      and os.path.isfile(args.output)):
        raise ValueError(f"--output {args.output!r} exists; pass --overwrite to replace it"
                         if os.path.isfile(args.output) else
                         f"--output {args.output!r} is a directory; give the .gguf file")
    if not gguf:
        _packed_writer.check_output_directory(args.output, overwrite=args.overwrite)
    model, params, tokenizer, config = _args.load(args)
    model, params = quantize_loaded(model, params, recipe)
    # A recipe that quantizes the head apart from a tied embedding unties the model.
    config = {**config, "tie_word_embeddings": model.config.tie_word_embeddings}
    if model.config.rotation is not None:  # the writers refuse it, naming why
        from jquant.rotate import rotated_hf_config

        config = rotated_hf_config(config, model.config)
    if gguf:
        out = write_gguf(params, config, tokenizer, args.output, overwrite=args.overwrite)
    elif args.format == "compressed-tensors":
        out = write_compressed_tensors(params, config, tokenizer, args.output,
                                       overwrite=args.overwrite)  # fmt: skip
    else:
        version = 1 if args.format == "gptq-v1" else 2
        out = write_gptq(params_to_hf(params), config, tokenizer, args.output,
                         version=version, overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {out} ({args.format})")
    return 0
