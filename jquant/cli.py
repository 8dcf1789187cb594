"""The ``jquant`` command.

    jquant recipes [show NAME]
    jquant inspect MODEL [--recipe R] [--batch B --context T --kv-cache F] [--report]
    jquant eval MODEL [--recipe R] [--corpus pydoc-eval | --text FILE] [--seq-len 512]
                      [--max-tokens N] [--json]
    jquant generate MODEL [--recipe R] --prompt TEXT [--max-new-tokens N] [--json]
    jquant quantize MODEL --recipe R [--calib CORPUS] [--calib-samples N] -o DIR [--overwrite]
    jquant compare MODEL --recipes a,b,c [--corpus ...] [--plot out.png] [--json]
    jquant allocate MODEL (--target-bits B | --target-size 100MB | --fit DEVICE --context T
                           --batch N [--kv-cache F]) [--calib ...] [-o recipe.yaml] [--json]
    jquant serve MODEL [--recipe R] [--kv-cache {none,int8,fp8}] [--host H] [--port P]
                       [--max-slots N] [--max-context T] [--prefill-chunk C] [--mesh tp=N]
                       [--served-model-name NAME]

MODEL is a registry name (``smollm2-135m``), a local Hugging Face directory, a
``.gguf`` file, a hub id, or a directory written by ``jquant quantize`` (loaded packed,
without float weights).

Every argument that can be checked without the model (numbers, recipes, the text, the
plot's directory) is checked before the model loads; an error is one line,
``jquant COMMAND: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time


def _int_at_least(low: int):
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


def _float_in(low: float, high: float = math.inf, *, open_low: bool = False):
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


def _add_model_args(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    p.add_argument("model", help="registry name (smollm2-135m), HF directory, .gguf file or hub id")
    if recipe:
        p.add_argument("--recipe", help="shipped recipe name or YAML path (default: float)")


def _add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_int_at_least(1), default=1, help="sequences served at once")
    p.add_argument(
        "--context", type=_int_at_least(1), default=4096, help="tokens per sequence in the cache"
    )
    p.add_argument("--kv-cache", default="bfloat16", help="KV cache format (bfloat16, int8, ...)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", default="pydoc-eval", help="pydoc-eval, python-code, pydoc-calib or a file"
    )
    p.add_argument("--text", help="a text file to evaluate on (overrides --corpus)")
    p.add_argument("--seq-len", type=_int_at_least(2), default=512, help="tokens per window")
    p.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=16384,
        help="tokens of the text to use (at least --seq-len)",
    )
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=4, help="windows per forward pass"
    )


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        default="pydoc-calib",
        help="calibration text for calibrated recipes: pydoc-calib or a file",
    )
    p.add_argument(
        "--calib-samples", type=_int_at_least(1), default=128, help="calibration windows"
    )
    p.add_argument(
        "--calib-seq-len", type=_int_at_least(2), default=512, help="tokens per calibration window"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jquant",
        description="Quantize JAX/Flax models and measure what it costs and saves.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("recipes", help="list the shipped recipes, or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", help="recipe name or YAML path (with show)")

    p = sub.add_parser("inspect", help="memory report of a model, float or quantized")
    _add_model_args(p)
    _add_memory_args(p)
    p.add_argument("--report", action="store_true", help="print one row per parameter")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("eval", help="perplexity, weight bytes and bits per weight")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--kv-cache", choices=["none", "int8", "fp8"],
                   help="run every window through the serving KV cache in this format "
                        "(none: the compute dtype); default: no cache")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("generate", help="generate text and report tokens/s")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (chat template applied if any)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--temperature", type=_float_in(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_int_at_least(0), default=0, help="0 = off")
    p.add_argument(
        "--top-p", type=_float_in(0.0, 1.0, open_low=True), default=1.0, help="in (0, 1]; 1 = off"
    )
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("quantize", help="quantize (calibrating if the recipe asks) and save packed")
    _add_model_args(p, recipe=False)
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    _add_calib_args(p)
    p.add_argument("-o", "--output", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("compare", help="one table: recipes vs float on quality, size, speed")
    _add_model_args(p, recipe=False)
    p.add_argument(
        "--recipes",
        default=("w8a16,fp8,w4a16-rtn-g128,w4a16-uint4-g64,nf4,w4a16-hqq-g64,"
                 "w4a16-awq-gptq-uint4-g64"),
        help="comma-separated recipe names or paths (float is always included)",
    )
    _add_eval_args(p)
    _add_calib_args(p)
    p.add_argument(
        "--decode-tokens",
        type=_int_at_least(0),
        default=32,
        help="new tokens for tokens/s (0 = skip decoding)",
    )
    p.add_argument("--plot", help="write perplexity vs weight size to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("allocate", help="choose a format per tensor for a budget; write a recipe")
    _add_model_args(p, recipe=False)
    p.add_argument("--target-bits", type=_float_in(0.0, open_low=True),
                   help="average bits per weight, every weight counted")
    p.add_argument("--target-size", help="total weight bytes, e.g. 100MB or 1.5GiB")
    p.add_argument("--fit", metavar="DEVICE",
                   help="an accelerator of the memory report (H100, L4, 'TPU v5e', ...)")
    p.add_argument("--context", type=_int_at_least(1), help="with --fit: tokens per sequence")
    p.add_argument("--batch", type=_int_at_least(1), help="with --fit: sequences at once")
    p.add_argument("--kv-cache", default="bfloat16", help="with --fit: KV cache format")
    p.add_argument("--formats", help="comma-separated kernel candidates to choose from "
                   "(default: all of jquant.alloc.KERNEL_CANDIDATES)")
    p.add_argument("--no-awq", action="store_true",
                   help="GPTQ rules without AWQ's input scales")
    p.add_argument("--name", help="recipe name (default: from the budget)")
    _add_calib_args(p)
    p.set_defaults(calib_samples=16)
    p.add_argument("-o", "--output", help="write the recipe YAML here (default: print it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--json", action="store_true", help="print the allocation as JSON")

    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _add_model_args(p)
    p.add_argument("--kv-cache", choices=["none", "int8", "fp8"], default="none",
                   help="KV cache format (none: the compute dtype)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=_int_at_least(0), default=8000, help="0 = any free port")
    p.add_argument("--max-slots", type=_int_at_least(1), default=8,
                   help="requests decoded at once")
    p.add_argument("--max-context", type=_int_at_least(2),
                   help="longest prompt + completion (default: the engine's)")
    p.add_argument("--prefill-chunk", type=_int_at_least(1), default=128,
                   help="prompt tokens prefilled per step")
    p.add_argument("--mesh", help="tensor parallelism over devices: tp=N")
    p.add_argument("--served-model-name", help="model id of the API (default: MODEL)")
    return parser


def _cmd_recipes(args) -> int:
    from jquant.recipe import Recipe

    if args.action == "list":
        for name in Recipe.list_shipped():
            print(f"{name:<18} {Recipe.load(name).description}")
        return 0
    if not args.name:
        raise ValueError("jquant recipes show NAME: give a recipe name or a YAML path")
    print(Recipe.load(args.name).to_yaml(), end="")
    return 0


def _cmd_inspect(args) -> int:
    from jquant.memory import KV_FORMATS, memory_report
    from jquant.transform import format_report, quantize

    recipe = _recipe(args.recipe)
    if args.kv_cache not in KV_FORMATS:
        raise ValueError(
            f"--kv-cache {args.kv_cache!r} is unknown; use one of {', '.join(KV_FORMATS)}"
        )
    model, params, _, config = _load(args)
    rows = None
    if recipe is not None:
        _check_not_quantized(params, recipe)
        _, params = _prepare_head(model, params, recipe)
        params, rows = quantize(params, recipe, report=True)
    report = memory_report(
        params, batch=args.batch, context=args.context, kv_cache=args.kv_cache, config=config
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


def _load(args):
    """(model, float params, tokenizer, config) of ``args.model``."""
    from jquant import models

    return models.load(args.model, with_config=True)


def _recipe(name: str | None):
    """The recipe ``name`` loaded (None for float), so that a bad one fails before the model
    loads."""
    from jquant.recipe import Recipe

    return None if name in (None, "float") else Recipe.load(name)


def _text(args) -> str:
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


def _quantized(model, params, recipe):
    """``(model, quantized params)``; the model is untied when the recipe names the head
    apart from a tied embedding."""
    from jquant.transform import quantize

    if recipe is None:
        return model, params
    _check_not_quantized(params, recipe)
    model, params = _prepare_head(model, params, recipe)
    return model, quantize(params, recipe)


def _prepare_head(model, params, recipe):
    from jquant.models.convert import prepare_head

    return prepare_head(model, params, recipe)


def _check_not_quantized(params, recipe) -> None:
    import jax

    if any(_is_qarray(x) for x in jax.tree.leaves(params, is_leaf=_is_qarray)):
        raise ValueError(
            f"the model is already quantized (a jquant quantize checkpoint); "
            f"drop --recipe {recipe.name}"
        )


def _is_qarray(x) -> bool:
    from jquant.qarray import QArray

    return isinstance(x, QArray)


def _check_calib(args) -> None:
    """Fails early on a calibration corpus that does not exist."""
    from jquant.eval import load_corpus

    load_corpus(args.calib)


def _calibrated(model, params, tokenizer, recipe, args, tokens_cache: dict, *, progress: bool):
    """``(model, qparams, report dict)``: calibrated when the recipe asks, else plain
    quantize; the model is untied when the recipe names the head apart (`_quantized`)."""
    from jquant import calib
    from jquant.transform import quantize

    model, params = _prepare_head(model, params, recipe)
    if not calib.needs_calibration(recipe):
        start = time.perf_counter()
        qparams, rows = quantize(params, recipe, report=True)
        report = {"seconds": time.perf_counter() - start, "calibrated": False,
                  "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip
        return model, qparams, report
    if tokenizer is None:
        raise ValueError(
            f"recipe {recipe.name!r} needs calibration text, and the model has "
            "no tokenizer to encode it"
        )
    if "tokens" not in tokens_cache:
        tokens_cache["tokens"] = calib.calibration_tokens(
            tokenizer, args.calib, samples=args.calib_samples, seq_len=args.calib_seq_len
        )
    qparams, report = calib.quantize_model(model, params, recipe, tokens_cache["tokens"],
                                           progress=progress)  # fmt: skip
    return model, qparams, {"calibrated": True, "corpus": args.calib, **report.to_dict()}


def _cmd_quantize(args) -> int:
    from jquant.io.packed import check_output_directory, save_packed

    recipe = _recipe(args.recipe)
    if recipe is None:
        raise ValueError("--recipe float quantizes nothing; name a recipe")
    check_output_directory(args.output, overwrite=args.overwrite)
    _check_calib(args)
    model, params, tokenizer, config = _load(args)
    model, qparams, report = _calibrated(model, params, tokenizer, recipe, args, {},
                                         progress=not args.json)  # fmt: skip
    if not model.config.tie_word_embeddings:
        config = {**config, "tie_word_embeddings": False}  # untied for the recipe
    weight_bytes, bits, q_bits = _weights(qparams)
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


def _weights(params) -> tuple[int, float, float | None]:
    """(weight bytes, bits/weight over all weights, bits/weight of the quantized ones)."""
    from jquant.memory import memory_report
    from jquant.qtypes import QTYPES

    r = memory_report(params)
    quantized = [u for name, u in r.by_format.items() if name in QTYPES]
    elements = sum(u.elements for u in quantized)
    q_bits = 8.0 * sum(u.nbytes for u in quantized) / elements if elements else None
    return r.weight_bytes, r.bits_per_weight, q_bits


def _evaluate(model, params, tokenizer, text, args, *, progress: bool) -> dict:
    from jquant.eval import perplexity

    kw = dict(tokenizer=tokenizer, seq_len=args.seq_len, max_tokens=args.max_tokens,
              batch_size=args.batch_size, progress=progress)  # fmt: skip
    kv_cache = getattr(args, "kv_cache", None)
    if kv_cache is None:
        result = perplexity(model, params, text, **kw)
    else:
        from jquant.serve.runner import cache_perplexity

        result = cache_perplexity(model, params, text, kv_cache=kv_cache, **kw)
    weight_bytes, bits, q_bits = _weights(params)
    out = {"perplexity": result.perplexity, "weight_bytes": weight_bytes,
           "bits_per_weight": bits, "quantized_bits_per_weight": q_bits,
           "tokens": result.tokens}  # fmt: skip
    if kv_cache is not None:
        out["kv_cache"] = kv_cache
    return out


def _cmd_eval(args) -> int:
    recipe, text = _recipe(args.recipe), _text(args)
    model, params, tokenizer, _ = _load(args)
    model, params = _quantized(model, params, recipe)
    out = _evaluate(model, params, tokenizer, text, args, progress=not args.json)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.model} [{args.recipe or _label(args.model)}]: perplexity "
            f"{out['perplexity']:.3f} over "
            f"{out['tokens']} tokens (seq_len {args.seq_len}"
            f"{', KV cache ' + args.kv_cache if args.kv_cache else ''}); weights "
            f"{out['weight_bytes'] / 1e6:.2f} MB, {out['bits_per_weight']:.3f} bits/weight"
        )
    return 0


def _label(model: str) -> str:
    from jquant.io.packed import is_packed

    return "packed" if os.path.isdir(model) and is_packed(model) else "float"


def _prompt_ids(tokenizer, prompt: str, raw: bool) -> list[int]:
    """The chat template's rendering (which writes its own BOS), else the raw text with BOS
    exactly when the tokenizer's ``add_bos_token`` says."""
    from jquant.io.tokenizer import encode_prompt
    from jquant.models import chat_prompt

    if not raw and getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, prompt)
    return encode_prompt(tokenizer, prompt)


def _decode_speed(model, params, tokenizer, new_tokens: int) -> float:
    """Greedy decode tokens/s at batch 1 (compilation excluded)."""
    from jquant.models import generate

    ids = _prompt_ids(tokenizer, "Explain what a Python decorator is.", raw=False)
    # Stop tokens disabled so every run decodes the same number of tokens.
    out = generate(model, params, [ids], max_new_tokens=new_tokens, stop_tokens=())
    return out.decode_tokens_per_second


def _cmd_generate(args) -> int:
    from jquant.models import generate

    recipe = _recipe(args.recipe)
    model, params, tokenizer, _ = _load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; generate needs one")
    model, params = _quantized(model, params, recipe)
    ids = _prompt_ids(tokenizer, args.prompt, args.raw)
    out = generate(
        model, params, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k or None, top_p=args.top_p if args.top_p < 1 else None, seed=args.seed,
    )  # fmt: skip
    text = out.texts(tokenizer)[0]
    if args.json:
        print(json.dumps({
            "text": text, "tokens": out.sequences()[0],
            "decode_tokens_per_second": out.decode_tokens_per_second,
            "prefill_seconds": out.prefill_seconds, "compile_seconds": out.compile_seconds,
        }))  # fmt: skip
    else:
        print(text)
        print(
            f"\n[{int(out.lengths[0])} tokens, {out.decode_tokens_per_second:.1f} tokens/s "
            f"decode, prefill {out.prefill_seconds * 1e3:.0f} ms, compile "
            f"{out.compile_seconds:.1f} s]",
            file=sys.stderr,
        )
    return 0


def _cmd_compare(args) -> int:
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not names:
        raise ValueError(f"--recipes {args.recipes!r} names no recipe")
    names = ["float"] + [n for n in dict.fromkeys(names) if n != "float"]
    recipes = [_recipe(n) for n in names]  # fail on a bad name before the slow part
    if args.plot:
        _check_plot_path(args.plot)
    text = _text(args)
    _check_calib(args)
    model, params, tokenizer, _ = _load(args)
    rows, tokens_cache = [], {}

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    for i, (name, recipe) in enumerate(zip(names, recipes), 1):
        start = time.perf_counter()
        seconds = None
        if recipe is None:
            qmodel, qparams = model, params
        else:
            say(f"[{i}/{len(names)}] {name}: quantizing")
            qmodel, qparams, report = _calibrated(model, params, tokenizer, recipe, args,
                                                  tokens_cache, progress=not args.json)  # fmt: skip
            seconds = report["seconds"]
        say(f"[{i}/{len(names)}] {name}: perplexity")
        row = {"recipe": name, "quantize_seconds": seconds,
               **_evaluate(qmodel, qparams, tokenizer, text, args,
                           progress=not args.json)}  # fmt: skip
        if args.decode_tokens > 0:
            say(f"[{i}/{len(names)}] {name}: decoding {args.decode_tokens} tokens")
        row["decode_tokens_per_second"] = (
            _decode_speed(qmodel, qparams, tokenizer, args.decode_tokens)
            if args.decode_tokens > 0
            else None
        )
        rows.append(row)
        say(
            f"[{i}/{len(names)}] {name}: perplexity {row['perplexity']:.3f} "
            f"({time.perf_counter() - start:.0f} s)"
        )
    base = rows[0]["perplexity"]
    for row in rows:
        row["delta_percent"] = 100.0 * (row["perplexity"] / base - 1.0)
    if args.plot:
        _plot(rows, args.plot, title=f"{args.model}: perplexity vs weight size")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_compare(rows, args))
    return 0


def _cmd_allocate(args) -> int:
    import jax

    from jquant import alloc, calib

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
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"--output {args.output!r} exists; pass --overwrite to replace it")
    kernel_candidates = alloc.KERNEL_CANDIDATES
    if args.formats is not None:
        known = {c.name: c for c in alloc.KERNEL_CANDIDATES}
        names = [n.strip() for n in args.formats.split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ValueError(f"--formats {args.formats!r}: unknown {', '.join(bad) or 'empty'}; "
                             f"known: {', '.join(known)}")  # fmt: skip
        kernel_candidates = tuple(known[n] for n in dict.fromkeys(names))
    _check_calib(args)
    model, params, tokenizer, config = _load(args)
    if any(_is_qarray(x) for x in jax.tree.leaves(params, is_leaf=_is_qarray)):
        raise ValueError(f"{args.model} is already quantized; allocate starts from float weights")
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to encode the calibration text")
    tokens = calib.calibration_tokens(tokenizer, args.calib, samples=args.calib_samples,
                                      seq_len=args.calib_seq_len)  # fmt: skip
    table = alloc.measure(model, params, tokens, config=config,
                          kernel_candidates=kernel_candidates, progress=not args.json)  # fmt: skip
    budget = alloc.budget_bytes(
        table, target_bits=args.target_bits, target_size=args.target_size, fit=args.fit,
        context=args.context, batch=args.batch, kv_cache=args.kv_cache,
    )  # fmt: skip
    allocation = alloc.allocate(table, budget)
    name = args.name or _allocation_name(args)
    recipe = allocation.recipe(name, awq=not args.no_awq)
    text = recipe.to_yaml()
    if args.output:
        tmp = f"{args.output}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)
    if args.json:
        print(json.dumps({
            "recipe": args.output, "name": name, "budget_bytes": budget,
            "weight_bytes": allocation.weight_bytes,
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


def _mesh_tp(text: str | None) -> int | None:
    """The tensor-parallel size of ``--mesh tp=N`` (None without --mesh)."""
    if text is None:
        return None
    match = re.fullmatch(r"tp=([0-9]+)", text.strip())
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"--mesh {text!r}: expected tp=N with N >= 1 devices, e.g. tp=2")
    return int(match.group(1))


def _cmd_serve(args) -> int:
    import socket

    import uvicorn

    from jquant.serve.engine import Engine
    from jquant.serve.server import create_app

    if args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0 to 65535)")
    tp, recipe = _mesh_tp(args.mesh), _recipe(args.recipe)
    if tp is not None:
        from jquant.sharding import make_tp_mesh

        make_tp_mesh(tp)  # enough devices? (before the model loads)
    family = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server((args.host, args.port), family=family)  # fails before loading
    try:
        model, params, tokenizer, _ = _load(args)
        if tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer; serve needs one")
        model, params = _quantized(model, params, recipe)
        engine = Engine(model, params, tokenizer, max_slots=args.max_slots,
                        max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                        kv_cache=None if args.kv_cache == "none" else args.kv_cache,
                        mesh=tp)  # fmt: skip
        try:
            _report_engine(engine)
            engine.start()
            app = create_app(engine, args.served_model_name or args.model)
            host, port = sock.getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"jquant serve: {args.served_model_name or args.model} at "
                  f"http://{host}:{port}/v1 ({len(engine.runner.programs)} programs compiled "
                  f"in {engine.compile_seconds:.1f} s)", flush=True)  # fmt: skip
            # No logging config of uvicorn's own (it would bind handlers to this moment's
            # stderr); its warnings still reach stderr through logging's last resort.
            uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                         log_config=None)).run(sockets=[sock])
        finally:
            engine.close()
    finally:
        sock.close()
    return 0


def _report_engine(engine) -> None:
    """One stderr line on the engine's memory; under --mesh, per device and what stayed
    replicated."""
    runner = engine.runner
    line = (f"jquant serve: {engine.max_slots} slots x {engine.max_context} tokens, KV cache "
            f"{runner.fmt.name} {runner.cache.nbytes / 1e6:.1f} MB, weights "
            f"{runner.weight_bytes / 1e6:.1f} MB")  # fmt: skip
    if engine.mesh is not None:
        held = runner.per_device_bytes()
        line += (f"; tp={len(held)}: {max(held.values()) / 1e6:.1f} MB per device "
                 f"({len(engine.tp_notes)} tensors replicated)")  # fmt: skip
    print(line, file=sys.stderr, flush=True)
    for note in engine.tp_notes:
        print(f"  replicated: {note}", file=sys.stderr)


def _allocation_name(args) -> str:
    if args.target_bits is not None:
        return f"alloc-{args.target_bits:g}bits"
    if args.target_size is not None:
        return f"alloc-{re.sub(r'[^A-Za-z0-9.]', '', args.target_size)}"
    return f"alloc-fit-{re.sub(r'[^a-z0-9]', '', args.fit.lower())}-{args.context}x{args.batch}"


def format_compare(rows: list[dict], args) -> str:
    """The compare table (Markdown, so it pastes into a README)."""
    lines = [
        f"Perplexity: {args.corpus if not args.text else args.text}, first "
        f"{rows[0]['tokens'] + rows[0]['tokens'] // (args.seq_len - 1)} tokens, "
        f"seq_len {args.seq_len}. Decode: greedy, batch 1, {args.decode_tokens} new tokens.",
        "",
        "bits/w: all weights (float ones at their stored dtype); quantized: the quantized "
        "tensors alone, scales and zero points included.",
        "",
        "| recipe | bits/w | quantized bits/w | weights MB | perplexity | Δ vs float "
        "| decode tokens/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed, q_bits = r["decode_tokens_per_second"], r["quantized_bits_per_weight"]
        lines.append(
            f"| {r['recipe']} | {r['bits_per_weight']:.2f} | "
            f"{'-' if q_bits is None else f'{q_bits:.2f}'} | {r['weight_bytes'] / 1e6:.1f} | "
            f"{r['perplexity']:.3f} | {r['delta_percent']:+.1f}% | "
            f"{'-' if speed is None else f'{speed:.1f}'} |"
        )
    return "\n".join(lines)


def _check_plot_path(path: str) -> None:
    """Raises ValueError if matplotlib could not write ``path`` (checked before the slow part)."""
    import matplotlib.figure

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path!r}: no such directory {folder!r}")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    supported = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if ext and ext not in supported:
        raise ValueError(
            f"--plot {path!r}: unknown image type {ext!r}; use one of "
            f"{', '.join(sorted(supported))}"
        )


def _plot(rows: list[dict], path: str, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["weight_bytes"] / 1e6, r["perplexity"])
        ax.annotate(r["recipe"], (r["weight_bytes"] / 1e6, r["perplexity"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    ax.set_xlabel("weight storage (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jquant`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {
        "recipes": _cmd_recipes,
        "inspect": _cmd_inspect,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "quantize": _cmd_quantize,
        "compare": _cmd_compare,
        "allocate": _cmd_allocate,
        "serve": _cmd_serve,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, OSError) as e:  # bad input, missing files, failed downloads
        message = " ".join(str(e).split())  # one line, whatever the message's layout
        print(f"jquant {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
