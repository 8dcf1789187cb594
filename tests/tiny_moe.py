"""A tiny random mixture-of-experts model for the MoE tests (loaded with `runpy`: a test
directory without __init__.py cannot import it)."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.models import LlamaConfig, init_model


def random_moe(hf_config: dict, *, dead: bool = False):
    """(model, float params) of ``hf_config``: weights N(0, 0.1), norms 1 + N(0, 0.2),
    routers N(0, 2). With ``dead``, experts 2 and 3 copy expert 0's router row: top-k keeps
    the lower index among ties, so expert 3 never receives a token (with k = 2)."""
    model = init_model(LlamaConfig.from_hf(hf_config), seed=0)
    params = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(1)
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        if path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "weight":  # a router
            value = 2.0 * rng.standard_normal(shape)
            if dead:
                value[2:] = value[0]
        else:
            value = 0.1 * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    return model, params
