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
    p.add_argument("model", help="registry name (smollm2-135m), HF directory (float, GPTQ, AWQ "
                                 "or compressed-tensors), .gguf file or hub id")  # fmt: skip
    if recipe:
        p.add_argument("--recipe", help="shipped recipe name or YAML path (default: float)")
    p.add_argument("--keep-packed", action="store_true",
                   help="a GGUF model's quantized matrices stay packed (QArrays), not "
                        "dequantized to float")  # fmt: skip


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int_at_least(1), default=1, help="sequences served at once")
    p.add_argument(
        "--context", type=int_at_least(1), default=4096, help="tokens per sequence in the cache"
    )
    p.add_argument("--kv-cache", default="bfloat16", help="KV cache format (bfloat16, int8, ...)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        default="pydoc-eval",
        help="pydoc-eval, python-code, pydoc-calib, python-mix or a file",
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
    from jquant.calib.data import DEFAULT_CORPUS

    p.add_argument(
        "--calib",
        default=DEFAULT_CORPUS,
        help=f"calibration text for calibrated recipes: {DEFAULT_CORPUS} (default; prose, code "
        "and data from Python's standard library), pydoc-calib or a file",
    )
    p.add_argument(
        "--calib-samples", type=int_at_least(1), default=128, help="calibration windows"
    )
    p.add_argument(
        "--calib-seq-len", type=int_at_least(2), default=512, help="tokens per calibration window"
    )


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data parallel", "run the calibration passes over several devices or processes: each "
        "device takes its share of every micro-batch's windows")  # fmt: skip
    g.add_argument("--data-parallel", action="store_true",
                   help="over every device of this process")  # fmt: skip
    add_process_args(g, "process 0 writes the output")


def add_process_args(g, leader: str) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (`jax.distributed`);
    ``leader`` says what process 0 does."""
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join a multi-process run whose process 0 listens at HOST:PORT (with "
                   "--num-processes and --process-id); every device of every process takes "
                   f"part, and {leader}")  # fmt: skip
    g.add_argument("--num-processes", type=int_at_least(1), help="processes in the run")
    g.add_argument("--process-id", type=int_at_least(0),
                   help="this process's index, 0 to --num-processes - 1")  # fmt: skip


def join_processes(args) -> bool:
    """Joins the `jax.distributed` run the flags name (checked first); whether they name
    one."""
    import jax

    check_distributed(args)
    if args.coordinator is None:
        return False
    # CPU devices of different processes reach each other only through gloo; the setting
    # is ignored by the other platforms.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)  # fmt: skip
    return True


def check_distributed(args) -> None:
    """Fails early on multi-process flags that do not go together."""
    given = [f for f, v in (("--coordinator", args.coordinator),
                            ("--num-processes", args.num_processes),
                            ("--process-id", args.process_id)) if v is not None]  # fmt: skip
    if given and len(given) < 3:
        raise ValueError(
            f"{', '.join(given)} given alone: a multi-process run needs --coordinator, "
            "--num-processes and --process-id together"
        )
    if not given:
        return
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator {args.coordinator!r}: expected HOST:PORT, like 10.0.0.1:1234"
        )
    if args.process_id >= args.num_processes:
        raise ValueError(
            f"--process-id {args.process_id} is out of range for --num-processes "
            f"{args.num_processes} (0 to {args.num_processes - 1})"
        )


def placement(args):
    """The `jquant.calib.activations.Placement` the flags ask for: a one-axis ``"data"`` mesh
    over every process's devices (after `jax.distributed.initialize`), over this process's
    devices, or none."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from jquant.calib.activations import Placement

    if join_processes(args):
        return Placement(Mesh(np.array(jax.devices()), ("data",)))
    if args.data_parallel:
        return Placement(Mesh(np.array(jax.local_devices()), ("data",)))
    return Placement()


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

    return models.load(args.model, with_config=True, packed=getattr(args, "keep_packed", False))


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
