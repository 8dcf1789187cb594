"""Calibration inputs: token windows, input statistics, and taps through jquant.ops and
the Flax interceptors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant import ops
from jquant.calib import Tap, stats, tapping
from jquant.calib import data as calib_data
from jquant.intercept import apply as linen_apply
from jquant.intercept import nnx_apply


def test_windows_are_disjoint_when_the_text_holds_them():
    out = calib_data.windows(np.arange(100), 4, 25)
    np.testing.assert_array_equal(out.ravel(), np.arange(100))


def test_windows_overlap_evenly_when_the_text_is_shorter():
    out = calib_data.windows(np.arange(70), 4, 25)  # 4 x 25 = 100 > 70
    starts = out[:, 0]
    assert starts[0] == 0 and out[-1, -1] == 69  # the whole text is covered
    assert np.all(np.diff(starts) >= 25 // 2)  # at most half a window overlaps
    np.testing.assert_array_equal(out, starts[:, None] + np.arange(25))


def test_too_short_a_text_is_one_clear_error():
    with pytest.raises(ValueError, match=r"has 40 tokens: too short for 4 calibration samples"):
        calib_data.windows(np.arange(40), 4, 25)
    with pytest.raises(ValueError, match="at most 2 samples"):
        calib_data.windows(np.arange(40), 4, 25)


@pytest.mark.parametrize("add_bos", [True, False])
def test_calibration_windows_start_with_bos_iff_the_tokenizer_says(add_bos):
    class Tokenizer:
        add_bos_token, bos_token_id = add_bos, 99

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return list(range(len(text)))

    out = calib_data.calibration_tokens(Tokenizer(), text="x" * 100, samples=4, seq_len=26)
    if add_bos:
        np.testing.assert_array_equal(out[:, 0], 99)
        np.testing.assert_array_equal(out[:, 1:], calib_data.windows(np.arange(100), 4, 25))
    else:
        np.testing.assert_array_equal(out, calib_data.windows(np.arange(100), 4, 26))
    assert out.shape == (4, 26) and out.dtype == np.int32


def test_bos_windows_count_text_tokens():
    out = calib_data.windows(np.arange(6), 2, 4, bos_token_id=99)
    np.testing.assert_array_equal(out, [[99, 0, 1, 2], [99, 3, 4, 5]])
    with pytest.raises(ValueError, match=r"of 26 tokens \(BOS \+ 25 of text\)"):
        calib_data.windows(np.arange(40), 4, 26, bos_token_id=99)


def test_statistics_match_numpy():
    x = np.random.RandomState(0).randn(3, 7, 5).astype(np.float32)
    c = stats.from_inputs(x)
    rows = x.reshape(-1, 5).astype(np.float64)
    np.testing.assert_allclose(c.hessian, rows.T @ rows / 21, rtol=1e-5)
    np.testing.assert_allclose(c.mean_abs, np.abs(rows).mean(0), rtol=1e-5)
    np.testing.assert_allclose(c.max_abs, np.abs(rows).max(0), rtol=1e-6)
    merged = stats.merge(stats.from_inputs(x[:1]), stats.from_inputs(x[1:]))
    np.testing.assert_allclose(merged.hessian, c.hessian, rtol=1e-5)
    np.testing.assert_allclose(merged.mean_abs, c.mean_abs, rtol=1e-5)
    s = np.array([1.0, 2.0, 0.5, 4.0, 3.0], np.float32)
    np.testing.assert_allclose(c.scaled(s).hessian, stats.from_inputs(x / s).hessian, rtol=1e-5)


def _recorder(seen):
    def handler(x, tap):
        seen[tap.path] = np.asarray(x)
        return tap.value * 2  # a visible substitution

    return handler


def test_a_tap_reaches_the_handler_through_qdot_and_qeinsum():
    x = jnp.asarray(np.random.RandomState(1).randn(2, 3, 4), jnp.float32)
    w = jnp.asarray(np.random.RandomState(2).randn(4, 5), jnp.float32)
    seen = {}
    with tapping(_recorder(seen)):
        y = ops.qdot(x, Tap(w, "a"))
        z = ops.qeinsum("bsk,kn->bsn", x, Tap(w, "b"))
    np.testing.assert_allclose(y, np.asarray(x) @ (2 * np.asarray(w)), rtol=1e-5)
    np.testing.assert_allclose(z, y, rtol=1e-5)
    np.testing.assert_array_equal(seen["a"], x)
    np.testing.assert_array_equal(seen["b"], x)


def test_a_tap_outside_a_calibration_pass_is_an_error():
    with pytest.raises(ValueError, match="outside jquant.calib.tapping"):
        ops.qdot(jnp.ones((1, 2)), Tap(jnp.ones((2, 2)), "w"))


def test_a_tap_on_a_matmul_that_does_not_contract_its_first_axis_is_an_error():
    with tapping(lambda x, t: t.value), pytest.raises(ValueError, match="first axis alone"):
        ops.qdot_general(jnp.ones((2, 3)), Tap(jnp.ones((4, 3)), "w"), (((1,), (1,)), ((), ())))


def test_taps_reach_stock_linen_and_nnx_layers():
    x = jnp.asarray(np.random.RandomState(3).randn(2, 4), jnp.float32)
    module = nn.Dense(3)
    variables = module.init(jax.random.key(0), x)
    kernel = variables["params"]["kernel"]
    tapped = {"params": {"kernel": Tap(kernel, "linen"), "bias": variables["params"]["bias"]}}
    seen = {}
    with tapping(_recorder(seen)):
        y = linen_apply(module, tapped, x)
    np.testing.assert_allclose(y, np.asarray(x) @ (2 * np.asarray(kernel)), rtol=1e-5)
    np.testing.assert_array_equal(seen["linen"], x)

    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    w = layer.kernel.get_value()
    layer.kernel.set_value(Tap(w, "nnx"))
    with tapping(_recorder(seen)):
        y = nnx_apply(layer, x)
    np.testing.assert_allclose(y, np.asarray(x) @ (2 * np.asarray(w)), rtol=1e-5)
    np.testing.assert_array_equal(seen["nnx"], x)
