"""Serving: a continuous-batching engine over a slot KV cache (optionally int8 / fp8), an
OpenAI-compatible HTTP server (`jquant serve`), and tensor parallelism (with expert parallelism
for MoE models) over a device mesh.

>>> from jquant.serve import Engine, SamplingParams  # doctest: +SKIP
>>> with Engine(model, params, tokenizer, kv_cache="int8") as engine:  # doctest: +SKIP
...     print(engine.generate(ids, SamplingParams(max_tokens=32, temperature=0)).text)
"""

from jquant.models.cache import kv_format as kv_format
from jquant.serve.engine import Engine as Engine
from jquant.serve.engine import Output as Output
from jquant.serve.engine import QueueFull as QueueFull
from jquant.serve.engine import SamplingParams as SamplingParams
from jquant.serve.engine import engine_report as engine_report
from jquant.serve.runner import Runner as Runner
from jquant.serve.runner import cache_perplexity as cache_perplexity
from jquant.serve.speculative import Ngram as Ngram
