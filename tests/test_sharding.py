"""Sharding QArrays: storage specs from logical specs; an 8-device mesh in a subprocess."""

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jquant.qarray import quantize_array
from jquant.sharding import storage_partition_spec


def _w(shape, qtype="int4", **kw):
    return quantize_array(jnp.ones(shape, jnp.float32), qtype, **kw)


def test_output_axis_spec_moves_onto_rows_of_values_and_scales():
    s = storage_partition_spec(_w((64, 32), "uint4", group_size=32), P(None, "model"))
    assert (s.qvalue, s.scale, s.zero_point) == (P("model", None),) * 3
    assert s.qtype == "uint4" and s.group_size == 32


def test_three_dim_kernel_and_short_spec():
    w = _w((4, 64, 16), group_size=32, axis=1)  # (heads, K, N), stored (heads, N, Kbytes)
    s = storage_partition_spec(w, P("model"))
    assert s.qvalue == P("model", None, None) and s.scale == P("model", None, None)


def test_contraction_axis_sharding():
    s = storage_partition_spec(_w((64, 32), "int8"), P("data", "model"))
    assert s.qvalue == P("model", "data") and s.scale == P("model", None)
    for w in (_w((64, 32), "int4"), _w((64, 32), "int8", group_size=32)):
        with pytest.raises(ValueError, match="contraction axis"):
            storage_partition_spec(w, P("data", None))


def test_per_tensor_and_double_quant_scales_are_replicated():
    s = storage_partition_spec(_w((64, 32), "int8", per_tensor=True), P(None, "model"))
    assert s.qvalue == P("model", None) and s.scale == P(None, None)
    dq = quantize_array(jnp.ones((64, 512)), "nf4", group_size=32, double_quant=True)
    s = storage_partition_spec(dq, P(None, "model"))
    assert s.qvalue == P("model", None) and s.scale.qvalue == P() and s.scale.scale == P()


def test_spec_longer_than_rank():
    with pytest.raises(ValueError, match="entries"):
        storage_partition_spec(_w((64, 32)), P(None, "model", None))


_MULTI_DEVICE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jquant import ops
    from jquant.qarray import quantize_array
    from jquant.sharding import shard_params

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((128, 1024)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 128)), jnp.float32)
    params = {
        "grouped": quantize_array(w, "uint4", group_size=32),
        "channel": quantize_array(w, "int8", activation="int8"),
        "k_split": quantize_array(w, "int8"),
        "replicated": quantize_array(w, "nf4", group_size=64),
        "bias": jnp.ones((1024,), jnp.float32),
    }
    specs = {
        "grouped": P(None, "model"), "channel": P("data", "model"), "k_split": P("data", None),
        "replicated": None, "bias": None,
    }
    sharded = shard_params(params, specs, mesh)

    g = sharded["grouped"]
    for leaf in (g.qvalue, g.scale, g.zero_point):
        assert leaf.sharding.spec == P("model", None), leaf.sharding
    # Each device holds the packed rows and the scales of the same 256 output channels.
    ref = params["grouped"]
    for a, b, full_a, full_b in ((g.qvalue, g.scale, ref.qvalue, ref.scale),
                                 (g.qvalue, g.zero_point, ref.qvalue, ref.zero_point)):
        shards_b = {s.device: s for s in b.addressable_shards}
        for s in a.addressable_shards:
            rows = s.index[0]
            assert s.data.shape[0] == 256 and shards_b[s.device].index[0] == rows
            np.testing.assert_array_equal(s.data, np.asarray(full_a)[rows])
            np.testing.assert_array_equal(shards_b[s.device].data, np.asarray(full_b)[rows])
    c = sharded["channel"]
    assert c.qvalue.sharding.spec == P("model", "data")
    assert c.scale.sharding.spec == P("model", None)
    assert sharded["bias"].sharding.spec == P()

    assert sharded["k_split"].qvalue.sharding.spec == P(None, "data")
    x_data = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    for name in ("grouped", "channel", "k_split", "replicated"):
        y = jax.jit(ops.qdot)(x_data if name == "replicated" else x, sharded[name])
        np.testing.assert_allclose(y, ops.qdot(x, params[name]), rtol=1e-5, atol=1e-5)
    print("OK")
    """
)


def test_shard_params_on_eight_cpu_devices(eight_cpu_devices):
    env = eight_cpu_devices
    out = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]
