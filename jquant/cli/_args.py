"""Argument types and groups shared by the commands, and the few steps every command takes
with its arguments (the recipe, the model, the text)."""

from __future__ import annotations

import argparse
import contextlib
import math


def int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, *, open_low: bool = False):
    """An argparse ``type``: a finite float in ``[low, high]`` (``(low, high]`` if open_low)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (open_low and value == low) or value > high:
            interval = f"in {'(' if open_low else '['}{low}, {high}]"
            if high == math.inf:
                interval = f"> {low}" if open_low else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text}")
        return value

    return parse


def add_model_args(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    p.add_argument("model", help="registry name (smollm2-135m), HF directory, .gguf file or hub id")
    if recipe:
        p.add_argument("--recipe", help="shipped recipe name or YAML path (default: float)")


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int_at_least(1), default=1, help="sequences served at once")
    p.add_argument(
        "--context", type=int_at_least(1), default=4096, help="tokens per sequence in the cache"
    )
    p.add_argument("--kv-cache", default="bfloat16", help="KV cache format (bfloat16, int8, ...)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", default="pydoc-eval", help="pydoc-eval, python-code, pydoc-calib or a file"
    )
    p.add_argument("--text", help="a text file to evaluate on (overrides --corpus)")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window")
    p.add_argument(
        "--max-tokens",
        type=int_at_least(1),
        default=16384,
        help="tokens of the text to use (at least --seq-len)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=4, help="windows per forward pass"
    )


def add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default="pydoc-calib",
        help="calibration text for calibrated recipes: pydoc-calib or a file",
    )
    p.add_argument(
        "--calib-samples", type=int_at_least(1), default=128, help="calibration windows"
    )
    p.add_argument(
        "--calib-seq-len", type=int_at_least(2), default=512, help="tokens per calibration window"
    )


@contextlib.contextmanager
def flag(name: str):
    """Prefixes the message of a library ValueError with the flag it is about."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{name} {e}") from None


def load(args):
    """(model, float params, tokenizer, config) of ``args.model``."""
    from jquant import models

    return models.load(args.model, with_config=True)


def recipe(name: str | None):
    """The recipe ``name`` loaded (None for float), so that a bad one fails before the model
    loads."""
    from jquant.recipe import Recipe

    return None if name in (None, "float") else Recipe.load(name)


def check_calib(args) -> None:
    """Fails early on a calibration corpus that does not exist."""
    from jquant.eval import load_corpus

    load_corpus(args.calib)


def text(args) -> str:
    """The text to evaluate, after the window arguments are checked against each other."""
    from jquant.eval import load_corpus

    if args.max_tokens < args.seq_len:
        raise ValueError(
            f"--max-tokens {args.max_tokens} is less than --seq-len "
            f"{args.seq_len}: not one window fits"
        )
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {args.text!r} is not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise ValueError(f"--text {args.text!r}: {e.strerror or e}") from None
    return load_corpus(args.corpus)
