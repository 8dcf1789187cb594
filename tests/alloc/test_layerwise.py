"""Sensitivity measured one layer at a time: the order in which the layers are read and
priced (what bounds the memory), and the streamed table against the one of the model held in
memory.

References: the event order a layer-outer sweep must follow (forward reads 0..L-1, then per
layer from the top: read, statistics handed over, weights released); the table of the model
loaded whole by `jquant.models.load` (whose statistics and prices are checked against
``jax.grad`` and NumPy in test_sensitivity.py) for the one read from the GGUF file a layer
at a time.
"""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
from flax import nnx

from jquant import alloc, models
from jquant.alloc import pricing as P
from jquant.alloc import sensitivity as S
from jquant.calib.driver import ModelSource
from jquant.models import LlamaConfig, init_model

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
            num_kv_heads=2, max_position_embeddings=128, tie_word_embeddings=False)  # fmt: skip
TOKENS = np.random.default_rng(0).integers(0, 101, (3, 12)).astype(np.int32)
KERNELS = (P.candidate("u4", weight="uint4", group_size=32, algorithm="gptq"),
           P.candidate("i8", weight="int8"))  # fmt: skip
TABLE = (P.candidate("i8", weight="int8"), P.candidate("bf16", skip=True, dtype="bfloat16"))


class _Spy:
    """A `ModelSource` that logs each layer read and counts the layer States still alive."""

    def __init__(self, model, params, events):
        self._inner, self.events, self.alive = ModelSource(model, params), events, set()
        self.config, self.model = self._inner.config, self._inner.model
        self.most_alive = 0

    def layer(self, i):
        gc.collect()
        self.most_alive = max(self.most_alive, len(self.alive) + 1)
        state = self._inner.layer(i)
        self.events.append(("read", i))
        self.alive.add(id(state))
        weakref.finalize(state, self.alive.discard, id(state))
        return state

    def part(self, name):
        return self._inner.part(name)


def test_each_layer_is_priced_before_the_next_is_read():
    """Forward: layers 0..L-1 read once each. Backward: from the top, each layer read, its
    kernels' statistics handed to ``on_layer`` before the layer below is read, and never
    more than one layer's weights alive; the untied head last; every kernel handed over."""
    model = init_model(LlamaConfig(**TINY), seed=3)
    params = nnx.state(model)
    events: list = []
    spy = _Spy(model, params, events)
    handed = {}

    def on_layer(prefix, state, stats):
        events.append(("stats", prefix))
        handed.update({prefix + p: ks for p, ks in stats.items()})

    S.sweep(spy, TOKENS, on_layer=on_layer, batch_size=2, progress=False)
    layers = TINY["num_layers"]
    want = [("read", i) for i in range(layers)]
    for i in reversed(range(layers)):
        want += [("read", i), ("stats", f"layers/{i}/")]
    assert events == [*want, ("stats", "lm_head/")]
    assert spy.most_alive == 1
    kernels = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")  # fmt: skip
    assert sorted(handed) == sorted([f"layers/{i}/{k}/kernel" for i in range(layers)
                                     for k in kernels] + ["lm_head/kernel"])  # fmt: skip


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streamed_table_equals_the_model_in_memory(tiny, tmp_path, monkeypatch, tied):
    """`measure_source` on the GGUF read one layer at a time (activations spilled to files,
    removed afterwards) prices every tensor as `measure` does on the model loaded whole."""
    import jax.numpy as jnp

    from jquant.calib.stream import StreamSource
    from jquant.io import load_checkpoint
    from jquant.models.load import default_dtype

    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    tiny.write_gguf(path, tiny.tensors(tied=tied))
    model, params, _ = models.load(str(path))
    tokens = TOKENS % model.config.vocab_size
    want = alloc.measure(model, params, tokens, cache=False,
                         kernel_candidates=KERNELS, table_candidates=TABLE,
                         progress=False)  # fmt: skip
    source = StreamSource(load_checkpoint(str(path), lazy=True), dtype=default_dtype(),
                          param_dtype=jnp.float32)  # fmt: skip
    spill = tmp_path / "spill"
    spill.mkdir()
    got = alloc.measure_source(source, tokens, cache=False,
                               kernel_candidates=KERNELS, table_candidates=TABLE,
                               spill_dir=spill, progress=False)  # fmt: skip
    assert os.listdir(spill) == []
    assert list(got.options) == list(want.options)
    assert ("lm_head/kernel" in got.options) and got.tied == tied
    for p, opts in want.options.items():
        for name, o in opts.items():
            assert got.options[p][name].nbytes == o.nbytes, (p, name)
            assert got.options[p][name].cost == pytest.approx(o.cost, rel=1e-5, abs=1e-12), (
                p, name)
    assert (got.fixed_bytes, got.elements, got.tokens) == (want.fixed_bytes, want.elements,
                                                           want.tokens)  # fmt: skip
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
