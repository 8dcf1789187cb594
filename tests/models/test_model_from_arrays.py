"""`model_from_arrays`: a parameter tree of arrays and QArrays becomes a model as it is."""

import numpy as np
import pytest

from jquant.models import forward, model_from_arrays, params_from_hf
from jquant.models.config import LlamaConfig
from jquant.qarray import QArray, quantize_array
from jquant.tree import leaves


def _arrays(tiny):
    config = tiny.config()
    _, params = params_from_hf(tiny.tensors(), LlamaConfig.from_hf(config))
    return config, dict(leaves(params))


def test_qarrays_kept_and_run(tiny):
    config, arrays = _arrays(tiny)
    path = "layers/0/mlp/up_proj/kernel"
    q = quantize_array(arrays[path], "int8")
    model, params = model_from_arrays({**arrays, path: q}, config)
    assert isinstance(dict(leaves(params))[path], QArray)
    float_model, float_params = model_from_arrays(arrays, config)
    tokens = np.array([[1, 5, 9]])
    got = np.asarray(forward(model, params, tokens)[0])
    want = np.asarray(forward(float_model, float_params, tokens)[0])
    # int8 per channel on one kernel: close to the float model, and not equal to it.
    assert 0 < np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_missing_extra_and_misshapen_are_named(tiny):
    config, arrays = _arrays(tiny)
    path = "layers/1/self_attn/o_proj/kernel"
    with pytest.raises(ValueError, match=rf"missing \['{path}'\]"):
        model_from_arrays({p: a for p, a in arrays.items() if p != path}, config)
    with pytest.raises(ValueError, match=r"not in the model \['layers/9/x'\]"):
        model_from_arrays({**arrays, "layers/9/x": arrays[path]}, config)
    with pytest.raises(ValueError, match=rf"parameter {path} has shape \(\d+, \d+\), the model"):
        model_from_arrays({**arrays, path: arrays[path].T[:, :3]}, config)


def test_params_from_hf_keeps_qarrays(tiny):
    config = LlamaConfig.from_hf(tiny.config())
    tensors = tiny.tensors()
    name = "model.layers.0.mlp.down_proj.weight"
    q = quantize_array(tensors[name].T, "int4", group_size=32)  # (in, out) logical
    _, params = params_from_hf({**tensors, name: q}, config)
    got = dict(leaves(params))["layers/0/mlp/down_proj/kernel"]
    assert isinstance(got, QArray) and got.qtype == "int4"
    np.testing.assert_array_equal(np.asarray(got.qvalue), np.asarray(q.qvalue))
    np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(q.scale))
    with pytest.raises(ValueError, match=rf"quantized tensor '{name}' has logical shape"):
        params_from_hf({**tensors, name: quantize_array(tensors[name], "int8")}, config)
