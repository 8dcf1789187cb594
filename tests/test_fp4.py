"""The block-scaled FP4 formats mxfp4 and nvfp4: E2M1 codes, their scales, and the paths
through jquant, against NumPy implementations written from the specs (OCP MX v1.0; NVIDIA's
NVFP4) with ml_dtypes' float4_e2m1fn / float8_e4m3fn / float8_e8m0fnu, and against
compressed-tensors' own NVFP4 quantize/dequantize."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jquant.algorithms.gptq  # noqa: F401 (registers "gptq")
from jquant import algorithms, qtypes
from jquant.calib.stats import from_inputs
from jquant.ops import qdot
from jquant.qarray import QArray, quantize_array
from jquant.qat import fake_quantize, init
from jquant.recipe import Recipe, Rule, RuleError
from jquant.transform import quantize

E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
BLOCK = {"mxfp4": 32, "nvfp4": 16}


def _e2m1_codes(x):
    """E2M1 bit patterns of float ``x`` by ml_dtypes' cast (round to nearest even,
    saturating at ±6)."""
    return np.asarray(x, np.float32).astype(E2M1).view(np.uint8)


def _e2m1_values(codes):
    return np.asarray(codes, np.uint8).view(E2M1).astype(np.float32)


def _blocks(w_t, size):
    """(start, stop) of each block along the last axis (the last one may be short)."""
    k = w_t.shape[-1]
    return [(s, min(s + size, k)) for s in range(0, k, size)]


def np_mxfp4(w):
    """OCP MX v1.0 MXFP4 of a Dense kernel ``w (K, N)`` along K, from the spec's text:
    X = floor(log2(max |V|)) - emax_elem (2 for E2M1) clamped to the E8M0 range,
    P = quantize_to_E2M1(V / 2**X) (round to nearest even, saturating).
    Returns (codes (N, K), scales (N, G) float64, dequantized (K, N) float64)."""
    w_t = w.T.astype(np.float64)
    codes, scales = np.zeros(w_t.shape, np.uint8), []
    for s, e in _blocks(w_t, 32):
        amax = np.abs(w_t[:, s:e]).max(axis=1)
        with np.errstate(divide="ignore"):
            x = np.clip(np.floor(np.log2(amax)) - 2, -127, 127)
        scale = np.where(amax > 0, 2.0**x, 1.0)
        codes[:, s:e] = _e2m1_codes(w_t[:, s:e] / scale[:, None])
        scales.append(scale)
    scales = np.stack(scales, axis=1)
    deq = _e2m1_values(codes) * np.repeat(scales, 32, axis=1)[:, : w_t.shape[1]]
    return codes, scales, deq.T


def np_nvfp4(w):
    """NVFP4 of ``w (K, N)`` along K, from NVIDIA's description: a float32 per-tensor
    scale g = amax / (6 * 448), E4M3 block scales s = amax_block / 6 / g (saturated, 0 → 0.125
    as compressed-tensors), elements E2M1(x / (s * g)).
    Returns (codes (N, K), block codes (N, G) float32 values, g, dequantized (K, N))."""
    w_t = w.T.astype(np.float32)
    amax = np.float32(np.abs(w_t).max())
    g = np.float32(amax / np.float32(6 * 448)) if amax > 0 else np.float32(1)
    codes, blocks = np.zeros(w_t.shape, np.uint8), []
    for s, e in _blocks(w_t, 16):
        b = np.abs(w_t[:, s:e]).max(axis=1) / np.float32(6) / g
        b = np.clip(b, -448, 448).astype(E4M3).astype(np.float32)
        b = np.where(b == 0, np.float32(0.125), b)
        eff = (b * g).astype(np.float32)
        codes[:, s:e] = _e2m1_codes(w_t[:, s:e] / eff[:, None])
        blocks.append(b)
    blocks = np.stack(blocks, axis=1)
    eff = np.repeat((blocks * g).astype(np.float32), 16, axis=1)[:, : w_t.shape[1]]
    return codes, blocks, g, (_e2m1_values(codes) * eff).T


def _weight(seed=0, shape=(200, 24)):
    """A heavy-tailed weight with blocks spanning several binades, a zero block, and exact
    E2M1 ties after scaling (a block holding 6, 5, 3.5, 2.5, 1.75, ... times 2**-3)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, shape) * 10.0 ** rng.uniform(-3, 1, (1, shape[1]))
    w[32:64, 0] = 0.0
    w[:16, 1] = 0.0
    w[:13, 1] = np.array([6, 5, 3.5, 2.5, 1.75, 1.25, 0.75, 0.25, -5, -0.25, -0.75, -3.5,
                          -2.5]) / 8  # fmt: skip
    return w.astype(np.float32)


# ---- E2M1 ---------------------------------------------------------------------------


def test_e2m1_encode_decode_equal_ml_dtypes():
    grid = np.array([0.0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    x = np.concatenate([grid, mids, np.nextafter(mids, 0), np.nextafter(mids, 10),
                        [6.5, 7.0, 100.0, 3e38], np.random.default_rng(0).uniform(0, 8, 4000)])
    x = np.concatenate([x, -x, [-0.0, -1e-9]]).astype(np.float32)
    for name in BLOCK:
        got = np.asarray(qtypes.encode(name, jnp.asarray(x)))
        np.testing.assert_array_equal(got, _e2m1_codes(x))
        values = np.asarray(qtypes.decode(name, jnp.arange(16, dtype=jnp.uint8)))
        np.testing.assert_array_equal(values, _e2m1_values(np.arange(16)))
        np.testing.assert_array_equal(np.signbit(values), np.arange(16) >= 8)


def test_e2m1_half_step_bounds_the_rounding():
    x = np.random.default_rng(1).uniform(-6, 6, 5000).astype(np.float32)
    err = np.abs(_e2m1_values(_e2m1_codes(x)) - x)
    bound = qtypes.half_step("mxfp4", x)
    assert (err <= bound).all() and (err > 0.9 * bound).any()


# ---- quantize_array against the spec ------------------------------------------------------


@pytest.mark.parametrize("k", [200, 256])
def test_mxfp4_equals_numpy_spec(k):
    w = _weight(0, (k, 24))
    q = quantize_array(w, "mxfp4", group_size=32)
    codes, scales, deq = np_mxfp4(w)
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.shape == (24, -(-k // 32))
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.scale, np.float64), scales)
    np.testing.assert_array_equal(np.asarray(q.dequantize(), np.float64), deq)
    if k == 256:  # whole blocks: 4 bits per code and one byte per 32
        assert q.bits_per_weight == pytest.approx(4.25)


@pytest.mark.parametrize("k", [200, 256])
def test_nvfp4_equals_numpy_spec(k):
    w = _weight(1, (k, 24))
    q = quantize_array(w, "nvfp4", group_size=16)
    codes, blocks, g, deq = np_nvfp4(w)
    assert isinstance(q.scale, QArray) and q.scale.qtype == "fp8_e4m3"
    assert q.scale.qvalue.dtype == jnp.float8_e4m3fn and q.scale.scale.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
    np.testing.assert_array_equal(np.asarray(q.scale.qvalue, np.float32), blocks)
    np.testing.assert_array_equal(np.asarray(q.scale.scale).reshape(()), g)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), deq.astype(np.float32))


@pytest.mark.parametrize("name", list(BLOCK))
def test_jit_equals_eager_and_zero_tensor(name):
    w = _weight(2, (96, 8))
    eager = quantize_array(w, name, group_size=BLOCK[name])
    traced = jax.jit(lambda v: quantize_array(v, name, group_size=BLOCK[name]))(w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = quantize_array(np.zeros((64, 3), np.float32), name, group_size=BLOCK[name])
    assert not np.asarray(z.dequantize()).any()


@pytest.mark.reference
def test_nvfp4_equals_compressed_tensors():
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
    from compressed_tensors.quantization.quant_scheme import NVFP4
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args: QuantizationArgs = NVFP4["weights"]
    w = _weight(3, (256, 48))
    w_hf = torch.from_numpy(w.T.copy())  # (out, in), the layout compressed-tensors takes
    gs = generate_gparam(w_hf.min(), w_hf.max())
    blocks = w_hf.reshape(48, -1, 16)
    scale, zp = calculate_qparams(blocks.amin(-1), blocks.amax(-1), args, global_scale=gs)
    x_q = ct_quantize(w_hf, scale, zp, args, global_scale=gs)
    deq = dequantize(x_q, scale, zp, args, dtype=torch.float32, global_scale=gs)

    q = quantize_array(w, "nvfp4", group_size=16)
    np.testing.assert_array_equal(np.asarray(q.scale.qvalue, np.float32), scale.numpy())
    np.testing.assert_array_equal(np.asarray(qtypes.decode("nvfp4", q.codes())), x_q.numpy())
    # compressed-tensors keeps the reciprocal of jquant's per-tensor scale and divides by it,
    # so the two kept scales may differ in the last bit.
    np.testing.assert_allclose(float(q.scale.scale.reshape(())), 1 / float(gs), rtol=2**-23)
    np.testing.assert_allclose(np.asarray(q.dequantize()).T, deq.numpy(), rtol=2**-22, atol=0)


# ---- settings that the formats refuse ------------------------------------------------------


@pytest.mark.parametrize("name", list(BLOCK))
def test_bad_settings_name_the_format(name):
    w = _weight(4, (64, 4))
    for gs in (None, 64, 8):
        with pytest.raises(ValueError, match=f"invalid for {name}.*must be {BLOCK[name]}"):
            quantize_array(w, name, group_size=gs)
        with pytest.raises(RuleError, match=rf"rule \(pattern 'w'\).*{name}"):
            Rule(pattern="w", weight=name, group_size=gs)
    with pytest.raises(ValueError, match=f"{name} fixes its scales"):
        quantize_array(w, name, group_size=BLOCK[name], scale_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="double_quant does not apply"):
        quantize_array(w, name, group_size=BLOCK[name], double_quant=True)
    with pytest.raises(RuleError, match=f"scale_dtype='float32': {name} fixes its scales"):
        Rule(pattern="w", weight=name, group_size=BLOCK[name], scale_dtype="float32")
    with pytest.raises(RuleError, match=f"double_quant does not apply to {name}"):
        Rule(pattern="w", weight=name, group_size=BLOCK[name], double_quant=True)


# ---- through the rest of jquant ------------------------------------------------------------


@pytest.mark.parametrize("name", list(BLOCK))
def test_shipped_recipe_quantizes_by_rtn(name):
    recipe = Recipe.load(f"w4a16-{name}")
    params = {"dense": {"kernel": jnp.asarray(_weight(5, (128, 16)))}}
    q = quantize(params, recipe)["dense"]["kernel"]
    ref = quantize_array(params["dense"]["kernel"], name, group_size=BLOCK[name])
    assert q.qtype == name and q.group_size == BLOCK[name]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(ref.dequantize()))


@pytest.mark.parametrize("name", list(BLOCK))
def test_matmul_equals_x_at_dequantize(name):
    w = _weight(6, (192, 40))
    q = quantize_array(w, name, group_size=BLOCK[name])
    x = jnp.asarray(np.random.default_rng(7).standard_normal((5, 192)), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    for got in (qdot(x, q), jax.jit(qdot)(x, q)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _layer(seed, k, n):
    """A weight and inputs with strongly correlated channels (as tests/test_gptq.py)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((512, k // 8)) @ rng.standard_normal((k // 8, k))
    x = (latent + 0.3 * rng.standard_normal((512, k))) * 10.0 ** rng.uniform(-0.5, 0.5, k)
    w = rng.standard_normal((k, n)) * 0.05
    return w.astype(np.float32), from_inputs(x.astype(np.float32))


@pytest.mark.parametrize("name", list(BLOCK))
def test_gptq_keeps_the_format_and_lowers_output_error(name):
    w, calib = _layer(8, 128, 24)
    rule = Rule(pattern="w", weight=name, group_size=BLOCK[name], algorithm="gptq",
                algorithm_args={"act_order": True}).resolve("w", 2)  # fmt: skip
    q = algorithms.run("gptq", w, rule, path="w", calibration=calib)
    rtn = quantize_array(w, name, group_size=BLOCK[name])
    # Static groups: the scales are RTN's, stored the format's way.
    for a, b in zip(jax.tree.leaves(q.scale), jax.tree.leaves(rtn.scale)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    h = np.asarray(calib.hessian, np.float64)

    def out_err(qa):
        d = np.asarray(qa.dequantize(), np.float64) - w
        return float(np.trace(d.T @ h @ d))

    assert out_err(q) < 0.5 * out_err(rtn)


def test_hqq_refuses_block_scaled_formats():
    rule = Rule(pattern="w", weight="mxfp4", group_size=32, algorithm="hqq").resolve("w", 2)
    with pytest.raises(ValueError, match="w: hqq fits free float scales; mxfp4 fixes"):
        algorithms.run("hqq", _weight(11, (64, 4)), rule, path="w")


def test_gptq_refuses_what_breaks_the_scales():
    w, calib = _layer(9, 64, 8)
    for name, args, match in [("nvfp4", {"act_order": False, "static_groups": False},
                               "static_groups"), ("mxfp4", {"refit": True}, "drop refit")]:
        rule = Rule(pattern="w", weight=name, group_size=BLOCK[name], algorithm="gptq",
                    algorithm_args=args).resolve("w", 2)  # fmt: skip
        with pytest.raises(ValueError, match=match):
            algorithms.run("gptq", w, rule, path="w", calibration=calib)


@pytest.mark.parametrize("name", list(BLOCK))
def test_qat_fake_quant_is_the_ptq_roundtrip(name):
    recipe = Recipe.from_dict({"name": "t", "rules": [
        {"pattern": "kernel", "weight": name, "group_size": BLOCK[name]}]})  # fmt: skip
    params = {"dense": {"kernel": jnp.asarray(_weight(10, (96, 8)))}}
    fq = fake_quantize(params, recipe)["dense"]["kernel"]
    ref = quantize(params, recipe)["dense"]["kernel"].dequantize()
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(ref))
    if name == "nvfp4":
        with pytest.raises(ValueError, match="QAT cannot learn nvfp4 scales"):
            init(params, recipe)
