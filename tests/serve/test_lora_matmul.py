"""The batched multi-adapter LoRA matmul against a per-row NumPy reference: adapters of
different ranks and scales, a random row -> adapter assignment, unrolled and stacked layers
(under ``lax.scan``), a float and a quantized base; and the errors of `AdapterSet`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import ops
from jquant.qat import lora
from jquant.serve.adapters import AdapterSet, bind_rows

K, N, LAYERS = 64, 48, 3
RANKS = {"x": 2, "y": 8, "z": 4}
ALPHAS = {"x": 16.0, "y": None, "z": 3.0}  # scales 8, 1, 0.75


def _adapters(rng, paths, rank):
    return {p: {"a": rng.normal(size=(K, rank)).astype(np.float32),
                "b": rng.normal(size=(rank, N)).astype(np.float32)} for p in paths}  # fmt: skip


def _setup(quantized: bool, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(K, N)).astype(np.float32) for _ in range(LAYERS)]
    base = [jquant.quantize_array(w, "int4", group_size=32, axis=0) if quantized else w
            for w in ws]  # fmt: skip
    dense = [np.asarray(b.dequantize(), np.float64) if quantized else b.astype(np.float64)
             for b in base]  # fmt: skip
    paths = [f"layers/{i}/proj/kernel" for i in range(LAYERS)]
    loras = {name: lora.LoRA(_adapters(rng, paths if name != "z" else paths[1:2], r),
                             alpha=ALPHAS[name]) for name, r in RANKS.items()}  # fmt: skip
    params = {"layers": [{"proj": {"kernel": b}} for b in base]}
    return rng, params, base, dense, loras


def _reference(x, dense_w, loras, names, layer):
    """Row by row: ``x @ W + s * x @ a @ b`` with the row's own adapter (or none)."""
    out = []
    for xi, name in zip(x.astype(np.float64), names):
        y = xi @ dense_w
        path = f"layers/{layer}/proj/kernel"
        if name is not None and path in loras[name].adapters:
            ad, alpha = loras[name].adapters[path], loras[name].alpha
            s = 1.0 if alpha is None else alpha / RANKS[name]
            y = y + s * (xi @ ad["a"].astype(np.float64)) @ ad["b"].astype(np.float64)
        out.append(y)
    return np.stack(out)


@pytest.mark.parametrize("quantized", [False, True])
def test_each_row_gets_its_own_adapter_unrolled(quantized):
    rng, params, base, dense, loras = _setup(quantized)
    aset = AdapterSet(params, loras)
    w = aset.attach(params)
    choices = [None, *RANKS]
    names = [choices[i] for i in rng.integers(0, len(choices), 7)]
    names[:4] = [None, "x", "y", "z"]  # every adapter and the base at least once
    slots = jnp.asarray([aset.slot(n) for n in names], jnp.int32)
    x = rng.normal(size=(7, 5, K)).astype(np.float32)  # (rows, tokens, K)
    bound = bind_rows(w, slots)
    for layer in range(LAYERS):
        got = np.asarray(ops.qdot(jnp.asarray(x), bound["layers"][layer]["proj"]["kernel"]))
        want = np.stack([_reference(x[:, t], dense[layer], loras, names, layer)
                         for t in range(5)], axis=1)  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
        # the adapters change what they touch: the check can see a row using the base
        plain = np.asarray(ops.qdot(jnp.asarray(x), base[layer]))
        touched = [n is not None and f"layers/{layer}/proj/kernel" in loras[n].adapters
                   for n in names]  # fmt: skip
        assert all(np.abs(plain[i] - want[i]).max() > 1e-2 for i in np.flatnonzero(touched))


def test_stacked_layers_under_scan_get_each_rows_adapter():
    rng, params, _, dense, loras = _setup(False, seed=1)
    stacked = {"layers": {"proj": {"kernel": jnp.stack(
        [layer["proj"]["kernel"] for layer in params["layers"]])}}}  # fmt: skip
    w = AdapterSet(params, loras).attach(stacked)
    names = ["y", None, "z", "x", "y", "x"]
    slots = jnp.asarray([0 if n is None else list(RANKS).index(n) + 1 for n in names], jnp.int32)
    x = rng.normal(size=(6, 1, K)).astype(np.float32)

    @jax.jit
    def run(w, x, slots):
        w = bind_rows(w, slots)

        def body(carry, layer_w):  # each layer on the same input, outputs kept
            return carry, ops.qdot(x, layer_w["proj"]["kernel"])

        return jax.lax.scan(body, 0, w["layers"])[1]

    got = np.asarray(run(w, jnp.asarray(x), slots))  # (layers, rows, 1, N)
    for layer in range(LAYERS):
        want = _reference(x[:, 0], dense[layer], loras, names, layer)
        np.testing.assert_allclose(got[layer, :, 0], want, rtol=2e-4, atol=2e-4)


def test_rows_must_be_bound_and_match_x():
    _, params, _, _, loras = _setup(False)
    kernel = AdapterSet(params, loras).attach(params)["layers"][0]["proj"]["kernel"]
    x = jnp.ones((3, K), jnp.float32)
    with pytest.raises(ValueError, match="one adapter index per row"):
        ops.qdot(x, kernel)
    with pytest.raises(ValueError, match=r"rows of shape \(3,\); got \(2,\)"):
        ops.qdot(x, bind_rows(kernel, jnp.zeros(2, jnp.int32)))


def test_adapter_set_errors_name_the_adapter():
    rng, params, _, _, loras = _setup(False)
    with pytest.raises(ValueError, match="adapter 'bad' does not fit.*has no parameter"):
        AdapterSet(params, {"bad": lora.LoRA({"layers/9/proj/kernel": loras["x"].adapters[
            "layers/0/proj/kernel"]})})  # fmt: skip
    wrong = {"layers/0/proj/kernel": {"a": np.zeros((K + 1, 2), np.float32),
                                      "b": np.zeros((2, N), np.float32)}}  # fmt: skip
    with pytest.raises(ValueError, match=r"adapter 'w' does not fit.*\(64, 48\)"):
        AdapterSet(params, {"w": lora.LoRA(wrong)})
    other = {**params, "other": {"kernel": np.zeros((K, N), np.float32)}}
    with pytest.raises(ValueError, match="adapter 'o': other/kernel of shape .* cannot carry"):
        AdapterSet(other, {"o": lora.LoRA({"other/kernel": wrong["layers/0/proj/kernel"]})})
    with pytest.raises(ValueError, match="adapter name 'a:b' must match"):
        AdapterSet(params, {"a:b": loras["x"]})
    with pytest.raises(ValueError, match="expected a jquant.qat.lora.LoRA"):
        AdapterSet(params, {"x": loras["x"].adapters})
    aset = AdapterSet(params, loras)
    with pytest.raises(ValueError, match=r"unknown adapter 'q'; this engine serves \['x', 'y'"):
        aset.slot("q")
