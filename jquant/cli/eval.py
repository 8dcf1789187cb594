"""``jquant eval`` (perplexity, weight bytes and bits per weight of one model) and
``jquant compare`` (one table: recipes against float on quality, size and speed)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jquant.cli import _args
from jquant.models.cache import KV_CACHE_FORMATS

DEFAULT_RECIPES = ("w8a16,fp8,w4a16-rtn-g128,w4a16-uint4-g64,nf4,w4a16-hqq-g64,"
                   "w4a16-awq-gptq-uint4-g64")  # fmt: skip


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, weight bytes and bits per weight")
    _args.add_model_args(p)
    _args.add_eval_args(p)
    p.add_argument("--kv-cache", choices=KV_CACHE_FORMATS,
                   help="run every window through the serving KV cache in this format "
                        "(none: the compute dtype); default: no cache")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="one table: recipes vs float on quality, size, speed")
    _args.add_model_args(p, recipe=False)
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help="comma-separated recipe names or paths (float is always included)")
    _args.add_eval_args(p)
    _args.add_calib_args(p)
    p.add_argument("--decode-tokens", type=_args.int_at_least(0), default=32,
                   help="new tokens for tokens/s (0 = skip decoding)")  # fmt: skip
    p.add_argument("--plot", help="write perplexity vs weight size to this PNG")
    p.add_argument("--json", action="store_true", help="print JSON")


def _label(args) -> str:
    """What ``args.model`` holds: packed (jquant's), another library's quantization method,
    a GGUF kept packed, or float."""
    from jquant.io.packed import is_packed

    model = args.model
    if os.path.isdir(model) and is_packed(model):
        return "packed"
    config = Path(model) / "config.json"
    if config.is_file():  # another library's quantized checkpoint (it has loaded: known)
        from jquant.io.hf import quant_method

        method = quant_method(Path(model), json.loads(config.read_text()))
        if method is not None:
            return method
    return "gguf packed" if getattr(args, "keep_packed", False) else "float"


def run_eval(args) -> int:
    from jquant.calib import quantize_loaded
    from jquant.eval import evaluate

    recipe, text = _args.recipe(args.recipe), _args.text(args)
    model, params, tokenizer, _ = _args.load(args)
    model, params = quantize_loaded(model, params, recipe)
    out = evaluate(model, params, tokenizer, text, seq_len=args.seq_len,
                   max_tokens=args.max_tokens, batch_size=args.batch_size,
                   kv_cache=args.kv_cache, progress=not args.json)  # fmt: skip
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.model} [{args.recipe or _label(args)}]: perplexity "
            f"{out['perplexity']:.3f} over "
            f"{out['tokens']} tokens (seq_len {args.seq_len}"
            f"{', KV cache ' + args.kv_cache if args.kv_cache else ''}); weights "
            f"{out['weight_bytes'] / 1e6:.2f} MB, {out['bits_per_weight']:.3f} bits/weight"
        )
    return 0


def run_compare(args) -> int:
    from jquant import eval as ev

    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not names:
        raise ValueError(f"--recipes {args.recipes!r} names no recipe")
    recipes = ev.compare_recipes(names)  # fail on a bad name before the slow part
    if args.plot:
        with _args.flag("--plot"):
            ev.check_plot_path(args.plot)
    text = _args.text(args)
    _args.check_calib(args)
    model, params, tokenizer, _ = _args.load(args)

    def say(message: str) -> None:
        if not args.json:
            print(message, file=sys.stderr, flush=True)

    rows = ev.compare(
        model, params, tokenizer, recipes, text, seq_len=args.seq_len,
        max_tokens=args.max_tokens, batch_size=args.batch_size,
        decode_tokens=args.decode_tokens, calib=args.calib, calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, progress=not args.json, log=say,
    )  # fmt: skip
    if args.plot:
        ev.plot(rows, args.plot, title=f"{args.model}: perplexity vs weight size")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(ev.format_table(rows, source=args.text or args.corpus, seq_len=args.seq_len,
                              decode_tokens=args.decode_tokens))  # fmt: skip
    return 0
