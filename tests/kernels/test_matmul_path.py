"""The matmul path is read while tracing: a jitted function keeps the path it was traced
under until it is traced again (the rule set_matmul_path's docstring states)."""

import jax
import jax.numpy as jnp
import pytest

from jquant import ops
from jquant.qarray import quantize_array


@pytest.fixture
def restore_path():
    old = ops.set_matmul_path(None)
    yield
    ops.set_matmul_path(old)


def test_a_jitted_function_keeps_the_path_it_was_traced_under(restore_path):
    # Double-quantized scales have no fused kernel, so path "kernel" raises for them while
    # tracing: whether a call raises shows which path its compiled code was traced under.
    w = quantize_array(jax.random.normal(jax.random.key(0), (256, 64)), "nf4", axis=0,
                       group_size=64, double_quant=True)  # fmt: skip
    x = jnp.ones((4, 256))

    def f(x, w):
        return ops.qdot(x, w)

    ops.set_matmul_path("xla")
    traced_under_xla = jax.jit(f)
    y = traced_under_xla(x, w)

    ops.set_matmul_path("kernel")
    # Same function, same shapes: the cached XLA program runs; the new path is not applied.
    assert jnp.array_equal(traced_under_xla(x, w), y)
    # jax.jit(f) again does not re-trace: JAX caches traces by the Python function f.
    assert jnp.array_equal(jax.jit(f)(x, w), y)
    # A jit of a new function traces now, under "kernel".
    with pytest.raises(ValueError, match="matmul path is 'kernel'"):
        jax.jit(lambda x, w: ops.qdot(x, w))(x, w)
    # So does the old one on a new input shape (a re-trace).
    with pytest.raises(ValueError, match="matmul path is 'kernel'"):
        traced_under_xla(jnp.ones((5, 256)), w)
    # jax.clear_caches() makes every function re-trace at its next call.
    jax.clear_caches()
    with pytest.raises(ValueError, match="matmul path is 'kernel'"):
        traced_under_xla(x, w)
    # Without jit, every call traces: the path in effect applies.
    with pytest.raises(ValueError, match="matmul path is 'kernel'"):
        f(x, w)
