"""The shipped calibrated recipes, end to end on a tiny random Llama: formats as named, and
each layer's output error below round-to-nearest's at the same format."""

import numpy as np
import pytest
from flax import nnx

from jquant.calib import quantize_model
from jquant.models import LlamaConfig, init_model
from jquant.qarray import QArray
from jquant.recipe import Recipe

CONFIG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                     num_heads=4, num_kv_heads=2)  # fmt: skip

# recipe → (qtype, group size, activation, the RTN recipe it must beat or None)
EXPECT = {
    "w4a16-gptq-g128": ("int4", 128, None, "w4a16-rtn-g128"),
    "w4a16-gptq-g64": ("int4", 64, None, "w4a16-rtn-g64"),
    "w4a16-awq-g128": ("int4", 128, None, "w4a16-rtn-g128"),
    "w4a16-gptq-uint4-g64": ("uint4", 64, None, "w4a16-uint4-g64"),
    "w4a16-awq-gptq-uint4-g64": ("uint4", 64, None, "w4a16-uint4-g64"),
    "w4a16-awq-gptq-uint4-g64-emb8": ("uint4", 64, None, None),
    "w3a16-gptq-g64": ("uint3", 64, None, None),
    "w8a8-smoothquant": ("int8", None, "int8", None),
}


@pytest.fixture(scope="module")
def tiny():
    model = init_model(CONFIG, seed=0)
    rng = np.random.RandomState(0)
    # Correlated token statistics (a few frequent tokens), as real text has.
    tokens = rng.choice(64, size=(4, 32), p=np.arange(64, 0, -1) / np.arange(64, 0, -1).sum())
    return model, nnx.state(model, nnx.Param), tokens


@pytest.mark.parametrize("name", sorted(EXPECT))
def test_calibrated_recipe_runs_with_its_formats(tiny, name):
    model, params, tokens = tiny
    norm = np.array(params["layers"][0]["input_layernorm"]["scale"].get_value())
    qparams, report = quantize_model(model, params, name, tokens, progress=False)
    # Folding rewrites the quantized copy's norms, never the caller's float params.
    np.testing.assert_array_equal(params["layers"][0]["input_layernorm"]["scale"].get_value(),
                                  norm)  # fmt: skip
    if "awq" in name or "smoothquant" in name:  # scales were folded into some norm
        norms = [(i, n) for i in range(CONFIG.num_layers)
                 for n in ("input_layernorm", "post_attention_layernorm")]  # fmt: skip
        assert any(
            not np.allclose(qparams["layers"][i][n]["scale"].get_value(),
                            params["layers"][i][n]["scale"].get_value())
            for i, n in norms
        )  # fmt: skip
    qtype, group, act, baseline = EXPECT[name]
    rows = [r for r in report.rows if r.path.startswith("layers/")]
    head = [r for r in report.rows if r.path == "lm_head/kernel"]
    assert len(rows) == 7 * CONFIG.num_layers
    # An untied head is quantized (INT8) on the final norm's outputs: every recipe names it.
    assert [r.qtype for r in head] == ["int8"]
    layer = qparams["layers"][1]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w = layer["mlp"][proj]["kernel"].get_value()
        assert isinstance(w, QArray)
        assert (w.qtype, w.group_size, w.activation) == (qtype, group, act)
    table = qparams["embed_tokens"]["embedding"].get_value()
    assert (table.qtype, table.axis, table.group_size) == ("int8", -1, None)  # one scale a row
    assert all(r.algorithm == Recipe.load(name).rules[-1].algorithm for r in rows)
    if baseline is not None:
        _, rtn = quantize_model(model, params, baseline, tokens, progress=False)
        ours = np.mean([r.output_error for r in rows])
        theirs = np.mean([r.output_error for r in rtn.rows])
        assert ours < 0.8 * theirs, (ours, theirs)
