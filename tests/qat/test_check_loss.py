"""`jquant.qat.check_loss`: a training loop's NaN or infinite loss is an error naming the step."""

import math

import jax.numpy as jnp
import pytest

from jquant import qat


def test_a_finite_loss_comes_back_as_a_float():
    assert qat.check_loss(jnp.float32(0.25), step=3) == 0.25


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_an_error_naming_the_step(value):
    with pytest.raises(ValueError, match=rf"loss is {value} at step 7: training diverged"):
        qat.check_loss(jnp.float32(value), step=7)
