"""The serving engine under tensor parallelism (8 CPU devices, in a subprocess): greedy
outputs and window NLLs under tp=2, 4, 8 equal the single-device engine's."""

import subprocess
import sys
import textwrap

_RUN = textwrap.dedent(
    """
    import threading
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    import jquant
    from jquant.models import LlamaConfig, init_model
    from jquant.serve.engine import Engine, SamplingParams

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(0x30 + i % 64) for i in ids)

    # 16 query heads, 8 kv heads, F=1024 (down_proj: 8 int4 groups of 128); o_proj's K=512
    # (4 groups) stays replicated at int4 tp=8. Weights x8 so greedy tokens vary.
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_layers=2,
                      num_heads=16, num_kv_heads=8, head_dim=32, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = init_model(cfg, seed=0)
    state = jax.tree.map(lambda x: x * 8, nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 512, n).tolist() for n in (5, 23, 40)]
    windows = rng.integers(0, 512, (2, 64))
    # float32 everywhere; tp only reorders sums: NLL sums agree to RTOL relative.
    RTOL = 1e-5

    def run(q, tp, kv):
        eng = Engine(model, q, Letters(), max_slots=4, max_context=96, prefill_chunk=16,
                     kv_cache=kv, mesh=tp)
        held = eng.runner.per_device_bytes()
        outs = [None] * len(prompts)
        with eng:
            def go(i):
                outs[i] = eng.generate(prompts[i], SamplingParams(
                    max_tokens=16, temperature=0, ignore_eos=True)).token_ids
            threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
            [t.start() for t in threads]
            [t.join() for t in threads]
        # The engine is closed: its runner (and cache) score the windows, through the same
        # sharded programs' code path.
        return outs, eng.runner.window_nll(windows), held, eng.tp_notes, eng.runner

    # Every (recipe, tp) pair of tests/test_tensor_parallel.py runs there through forward;
    # here each recipe once through the engine, int4 at the tp that must replicate o_proj.
    for recipe, kv, tps in (("float", None, (2,)), ("w8a16-emb8", None, (4,)),
                            ("w4a16-rtn-g128", None, (8,)), ("w4a16-rtn-g128", "int8", (8,))):
        q = state if recipe == "float" else jquant.quantize(state, recipe)
        ref, ref_nll, ref_held, _, _ = run(q, None, kv)
        assert len({tuple(o) for o in ref}) == 3, ref
        for tp in tps:
            outs, nll, held, notes, runner = run(q, tp, kv)
            assert outs == ref, (recipe, kv, tp, outs, ref)
            rel = float(np.max(np.abs(nll - ref_nll) / np.abs(ref_nll)))
            assert rel <= RTOL, (recipe, tp, rel)
            assert len(held) == tp and max(held.values()) < sum(ref_held.values()) / tp * 2
            assert runner.cache.k.sharding.spec[2] == "tp"  # (layers, slots, kv_heads, ...)
            down = runner.params["layers"]["mlp"]["down_proj"]["kernel"].get_value()
            assert "tp" in tuple(getattr(down, "qvalue", down).sharding.spec), down
            replicated = recipe == "w4a16-rtn-g128" and tp == 8  # o_proj: 4 groups over 8
            assert len(notes) == replicated and all("o_proj" in n for n in notes), notes
            print(f"{recipe} kv={kv} tp={tp}: NLL rel diff {rel:.1e}, "
                  f"{max(held.values())} of {sum(ref_held.values())} bytes per device")
    print("OK")
    """
)


def test_engine_tensor_parallel_equals_one_device(eight_cpu_devices):
    env = eight_cpu_devices
    out = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (
        out.stdout[-2000:] + out.stderr[-3000:]
    )
