"""The model, prompts and windows `test_lockstep.py` serves in one process and over two."""

import threading

import jax
import numpy as np
from flax import nnx

import jquant
from jquant.models import LlamaConfig, init_model
from jquant.serve.engine import Engine, SamplingParams

# 8 query heads, 4 kv heads (the cache splits over 2 processes); down_proj's K=256 is two
# int4 groups of 128, split one per process (o_proj's K=128, one group, is not split).
CFG = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                  num_heads=8, num_kv_heads=4, head_dim=16, max_position_embeddings=96,
                  tie_word_embeddings=True)  # fmt: skip
RECIPES = ("w4a16-rtn-g128",)  # float is tests/serve/test_engine_tp.py's too
_rng = np.random.default_rng(0)
PROMPTS = [_rng.integers(0, 256, n).tolist() for n in (5, 23, 40)]
WINDOWS = _rng.integers(0, 256, (2, 48))


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i % 64) for i in ids)


def build(recipe: str, mesh=None) -> Engine:
    model = init_model(CFG, seed=0)
    state = jax.tree.map(lambda x: x * 8, nnx.state(model, nnx.Param))  # varied greedy tokens
    params = state if recipe == "float" else jquant.quantize(state, recipe)
    return Engine(model, params, Letters(), max_slots=4, max_context=64, prefill_chunk=16,
                  mesh=mesh)  # fmt: skip


def serve(engine: Engine) -> list[list[int]]:
    """The prompts served at once, greedily, 12 tokens each."""
    outs = [None] * len(PROMPTS)
    engine.start()
    try:
        def go(i):
            outs[i] = engine.generate(PROMPTS[i], SamplingParams(
                max_tokens=12, temperature=0, ignore_eos=True)).token_ids  # fmt: skip

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(PROMPTS))]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        engine.close()
    return outs
