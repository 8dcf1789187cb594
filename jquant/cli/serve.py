"""``jquant serve MODEL [--recipe R] [--kv-cache F] [--mesh tp=N[,ep=M]] [--lora NAME=PATH] ...``:
serve the model over an OpenAI-compatible HTTP API (with LoRA adapters a request picks by
model ``MODEL:NAME``); with ``--coordinator``, over several processes' devices
(`jquant.serve.lockstep`)."""

from __future__ import annotations

import math
import sys

from jquant.cli import _args
from jquant.models.cache import KV_CACHE_FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _args.add_model_args(p)
    p.add_argument("--kv-cache", choices=KV_CACHE_FORMATS, default="none",
                   help="KV cache format (none: the compute dtype)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_args.int_at_least(0), default=8000, help="0 = any free port")
    p.add_argument("--max-slots", type=_args.int_at_least(1), default=8,
                   help="requests decoded at once")
    p.add_argument("--max-context", type=_args.int_at_least(2),
                   help="longest prompt + completion (default: the engine's)")
    p.add_argument("--prefill-chunk", type=_args.int_at_least(1), default=128,
                   help="prompt tokens of one request prefilled per step")
    p.add_argument("--prefill-rows", type=_args.int_at_least(1), default=4,
                   help="prompts prefilled together in one step")
    p.add_argument("--page-size", type=_args.int_at_least(1), default=16,
                   help="positions per page of the KV cache")
    p.add_argument("--kv-cache-tokens", type=_args.int_at_least(2),
                   help="positions the KV cache holds in all (default: max-slots x "
                   "max-context); requests take pages as they need them")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not reuse the cached pages of a prompt prefix seen before")
    p.add_argument("--mesh", help="tensor parallelism over devices: tp=N; tp=N,ep=M also "
                   "splits MoE experts over M (N * M devices)")
    p.add_argument("--speculative-ngram", type=_args.int_at_least(0), default=0, metavar="K",
                   help="speculative decoding by n-gram prompt lookup: up to K draft tokens "
                   "per step, copied from where the sequence's last tokens occurred before "
                   "(0 = off; outputs are unchanged)")
    p.add_argument("--ngram-min", type=_args.int_at_least(1), default=2,
                   help="shortest suffix the n-gram lookup matches")
    p.add_argument("--ngram-max", type=_args.int_at_least(1), default=4,
                   help="longest suffix the n-gram lookup matches (tried first)")
    p.add_argument("--served-model-name", help="model id of the API (default: MODEL)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   help="a LoRA adapter file (jquant.qat.lora.save) that requests use with "
                   "model '<model id>:NAME'; repeat for more, all served in one batch")
    p.add_argument("--max-queue", type=_args.int_at_least(0),
                   help="requests (completions: prompts x n) that may wait for a slot; beyond, "
                   "HTTP 429 with Retry-After (default: 8 x --max-slots)")
    p.add_argument("--request-timeout", type=_args.float_in(0, open_low=True),
                   help="seconds after which a waiting or running request ends with an error "
                   "(default: no limit)")
    p.add_argument("--shutdown-grace", type=_args.float_in(0), default=5.0,
                   help="seconds running requests may take to finish after SIGTERM before "
                   "they end with an error (queued ones end at once)")
    g = p.add_argument_group(
        "multi-process", "serve one model over the devices of several processes (tensor "
        "parallel over all of them); every process loads the model")  # fmt: skip
    _args.add_process_args(g, "process 0 serves the HTTP API while the others follow its steps")


def run(args) -> int:
    import socket

    import jax
    import uvicorn

    from jquant.calib import quantize_loaded
    from jquant.serve import lockstep
    from jquant.serve.engine import Engine, engine_report
    from jquant.serve.server import Server, create_app
    from jquant.serve.tp import as_mesh
    from jquant.sharding import parse_mesh

    if args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0 to 65535)")
    axes = None
    if args.mesh is not None:
        with _args.flag("--mesh"):
            axes = parse_mesh(args.mesh)
    recipe = _args.recipe(args.recipe)
    with _args.flag("--lora"):
        adapters = _adapters(args.lora)  # before the model loads
    speculative = _speculative(args)
    multi = _args.join_processes(args)
    if multi:
        if axes is not None and math.prod(axes.values()) != jax.device_count():
            raise ValueError(f"--mesh {args.mesh}: a multi-process server is parallel over "
                             f"every process's devices, {jax.device_count()} (e.g. "
                             f"tp={jax.device_count()})")  # fmt: skip
        axes = axes or {"tp": jax.device_count()}
    mesh = None if axes is None else as_mesh(axes)  # enough devices? (before the model loads)
    leader = not multi or jax.process_index() == 0
    sock = None
    if leader:  # fails before loading
        family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((args.host, args.port), family=family)
    try:
        model, params, tokenizer, _ = _args.load(args)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; serve needs one")
        model, params = quantize_loaded(model, params, recipe)
        engine = Engine(model, params, tokenizer, max_slots=args.max_slots,
                        max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                        prefill_rows=args.prefill_rows, page_size=args.page_size,
                        kv_cache_tokens=args.kv_cache_tokens,
                        prefix_caching=args.prefix_caching,
                        kv_cache=None if args.kv_cache == "none" else args.kv_cache,
                        mesh=mesh, max_queue=args.max_queue,
                        request_timeout=args.request_timeout,
                        adapters=adapters or None, speculative=speculative)  # fmt: skip
        if not leader:
            print(f"jquant serve: process {jax.process_index()} follows process 0", flush=True)
            calls = lockstep.follow(engine.runner)
            print(f"jquant serve: process 0 stopped after {calls} steps", flush=True)
            return 0
        if multi:
            engine.runner = lockstep.Leader(engine.runner)
        try:
            print(engine_report(engine), file=sys.stderr, flush=True)
            engine.start()
            app = create_app(engine, args.served_model_name or args.model)
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"jquant serve: {args.served_model_name or args.model} at "
                  f"http://{host}:{port}/v1 ({len(engine.runner.programs)} programs compiled "
                  f"in {engine.compile_seconds:.1f} s)", flush=True)  # fmt: skip
            # No logging config of uvicorn's own (it would bind handlers to this moment's
            # stderr); its warnings still reach stderr through logging's last resort.
            config = uvicorn.Config(app, log_level="warning", log_config=None)
            Server(config, engine, args.shutdown_grace).run(sockets=[sock])
        finally:
            engine.close()
            if multi:
                engine.runner.stop()
    finally:
        if sock is not None:
            sock.close()
    return 0


def _adapters(specs: list[str]) -> dict:
    """``{name: lora.LoRA}`` of ``--lora NAME=PATH`` arguments, each file loaded."""
    from jquant.qat import lora
    from jquant.serve.adapters import NAME

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"{spec!r}: expected NAME=PATH")
        if not NAME.fullmatch(name):
            raise ValueError(f"{spec!r}: the name {name!r} must match {NAME.pattern}")
        if name in out:
            raise ValueError(f"{spec!r}: the name {name!r} is given twice")
        out[name] = lora.load(path)
    return out


def _speculative(args):
    """`--speculative-ngram`, `--ngram-min` and `--ngram-max` as an `Ngram`, or None."""
    from jquant.serve.speculative import Ngram

    if not args.speculative_ngram:
        return None
    if args.ngram_min > args.ngram_max:
        raise ValueError(f"--ngram-min {args.ngram_min} must be <= --ngram-max "
                         f"{args.ngram_max}")  # fmt: skip
    return Ngram(num_tokens=args.speculative_ngram, min_n=args.ngram_min, max_n=args.ngram_max)
