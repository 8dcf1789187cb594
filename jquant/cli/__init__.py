"""The ``jquant`` command.

    jquant recipes [show NAME]
    jquant inspect MODEL [--recipe R] [--batch B --context T --kv-cache F] [--report]
    jquant eval MODEL [--recipe R] [--corpus pydoc-eval | --text FILE] [--seq-len 512]
                      [--max-tokens N] [--json]
    jquant generate MODEL [--recipe R] --prompt TEXT [--max-new-tokens N] [--json]
    jquant quantize MODEL --recipe R [--calib CORPUS] [--calib-samples N] -o DIR [--overwrite]
    jquant export MODEL --format compressed-tensors|gptq|gptq-v1 -o DIR [--recipe R]
    jquant compare MODEL --recipes a,b,c [--corpus ...] [--plot out.png] [--json]
    jquant allocate MODEL (--target-bits B | --target-size 100MB | --fit DEVICE --context T
                           --batch N [--kv-cache F]) [--calib ...] [-o recipe.yaml] [--json]
    jquant serve MODEL [--recipe R] [--kv-cache F] [--host H] [--port P]
                       [--max-slots N] [--max-context T] [--prefill-chunk C] [--mesh tp=N[,ep=M]]
                       [--served-model-name NAME]

MODEL is a registry name (``smollm2-135m``), a local Hugging Face directory (float, or
GPTQ, AWQ and compressed-tensors checkpoints, loaded as their codes), a ``.gguf`` file
(``--keep-packed`` keeps its quantized matrices packed), a hub id, or a directory written by
``jquant quantize`` (loaded packed, without float weights).

Every argument that can be checked without the model (numbers, recipes, the text, the
plot's directory) is checked before the model loads; an error is one line,
``jquant COMMAND: error: ...``, and exit status 2.

Each command is a module of this package (its parser and its ``run``); what they compute
lives in the library (`jquant.calib.apply_recipe`, `jquant.eval.compare`, ...), so a Python
user can call it too.
"""

from __future__ import annotations

import argparse
import sys

from jquant.cli import allocate, eval, export, generate, inspect, quantize, recipes, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jquant",
        description="Quantize JAX/Flax models and measure what it costs and saves.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    recipes.add_parser(sub)
    inspect.add_parser(sub)
    eval.add_eval_parser(sub)
    generate.add_parser(sub)
    quantize.add_parser(sub)
    export.add_parser(sub)
    eval.add_compare_parser(sub)
    allocate.add_parser(sub)
    serve.add_parser(sub)
    return parser


_HANDLERS = {
    "recipes": recipes.run,
    "inspect": inspect.run,
    "eval": eval.run_eval,
    "generate": generate.run,
    "quantize": quantize.run,
    "export": export.run,
    "compare": eval.run_compare,
    "allocate": allocate.run,
    "serve": serve.run,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jquant`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _HANDLERS[args.command](args)
    except (ValueError, OSError) as e:  # bad input, missing files, failed downloads
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"jquant {args.command}: error: {message}", file=sys.stderr)
        return 2
