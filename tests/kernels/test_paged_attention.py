"""The paged-attention kernels (TPU and GPU) against a NumPy reference, in Pallas interpret
mode off their hardware (natively on it, as `benchmarks/device.sh` runs them).

The reference is written from the layout in `kernels/paged_attention.py`'s docstring, one
query and one key at a time in float64: walk the positions a query may see, look each up
in its row's block table, dequantize (code * scale), softmax. It shares no code with the
kernels or with `paged_attention_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jquant.kernels.paged_attention import paged_attention, paged_attention_reference

from jquant import kernels

NUM_PAGES = 24


def np_paged_attention(q, k_pages, v_pages, tables, positions, k_scale=None, v_scale=None,
                       *, scale, window=None, softcap=None):  # fmt: skip
    q, tables, positions = (np.asarray(a) for a in (q, tables, positions))
    k_pages, v_pages = np.asarray(k_pages), np.asarray(v_pages)
    num_pages, kv_heads, page_size, _ = k_pages.shape
    r_, s_, heads, d = q.shape
    groups = heads // kv_heads
    out = np.zeros((r_, s_, heads, d))
    for r in range(r_):
        for s in range(s_):
            p = int(positions[r, s])
            first = 0 if window is None else max(0, p - window + 1)
            keys, values = [], []
            for t in range(first, p + 1):
                slot, offset = divmod(t, page_size)
                if slot >= tables.shape[1] or not 0 <= tables[r, slot] < num_pages:
                    continue  # no page: no key
                page = tables[r, slot]
                kt = k_pages[page, :, offset].astype(np.float64)  # (kv_heads, d)
                vt = v_pages[page, :, offset].astype(np.float64)
                if k_scale is not None:
                    kt = kt * np.asarray(k_scale)[page, :, offset, None].astype(np.float64)
                    vt = vt * np.asarray(v_scale)[page, :, offset, None].astype(np.float64)
                keys.append(kt)
                values.append(vt)
            if not keys:
                continue  # nothing to attend to: zeros
            keys, values = np.stack(keys, 1), np.stack(values, 1)  # (kv_heads, T, d)
            for h in range(heads):
                logits = scale * (keys[h // groups] @ q[r, s, h].astype(np.float64))
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                w = np.exp(logits - logits.max())
                out[r, s, h] = (w / w.sum()) @ values[h // groups]
    return out


def _pages(rng, fmt, shape, dtype):
    """(k, v, k_scale, v_scale): float pages of `dtype` (or bfloat16), or int8 / fp8 codes
    and scales."""
    if fmt in (None, "bfloat16"):
        dtype = dtype if fmt is None else jnp.bfloat16
        return (*(jnp.asarray(rng.standard_normal(shape), dtype) for _ in "kv"), None, None)
    if fmt == "int8":
        codes = [jnp.asarray(rng.integers(-127, 128, shape), jnp.int8) for _ in "kv"]
    else:  # fp8 e4m3 codes spanning its range
        codes = [jnp.asarray((rng.standard_normal(shape) * 40).astype(ml_dtypes.float8_e4m3fn))
                 for _ in "kv"]
    scales = [jnp.asarray(rng.uniform(0.002, 0.02, shape[:-1]), jnp.bfloat16) for _ in "kv"]
    return (*codes, *scales)


def _tables(rng, page_size, width=5):
    """Three rows of scattered pages: a full one, a short one (then "no page" entries,
    `NUM_PAGES` and -1), one sharing the first's first page (a common prefix)."""
    pages = rng.permutation(NUM_PAGES)
    t = np.full((3, width), NUM_PAGES, np.int32)
    t[0] = pages[:width]
    t[1, 0] = pages[width]
    t[2, :3] = [pages[0], pages[width + 1], pages[width + 2]]
    t[2, 3] = -1
    return t


def _positions(page_size, s, width=5):
    """Row 0 reaches its last page, row 1 stays in its one page, row 2 in its first three;
    with s > 1, a chunk of consecutive positions and in row 1 padding queries (-1)."""
    ends = np.array([width * page_size - 1, page_size // 2, 3 * page_size - 2])
    pos = ends[:, None] - (s - 1) + np.arange(s)[None, :]
    if s > 1:
        pos[1] = np.where(np.arange(s) < 2, np.arange(s), -1)
    return pos.astype(np.int32)


def _interpret_for(backend: str) -> bool:
    return kernels.normalize_backend(None) != backend


# name -> (q dtype, page format, page_size, tokens per row S, heads, kv heads, head_dim,
#          window, softcap, scale, block_q)
CASES = {
    "f32": (jnp.float32, None, 16, 1, 6, 2, 16, None, None, None, None),
    "bf16": (jnp.bfloat16, None, 16, 1, 4, 2, 32, None, None, None, None),
    "int8": (jnp.float32, "int8", 16, 1, 6, 2, 16, None, None, None, None),
    "f32_bf16_pages": (jnp.float32, "bfloat16", 16, 2, 4, 2, 16, None, None, None, None),
    "fp8_bf16": (jnp.bfloat16, "fp8", 16, 1, 4, 1, 16, None, None, None, None),
    "window_softcap_prefill": (jnp.float32, None, 16, 5, 4, 2, 16, 13, 3.0, 1.0, None),
    "page32_int8_prefill": (jnp.float32, "int8", 32, 4, 6, 3, 32, None, None, None, None),
    "fp8_window_query_blocks": (jnp.float32, "fp8", 16, 6, 8, 2, 16, 20, None, None, 16),
}
# bf16 rounds the probabilities before they meet V; everything else is float32 or exact.
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


class PagedAttentionCases:
    BACKEND = "tpu"

    def _check(self, name, **extra):
        dtype, fmt, size, s, heads, kv, d, window, softcap, scale, block_q = CASES[name]
        rng = np.random.default_rng(list(CASES).index(name))
        q = jnp.asarray(rng.standard_normal((3, s, heads, d)), dtype)
        k, v, ks, vs = _pages(rng, fmt, (NUM_PAGES, kv, size, d), dtype)
        tables, positions = _tables(rng, size), _positions(size, s)
        got = paged_attention(q, k, v, tables, positions, k_scale=ks, v_scale=vs,
                              scale=scale, window=window, softcap=softcap,
                              backend=self.BACKEND, block_q=block_q,
                              interpret=_interpret_for(self.BACKEND), **extra)
        want = np_paged_attention(q, k, v, tables, positions, ks, vs, window=window,
                                  scale=d**-0.5 if scale is None else scale, softcap=softcap)
        assert got.shape == q.shape and got.dtype == q.dtype
        got = np.asarray(got.astype(jnp.float32))
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        return got, want

    @pytest.mark.parametrize("name", CASES)
    def test_matches_numpy(self, name):
        self._check(name)

    def test_padding_queries_get_zeros(self):
        got, want = self._check("window_softcap_prefill")
        assert not got[1, 2:].any() and not want[1, 2:].any()
        assert np.abs(got[1, :2]).min() > 0

    def test_layer_of_stacked_pages_under_scan(self):
        """Every layer's pages stacked, the layer a traced index under `lax.scan`: each
        step reads its own layer's pages (the others hold different values)."""
        rng = np.random.default_rng(7)
        layers, size, d = 3, 16, 16
        q = jnp.asarray(rng.standard_normal((layers, 3, 1, 4, d)), jnp.float32)
        k, v, ks, vs = _pages(rng, "int8", (layers, NUM_PAGES, 2, size, d), jnp.float32)
        tables, positions = _tables(rng, size), _positions(size, 1)
        interpret = _interpret_for(self.BACKEND)

        def body(_, xs):
            layer, ql = xs
            return None, paged_attention(ql, k, v, tables, positions, k_scale=ks, v_scale=vs,
                                         layer=layer, backend=self.BACKEND,
                                         interpret=interpret)

        _, got = jax.lax.scan(body, None, (jnp.arange(layers), q))
        for i in range(layers):
            want = np_paged_attention(q[i], k[i], v[i], tables, positions, ks[i], vs[i],
                                      scale=d**-0.5)
            np.testing.assert_allclose(np.asarray(got[i]), want, rtol=2e-5, atol=2e-5)


class TestTpuKernel(PagedAttentionCases):
    BACKEND = "tpu"

    def test_page_size_8(self):
        rng = np.random.default_rng(3)
        q = jnp.asarray(rng.standard_normal((3, 2, 4, 16)), jnp.float32)
        k, v, _, _ = _pages(rng, None, (NUM_PAGES, 2, 8, 16), jnp.float32)
        tables, positions = _tables(rng, 8), _positions(8, 2)
        got = paged_attention(q, k, v, tables, positions, backend="tpu",
                              interpret=_interpret_for("tpu"))
        want = np_paged_attention(q, k, v, tables, positions, scale=0.25)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


    def test_simulated_tpu_interpreter(self):
        """`pltpu.InterpretParams`: simulated VMEM and DMAs, uninitialized memory poisoned
        with NaNs, so a page fetched for the wrong step or read before its copy shows."""
        rng = np.random.default_rng(1)
        q = jnp.asarray(rng.standard_normal((3, 5, 4, 16)), jnp.float32)
        k, v, ks, vs = _pages(rng, "int8", (NUM_PAGES, 2, 16, 16), jnp.float32)
        tables, positions = _tables(rng, 16), _positions(16, 5)
        got = paged_attention(q, k, v, tables, positions, k_scale=ks, v_scale=vs, window=13,
                              backend="tpu", interpret=pltpu.InterpretParams())
        want = np_paged_attention(q, k, v, tables, positions, ks, vs, scale=0.25, window=13)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


class TestGpuKernel(PagedAttentionCases):
    BACKEND = "gpu"


class TestReference:
    """`paged_attention_reference`, the XLA path of `paged_attention` on other backends."""

    @pytest.mark.parametrize("name", ["int8", "window_softcap_prefill"])
    def test_matches_numpy(self, name):
        dtype, fmt, size, s, heads, kv, d, window, softcap, scale, _ = CASES[name]
        rng = np.random.default_rng(5)
        q = jnp.asarray(rng.standard_normal((3, s, heads, d)), dtype)
        k, v, ks, vs = _pages(rng, fmt, (NUM_PAGES, kv, size, d), dtype)
        tables, positions = _tables(rng, size), _positions(size, s)
        kw = dict(k_scale=ks, v_scale=vs, scale=scale, window=window, softcap=softcap)
        want = np_paged_attention(q, k, v, tables, positions, ks, vs, window=window,
                                  scale=d**-0.5 if scale is None else scale, softcap=softcap)
        for got in (paged_attention_reference(q, k, v, tables, positions, **kw),
                    paged_attention(q, k, v, tables, positions, backend="cpu", **kw)):
            np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


class TestErrors:
    def _inputs(self):
        q = jnp.zeros((2, 1, 4, 16), jnp.float32)
        pages = jnp.zeros((8, 2, 16, 16), jnp.float32)
        return q, pages, jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 1), jnp.int32)

    @pytest.mark.parametrize("change, match", [
        (lambda q, p, t, pos: (q[..., :8], p, t, pos), "head_dim 16 but q has 8"),
        (lambda q, p, t, pos: (q[:, :, :3], p, t, pos), "not a multiple"),
        (lambda q, p, t, pos: (q, p[0], t, pos), "must both be"),
        (lambda q, p, t, pos: (q, p, t[:1], pos), "tables must be"),
        (lambda q, p, t, pos: (q, p, t, pos.astype(jnp.float32)), "positions must be"),
        (lambda q, p, t, pos: (q, p.astype(jnp.int8), t, pos), "need k_scale and v_scale"),
    ])
    def test_bad_input_is_named(self, change, match):
        q, pages, tables, positions = change(*self._inputs())
        with pytest.raises(ValueError, match=match):
            paged_attention(q, pages, pages, tables, positions, backend="tpu", interpret=True)

    def test_window_must_be_positive(self):
        q, pages, tables, positions = self._inputs()
        with pytest.raises(ValueError, match="window=0 must be >= 1"):
            paged_attention(q, pages, pages, tables, positions, window=0, backend="tpu")

    def test_scales_must_match_the_pages(self):
        q, pages, tables, positions = self._inputs()
        codes = pages.astype(jnp.int8)
        with pytest.raises(ValueError, match="without head_dim"):
            paged_attention(q, codes, codes, tables, positions, k_scale=pages[..., 0, 0],
                            v_scale=pages[..., 0, 0], backend="tpu", interpret=True)
        int_scales = codes[..., 0]
        with pytest.raises(ValueError, match="must be floats"):
            paged_attention(q, codes, codes, tables, positions, k_scale=int_scales,
                            v_scale=int_scales, backend="tpu", interpret=True)

    def test_gpu_rules(self):
        q, pages, tables, positions = self._inputs()
        small = pages[:, :, :8]
        assert not kernels.can_use_paged_attention(q, small, small, tables, positions,
                                                   backend="gpu")
        assert kernels.can_use_paged_attention(q, small, small, tables, positions,
                                               backend="tpu")
        with pytest.raises(ValueError, match="page_size=8 must be a power of two >= 16"):
            paged_attention(q, small, small, tables, positions, backend="gpu", interpret=True)
        with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
            paged_attention(q, pages, pages, tables, positions, backend="gpu", interpret=True,
                            block_q=24)
