"""SmolLM2 perplexity against the reference numbers of docs/evaluation.md (pydoc-eval, 16,384
tokens, seq_len 512).

The references were computed with Hugging Face transformers in float32 and, for the
round-to-nearest rows, with every decoder projection quantized with float32 scales along
K (short last group) and the embeddings / tied head kept float. The same math must give
the same numbers, so these pin the whole stack: GGUF import, tokenizer, model, packing,
quantization and perplexity. docs/evaluation.md states the definition, the text and how the
references were obtained.
"""

import pytest

from jquant.eval import load_corpus, perplexity
from jquant.models import load
from jquant.recipe import Recipe
from jquant.transform import quantize

pytestmark = pytest.mark.slow


def _recipe(weight: str, group_size: int | None) -> Recipe:
    return Recipe.from_dict({
        "name": f"reference-{weight}-{group_size}",
        "rules": [
            {"pattern": "(?i)embed", "skip": True},
            {"pattern": "_proj/kernel$", "weight": weight, "group_size": group_size,
             "scale_dtype": "float32"},
        ],
    })  # fmt: skip


@pytest.fixture(scope="module")
def smollm2():
    model, params, tokenizer = load("smollm2-135m")
    ids = tokenizer.encode(load_corpus("pydoc-eval"), add_special_tokens=False)[:16384]
    return model, params, ids


# (format, group size, reference from docs/evaluation.md, tolerance). Measured here: float 13.4127,
# int8 within 0.01, int4 g128 22.484 and uint4 g64 17.490: 0.08% below the references, a
# gap whose cause is not established (int4 g64: 19.533 vs 19.542; nf4 g64: 17.155 vs 17.156).
CASES = [
    (None, None, 13.413, 0.002),
    ("int8", None, 13.443, 0.01),
    ("int4", 128, 22.502, 0.03),
    ("uint4", 64, 17.503, 0.03),
]


@pytest.mark.parametrize("weight,group_size,expected,tolerance", CASES)
def test_perplexity_matches_reference(smollm2, weight, group_size, expected, tolerance):
    model, params, ids = smollm2
    if weight is not None:
        params = quantize(params, _recipe(weight, group_size))
    result = perplexity(model, params, ids, seq_len=512, batch_size=8, progress=False)
    assert result.windows == 32
    assert result.perplexity == pytest.approx(expected, abs=tolerance)
