"""The paged KV cache: `PagedView` forwards equal the uncached forward, and `PagePool`'s
bookkeeping keeps every sequence's pages its own (prefix pages shared only when they hold
the same tokens)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.models import LlamaConfig, core, init_model
from jquant.models.cache import NoCache, PagedView, Read, init_paged_cache, kv_format
from jquant.serve.pages import PagePool

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)  # fmt: skip
PAGE = 4
NONE = kv_format(None)


def _model(cfg):
    model = init_model(cfg, seed=0)
    params = jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))
    return core.Static.of(model), core.weights(params, cfg.num_layers)


@pytest.fixture(scope="module")
def tiny():
    return _model(CFG)


def _uncached(st, w, tokens):
    return core.logits(st, w, core.hidden(st, w, tokens)[0])


_uncached = jax.jit(_uncached, static_argnums=0)


def _paged_step(st, w, cache, tokens, table, starts, fmt):
    positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    view = PagedView(cache, table, positions, fmt=fmt)
    x, view = core.hidden(st, w, tokens, view)
    return core.logits(st, w, x), view.cache


_paged_step = jax.jit(_paged_step, static_argnums=(0, 6))


def _block_table(pool, seq, width):
    """``seq``'s pages as a block table row of ``width`` (None and past the end: no page)."""
    out = np.full(width, pool.num_pages, np.int32)
    pages = [pool.num_pages if p is None else p for p in seq.pages[:width]]
    out[: len(pages)] = pages
    return out


def _reference(st, w, seq):
    return np.asarray(_uncached(st, w, jnp.asarray([seq], jnp.int32)))[0]


def test_prefill_in_chunks_then_decode_equals_the_uncached_forward(tiny):
    st, w = tiny
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 96, 23).tolist()
    cache = init_paged_cache(CFG, 16, PAGE, kv_format(None), jnp.float32)
    table = rng.permutation(16)[:8].astype(np.int32)[None]  # scattered pages, 32 positions
    seq, got = list(prompt), []
    for start, n in ((0, 10), (10, 13)):  # two chunks, padded to 16 tokens each
        chunk = np.zeros((1, 16), np.int32)
        chunk[0, :n] = prompt[start:start + n]
        logits, cache = _paged_step(st, w, cache, chunk, table, np.array([start]), NONE)
        got.extend(np.asarray(logits)[0, :n])
    for _ in range(5):  # greedy decode, one token a step
        seq.append(int(np.argmax(got[-1])))
        logits, cache = _paged_step(st, w, cache, np.array([[seq[-1]]]), table,
                                    np.array([len(seq) - 1]), NONE)  # fmt: skip
        got.append(np.asarray(logits)[0, 0])
    np.testing.assert_allclose(np.stack(got), _reference(st, w, seq), rtol=2e-5, atol=2e-5)


def test_rows_sharing_prefix_pages_read_them_and_write_only_their_own(tiny):
    st, w = tiny
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 96, 8).tolist()  # two full pages
    a, b = shared + rng.integers(0, 96, 5).tolist(), shared + rng.integers(0, 96, 7).tolist()
    pool = PagePool(12, PAGE)
    cache = init_paged_cache(CFG, 12, PAGE, kv_format(None), jnp.float32)
    sa = pool.admit(a, reserve=1)
    width = 4
    table = _block_table(pool, sa, width)[None]
    logits, cache = _paged_step(st, w, cache, np.array([a + [0] * 3]), table, np.array([0]),
                                NONE)  # fmt: skip
    pool.commit(sa, a)
    sb = pool.admit(b, reserve=1)
    assert sb.cached == 8 and sb.pages[:2] == sa.pages[:2] and sb.pages[2] not in sa.pages
    # One forward: row 0 decodes a's next token, row 1 prefills b past the shared pages.
    nxt = int(np.argmax(np.asarray(logits)[0, len(a) - 1]))
    tokens = np.zeros((2, 7), np.int32)
    tokens[0, 0], tokens[1] = nxt, b[8:]
    # Row 0's padding would land at positions 14..19: past its table (dropped), or in its
    # own last page; never in row 1's.
    table = np.stack([_block_table(pool, sa, width), _block_table(pool, sb, width)])
    logits, cache = _paged_step(st, w, cache, tokens, table, np.array([len(a), 8]), NONE)
    np.testing.assert_allclose(np.asarray(logits)[1], _reference(st, w, b)[8:],
                               rtol=2e-5, atol=2e-5)  # fmt: skip
    np.testing.assert_allclose(np.asarray(logits)[0, 0], _reference(st, w, a + [nxt])[-1],
                               rtol=2e-5, atol=2e-5)  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _QuantizedNoCache:
    """The reference: attention within the call's own tokens over keys and values stored in
    ``fmt`` (codes and scales from `KVFormat.quantize`), no pages."""

    fmt: object = dataclasses.field(metadata=dict(static=True))

    def begin(self, mask, positions, window):
        return (self, *NoCache().begin(mask, positions, window)[1:])

    def update(self, layer, k, v):
        (kc, ks), (vc, vs) = self.fmt.quantize(k), self.fmt.quantize(v)
        return self, Read(kc, vc, ks, vs)

    def end(self, length):
        return self


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_pages_equal_attention_over_quantized_keys(tiny, fmt):
    st, w = tiny
    fmt = kv_format(fmt)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 96, (2, 12)).astype(np.int32)
    pages = init_paged_cache(CFG, 8, PAGE, fmt, jnp.float32)
    table = np.array([[5, 0, 7], [2, 6, 1]], np.int32)
    got, _ = _paged_step(st, w, pages, tokens, table, np.zeros(2, np.int32), fmt)
    x, _ = core.hidden(st, w, jnp.asarray(tokens), _QuantizedNoCache(fmt))
    want = core.logits(st, w, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The quantized cache differs from the float forward: the comparison can see the codes.
    assert not np.allclose(np.asarray(got)[0], _reference(st, w, tokens[0].tolist()), atol=1e-4)


def test_sliding_window_pages_released_behind_the_window():
    cfg = dataclasses.replace(CFG, sliding_window=6, layer_types=("sliding_attention",) * 2)
    st, w = _model(cfg)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, 96, 9).tolist()
    pool = PagePool(8, PAGE)
    s = pool.admit(seq, reserve=8)
    cache = init_paged_cache(cfg, 8, PAGE, kv_format(None), jnp.float32)
    width = 5
    logits, cache = _paged_step(st, w, cache, np.array([seq]), _block_table(pool, s, width)[None],
                                np.array([0]), NONE)  # fmt: skip
    got = [np.asarray(logits)[0, -1]]
    for _ in range(8):
        seq.append(int(np.argmax(got[-1])))
        pos = len(seq) - 1
        pool.release_before(s, pos - cfg.sliding_window + 1)  # keys this query cannot see
        logits, cache = _paged_step(st, w, cache, np.array([[seq[-1]]]),
                                    _block_table(pool, s, width)[None], np.array([pos]), NONE)
        got.append(np.asarray(logits)[0, 0])
    assert s.pages[:2] == [None, None] and pool.free == 8 - 3
    want = _reference(st, w, seq)[8:]
    np.testing.assert_allclose(np.stack(got), want, rtol=2e-5, atol=2e-5)


def test_pool_random_workload_keeps_pages_private_and_prefixes_exact():
    """A simulated device: each page remembers the tokens written to it. Every admitted
    prompt's cached pages must hold exactly its own leading tokens, and no sequence may
    write a page another live sequence lists."""
    rng = np.random.default_rng(4)
    pool = PagePool(24, PAGE)
    content: dict[int, list] = {}
    live: dict[int, tuple] = {}
    bases = [rng.integers(0, 5, 12).tolist() for _ in range(3)]  # common prefixes
    hits = 0
    for step in range(400):
        if live and (rng.random() < 0.4 or pool.free < 6):
            key = list(live)[rng.integers(len(live))]
            seq, _ = live.pop(key)
            pool.release(seq)
        else:
            base = bases[rng.integers(3)][: int(rng.integers(0, 13))]
            prompt = base + rng.integers(0, 5, int(rng.integers(1, 10))).tolist()
            seq = pool.admit(prompt, reserve=int(rng.integers(0, 6)))
            if seq is None:
                continue
            hits += seq.cached > 0
            for i in range(seq.cached // PAGE):  # cached pages hold the prompt's tokens
                assert content[seq.pages[i]] == prompt[i * PAGE:(i + 1) * PAGE]
            writers = [p for s, _ in live.values() for p in s.pages]
            for i in range(seq.cached // PAGE, len(seq.pages)):
                assert seq.pages[i] not in writers  # written pages are this sequence's
                content[seq.pages[i]] = prompt[i * PAGE:(i + 1) * PAGE]
            pool.commit(seq, prompt)
            live[step] = (seq, prompt)
        pool.check()
    assert hits > 20  # the workload exercised sharing
    for seq, _ in live.values():
        pool.release(seq)
    pool.check()
    assert pool.free == 24 and pool.used == 0


def test_admit_refuses_without_taking_anything_and_evicts_lru():
    pool = PagePool(4, 2)
    a = pool.admit([1, 2, 3, 4, 5], reserve=0)  # 3 pages
    assert pool.admit([9, 9, 9], reserve=0) is None and pool.free == 1
    pool.commit(a, [1, 2, 3, 4, 5])
    pool.release(a)  # pages [1,2] and [3,4] cached; [5] freed
    assert pool.free == 4 and pool.cached_pages == 2
    b = pool.admit([7, 7, 7, 7, 7, 7, 7], reserve=0)  # 4 pages: evicts both cached ones
    assert b is not None and pool.cached_pages == 0
    pool.release(b)
    c = pool.admit([1, 2, 3, 4, 5], reserve=0)
    assert c.cached == 0  # evicted: recomputed, never read stale


def test_a_prompt_waits_for_the_prefix_pages_another_is_prefilling():
    pool = PagePool(16, 2)
    a = pool.admit([1, 2, 3, 4, 5, 6, 7], reserve=1)  # pages [1,2] [3,4] [5,6] announced
    b_prompt = [1, 2, 3, 4, 9]
    digests = pool.prompt_digests(b_prompt)
    assert len(digests) == 2 and pool.waits_for(digests)
    assert not pool.waits_for(pool.prompt_digests([1, 3, 3, 4, 9]))  # another prefix
    pool.commit(a, [1, 2])  # the first page computed; the second still pending
    assert pool.waits_for(digests)
    pool.commit(a, [1, 2, 3, 4, 5, 6, 7])
    assert not pool.waits_for(digests)
    b = pool.admit(b_prompt, reserve=1, digests=digests)
    assert b.cached == 4 and b.pages[:2] == a.pages[:2]
    pool.check()
    c = pool.admit([8, 8, 8, 8, 8], reserve=0)  # announces [8,8] [8,8]
    pool.release(c)  # released before computing: nobody waits on its pages any more
    assert not pool.waits_for(pool.prompt_digests([8, 8, 8, 8, 1]))
    pool.check()
