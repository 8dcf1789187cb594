"""``jquant generate MODEL [--recipe R] --prompt TEXT``: generate text and report tokens/s."""

from __future__ import annotations

import json
import sys

from jquant.cli import _args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text and report tokens/s")
    _args.add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (chat template applied if any)")
    p.add_argument("--max-new-tokens", type=_args.int_at_least(1), default=64)
    p.add_argument("--temperature", type=_args.float_in(0.0), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_args.int_at_least(0), default=0, help="0 = off")
    p.add_argument("--top-p", type=_args.float_in(0.0, 1.0, open_low=True), default=1.0,
                   help="in (0, 1]; 1 = off")  # fmt: skip
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from jquant import models
    from jquant.calib import quantize_loaded

    recipe = _args.recipe(args.recipe)
    model, params, tokenizer, _ = _args.load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; generate needs one")
    model, params = quantize_loaded(model, params, recipe)
    ids = models.prompt_ids(tokenizer, args.prompt, raw=args.raw)
    out = models.generate(
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
