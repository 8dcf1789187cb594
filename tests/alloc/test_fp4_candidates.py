"""FP4 formats as allocation candidates: named by a request, priced, and chosen under a budget
that only they meet, each priced at the bytes its QArray really takes."""

import numpy as np
from flax import nnx

from jquant import tree
from jquant.alloc import FP4_CANDIDATES, KERNEL_CANDIDATES, allocate, measure
from jquant.alloc.pricing import candidate
from jquant.alloc.request import select_candidates
from jquant.models import LlamaConfig, init_model
from jquant.models.convert import EMBED_PATH

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
            num_kv_heads=2, max_position_embeddings=64)  # fmt: skip


def test_fp4_are_named_not_default():
    assert [c.name for c in select_candidates("nvfp4,int8,mxfp4")] == ["nvfp4", "int8", "mxfp4"]
    assert select_candidates(None) == KERNEL_CANDIDATES
    assert {c.rule().weight: c.rule().group_size for c in FP4_CANDIDATES} == {
        "mxfp4": 32, "nvfp4": 16}


def test_allocation_prices_and_chooses_fp4():
    """Between mxfp4 (4.25 bits a weight), nvfp4 (4.5) and int8, a budget just above the
    smallest model leaves the kernels FP4: each priced at its QArray's bytes, and chosen."""
    model = init_model(LlamaConfig(**TINY, tie_word_embeddings=True), seed=3)
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 12), dtype=np.int32)
    int8 = select_candidates("int8")
    table = measure(model, nnx.state(model), tokens, kernel_candidates=(*FP4_CANDIDATES, *int8),
                    table_candidates=(candidate("int8", weight="int8"),), cache=False,
                    progress=False)  # fmt: skip
    shapes = {p: v.shape for p, v in tree.leaves(nnx.state(model))}
    kernels = [p for p, options in table.options.items() if "mxfp4" in options]
    assert len(kernels) == 7  # the decoder's; the tied head is the table's
    for path in kernels:
        k, n = shapes[path]
        # E2M1 codes at 4 bits; an E8M0 byte per 32, or an E4M3 byte per 16 and a float32.
        assert table.options[path]["mxfp4"].nbytes == k * n // 2 + n * k // 32
        assert table.options[path]["nvfp4"].nbytes == k * n // 2 + n * k // 16 + 4
    # The smallest model (mxfp4 kernels) and 500 bytes: too few for any kernel in int8
    # (over 1 KB more than FP4 for the smallest), enough for some nvfp4 (68 bytes more there).
    # (The tied table counts once: the gather and the head share it.)
    smallest = table.fixed_bytes + table.options[EMBED_PATH]["int8"].nbytes + sum(
        table.options[p]["mxfp4"].nbytes for p in kernels)  # fmt: skip
    budget = smallest + 500
    got = allocate(table, budget)
    chosen = {got.choice[p] for p in kernels}
    assert chosen <= {"mxfp4", "nvfp4"}, got.choice
    assert got.weight_bytes <= budget
