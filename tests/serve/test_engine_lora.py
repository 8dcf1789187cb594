"""LoRA adapters per request in the engine (on an NF4 base): every request's greedy output
equals `generate` on its own merged model (`lora.merge` of the dequantized base: float
weights, no adapter code), whether it shares its steps with requests of other adapters and
of none, and the prefix cache never hands one adapter's pages to another."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant
from jquant import tree
from jquant.models import LlamaConfig, generate, init_model
from jquant.qat import lora
from jquant.serve.engine import Engine, SamplingParams

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)  # fmt: skip
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)


def _adapter(base, targets, rank, alpha, seed):
    """`lora.init`, then a random nonzero ``b`` (a fresh adapter changes nothing)."""
    ad = lora.init(base, targets, rank=rank, key=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for v in ad.values():
        v["b"] = jnp.asarray(rng.normal(0, 0.1, v["b"].shape), jnp.float32)
    return lora.LoRA(ad, alpha=alpha)


@pytest.fixture(scope="module")
def setup():
    model = init_model(CFG, seed=0)
    params = jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))
    base = jquant.quantize(params, "nf4")
    adapters = {
        # every projection and the LM head, rank 4, scale 4
        "x": _adapter(base, [r"_proj/kernel$", r"lm_head/kernel$"], 4, 16.0, 1),
        # q and v only, rank 8 (x's are padded to it), scale 2
        "y": _adapter(base, [r"(q|v)_proj/kernel$"], 8, 16.0, 2),
    }
    return model, base, adapters


def _reference(setup, name, prompt, n=GREEDY.max_tokens):
    model, base, adapters = setup
    dense = tree.map_with_path(
        lambda _, v: v.dequantize(jnp.float32) if isinstance(v, jquant.QArray) else v, base)
    params = dense if name is None else lora.merge(dense, adapters[name].adapters,
                                                   alpha=adapters[name].alpha)  # fmt: skip
    return generate(model, params, [prompt], max_new_tokens=n, stop_tokens=()).sequences()[0]


@pytest.fixture(scope="module")
def engine(setup):
    model, base, adapters = setup
    # 4 decode programs and 2 prefill programs: (1, 2, 4) rows x 1 width; (1, 2) x 1 chunk
    with Engine(model, base, Letters(), max_slots=4, max_context=64, prefill_chunk=16,
                prefill_rows=2, page_size=16, adapters=adapters) as eng:  # fmt: skip
        yield eng


def _run(engine, jobs):
    """Submits ``(prompt, adapter)`` jobs in order at once; their token ids, in order."""
    import threading

    done, outs = threading.Semaphore(0), [[] for _ in jobs]

    def collect(i, out):
        outs[i].extend(out.token_ids)
        assert out.error is None, out.error
        if out.finish_reason is not None:
            done.release()

    for i, (prompt, name) in enumerate(jobs):
        engine.submit(prompt, GREEDY, lambda out, i=i: collect(i, out), adapter=name)
    for _ in jobs:
        assert done.acquire(timeout=120)
    return outs


def test_requests_of_different_adapters_share_steps_and_match_their_merged_models(setup,
                                                                                   engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 96, n).tolist() for n in (9, 13, 6, 11, 7)]
    names = ["x", None, "y", "x", "y"]
    refs = [_reference(setup, n, p) for p, n in zip(prompts, names)]
    # The adapters change the output: a request run with the wrong one would show.
    for p, n, ref in zip(prompts, names, refs):
        others = [_reference(setup, m, p) for m in (None, "x", "y") if m != n]
        assert all(o != ref for o in others), (n, p)
    # 3 rows: a decode step pads to 4 with copies of row 0 (adapter x), which write its pages
    assert _run(engine, list(zip(prompts[:3], names[:3]))) == refs[:3]
    assert _run(engine, list(zip(prompts, names))) == refs  # 5 > 4 slots: join as they free
    assert engine.runner.stacked  # the layers still run as one scan


def test_speculative_verify_steps_keep_each_rows_adapter(setup):
    """Speculation with adapters: the verify program binds every row's slot as decode does,
    so each request still equals its merged model."""
    from jquant.serve import Ngram

    model, base, adapters = setup
    rng = np.random.default_rng(1)
    # Repeating prompts: the n-gram lookup finds drafts from the first step on.
    prompts = [(rng.integers(4, 96, 4).tolist() * 3)[:n] for n in (12, 10, 11)]
    names = ["x", "y", None]
    refs = [_reference(setup, n, p) for p, n in zip(prompts, names)]
    with Engine(model, base, Letters(), max_slots=4, max_context=64, prefill_chunk=16,
                prefill_rows=2, page_size=16, adapters=adapters,
                speculative=Ngram(num_tokens=3)) as eng:  # fmt: skip
        assert _run(eng, list(zip(prompts, names))) == refs
        assert eng.metrics()["spec_decode_draft_tokens_total"] > 0


def test_the_prefix_cache_keeps_adapters_apart(setup, engine):
    prompt = np.random.default_rng(1).integers(4, 96, 40).tolist()  # 2 full pages of 16
    refs = {n: _reference(setup, n, prompt) for n in ("x", "y", None)}
    assert len({tuple(r) for r in refs.values()}) == 3
    before = engine.metrics()["prefix_cache_hit_tokens"]
    for name in ("x", "y", None, "x", "y"):  # one at a time: each finds what is cached
        assert _run(engine, [(prompt, name)]) == [refs[name]], name
    # Only the second x and the second y find their own two pages; nothing else is shared.
    assert engine.metrics()["prefix_cache_hit_tokens"] - before == 2 * 32


def test_unknown_adapter_is_refused_before_queueing(setup, engine):
    model, base, _ = setup
    total = engine.metrics()["requests_total"]
    with pytest.raises(ValueError, match=r"unknown adapter 'z'; this engine serves \['x', "):
        engine.generate([5, 6], GREEDY, adapter="z")
    assert engine.adapter_names == ("x", "y") and engine.metrics()["requests_total"] == total
    plain = Engine(model, base, Letters(), max_slots=2, max_context=32)  # checked unstarted
    with pytest.raises(ValueError, match="unknown adapter 'x'; this engine serves none"):
        plain.generate([5, 6], GREEDY, adapter="x")


_TP_RUN = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import jquant
from jquant.models import LlamaConfig, generate, init_model
from jquant.qat import lora
from jquant.serve.engine import Engine, SamplingParams

jax.config.update("jax_numpy_dtype_promotion", "strict")

class Letters:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x30 + i) for i in ids)

cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)
model = init_model(cfg, seed=0)
params = jax.tree.map(lambda x: x * 12, nnx.state(model, nnx.Param))
base = jquant.quantize(params, "w8a16")
ad = lora.init(base, r"_proj/kernel$", rank=4, key=jax.random.key(1))
rng = np.random.default_rng(1)
for v in ad.values():
    v["b"] = jnp.asarray(rng.normal(0, 0.1, v["b"].shape), jnp.float32)
x = lora.LoRA(ad, alpha=8.0)
dense = jquant.tree.map_with_path(
    lambda _, v: v.dequantize(jnp.float32) if isinstance(v, jquant.QArray) else v, base)
prompts = [rng.integers(4, 96, n).tolist() for n in (9, 6, 12)]
names = ["x", None, "x"]
refs = [generate(model, lora.merge(dense, ad, alpha=8.0) if n else dense, [p],
                 max_new_tokens=8, stop_tokens=()).sequences()[0] for p, n in zip(prompts, names)]
assert refs[0] != generate(model, dense, [prompts[0]], max_new_tokens=8,
                           stop_tokens=()).sequences()[0]
with Engine(model, base, Letters(), max_slots=4, max_context=64, prefill_chunk=16,
            prefill_rows=1, mesh=2, adapters={"x": x}) as eng:
    q = eng.runner.params["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.a.sharding.is_fully_replicated and not q.base.qvalue.sharding.is_fully_replicated
    outs = [eng.generate(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                         adapter=n).token_ids for p, n in zip(prompts, names)]
assert outs == refs, (outs, refs)
print("OK")
"""


@pytest.mark.slow  # a subprocess compiling the sharded programs
def test_adapters_under_tensor_parallelism_equal_their_merged_models(eight_cpu_devices):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TP_RUN], env=eight_cpu_devices,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (
        out.stdout[-2000:] + out.stderr[-3000:])


def test_window_nll_of_a_runner_with_adapters_is_the_base_models(setup):
    from jquant.models import forward
    from jquant.serve.adapters import AdapterSet
    from jquant.serve.runner import Runner

    model, base, adapters = setup
    runner = Runner(model, base, rows=2, max_len=32, adapters=AdapterSet(base, adapters))
    windows = np.random.default_rng(3).integers(4, 96, (2, 32))
    logits, _ = forward(model, base, jnp.asarray(windows, jnp.int32))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
    want = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], axis=-1)[..., 0].sum(-1)
    np.testing.assert_allclose(runner.window_nll(windows), want, rtol=1e-5)
