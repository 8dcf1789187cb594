"""What ``jquant eval`` and ``jquant compare`` measure of one model: weight bytes and bits,
perplexity (optionally through the serving KV cache), and greedy decode speed.

>>> weight_stats(qparams)  # (bytes, bits/weight, bits/weight of the quantized tensors)
...  # doctest: +SKIP
>>> evaluate(model, qparams, tok, load_corpus("pydoc-eval"))["perplexity"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

#: The prompt `decode_speed` decodes from.
DECODE_PROMPT = "Explain what a Python decorator is."


def weight_stats(params) -> tuple[int, float, float | None]:
    """``(weight bytes, bits/weight over all weights, bits/weight of the quantized ones)``;
    the last is None when no tensor is quantized. QArrays count at their true storage
    (scales and zero points included), float leaves at their stored dtype.

    >>> import numpy as np
    >>> weight_stats({"w": np.zeros((4, 4), np.float32)})
    (64, 32.0, None)
    """
    from jquant.memory import memory_report
    from jquant.qtypes import QTYPES

    r = memory_report(params)
    quantized = [u for name, u in r.by_format.items() if name in QTYPES]
    elements = sum(u.elements for u in quantized)
    q_bits = 8.0 * sum(u.nbytes for u in quantized) / elements if elements else None
    return r.weight_bytes, r.bits_per_weight, q_bits


def evaluate(
    model, params, tokenizer, text: str, *, seq_len: int = 512, max_tokens: int | None = 16384,
    batch_size: int = 4, kv_cache: str | None = None, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Perplexity of ``text`` and the weights' size, as one dict (``jquant eval --json``).

    Args:
      kv_cache: None for `jquant.eval.perplexity`; ``"none"``, ``"int8"`` or ``"fp8"`` to run
        every window through the serving KV cache in that format
        (`jquant.serve.cache_perplexity`; "none" keeps the compute dtype).

    Returns:
      ``{"perplexity", "weight_bytes", "bits_per_weight", "quantized_bits_per_weight",
      "tokens"}`` (see `weight_stats`), plus ``"kv_cache"`` when one was used.
    """
    from jquant.eval.perplexity import perplexity

    kw = dict(tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens,
              batch_size=batch_size, progress=progress)  # fmt: skip
    if kv_cache is None:
        result = perplexity(model, params, text, **kw)
    else:
        from jquant.serve.runner import cache_perplexity

        result = cache_perplexity(model, params, text, kv_cache=kv_cache, **kw)
    weight_bytes, bits, q_bits = weight_stats(params)
    out = {"perplexity": result.perplexity, "weight_bytes": weight_bytes,
           "bits_per_weight": bits, "quantized_bits_per_weight": q_bits,
           "tokens": result.tokens}  # fmt: skip
    if kv_cache is not None:
        out["kv_cache"] = kv_cache
    return out


def decode_speed(model, params, tokenizer, new_tokens: int, *, prompt: str = DECODE_PROMPT):
    """Greedy decode tokens/s at batch 1 (compilation excluded) for ``new_tokens`` tokens
    after ``prompt`` (chat template applied if any); stop tokens are ignored, so every run
    decodes the same number of tokens."""
    from jquant.models import generate, prompt_ids

    ids = prompt_ids(tokenizer, prompt)
    out = generate(model, params, [ids], max_new_tokens=new_tokens, stop_tokens=())
    return out.decode_tokens_per_second
