"""Expert parallelism in the serving engine: MoE expert stacks split over a mesh axis "ep"
beside "tp" (`jquant._expert_parallel`).

On 8 CPU devices (a subprocess), a Qwen3-MoE with a dense first layer (layers unrolled) and
a Qwen2-MoE with a shared expert (layers stacked under one scan), float and
w4a16-rtn-g128, give the single-device engine's greedy tokens, and its token log-probs and
window NLLs up to float summation order, on (tp=2, ep=4) and (tp=1, ep=8) meshes (each
model on both, each recipe on at least one). The
single-device MoE forward is itself checked against transformers in
tests/models/test_moe.py. Each device holds 1/ep of the expert bytes (1/(tp * ep) where tp
splits the hidden units), and no decode step all-gathers an expert stack (what GSPMD does
when the experts are split but the layer does not run expert parallel).
"""

import re
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

import jquant
from jquant._expert_parallel import expert_specs, hidden_axis, stack_specs

_RUN = textwrap.dedent(
    """
    import re, threading
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    import jquant
    from jquant.models import LlamaConfig, init_model
    from jquant.serve.engine import Engine, SamplingParams
    from jquant.sharding import per_device_bytes

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    assert jax.device_count() == 8
    DEVICES = np.array(jax.devices())

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(0x30 + i % 64) for i in ids)

    # 8 experts of F=256 (down_proj: 2 int4 groups of 128, so tp=2 splits F too), top-2.
    COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=128,
                  num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256)
    MODELS = {
        "qwen3_moe-mixed": LlamaConfig(**COMMON, model_type="qwen3_moe", qk_norm=True,
                                       norm_topk_prob=True, moe_layers=(1,)),
        "qwen2_moe-shared": LlamaConfig(**COMMON, model_type="qwen2_moe", qkv_bias=True,
                                        norm_topk_prob=False, moe_layers=(0, 1),
                                        shared_expert_intermediate_size=160),
    }
    # Each model on both meshes, float on one and int4 on the other where not both (time).
    MESHES = {("qwen3_moe-mixed", "float"): ((2, 4), (1, 8)),
              ("qwen3_moe-mixed", "w4a16-rtn-g128"): ((2, 4),),
              ("qwen2_moe-shared", "float"): ((1, 8),),
              ("qwen2_moe-shared", "w4a16-rtn-g128"): ((2, 4), (1, 8))}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 23)]
    windows = rng.integers(0, 256, (2, 48))
    RTOL = 1e-5  # float32 throughout: only the order of float sums differs
    # Token log-probs, absolute: logits reach ~30 here, and tensor parallelism alone (tp=2,
    # no ep) moves them by 1.4e-4 (measured), tp=1 ep=8 by 0.
    LP_ATOL = 5e-4

    def run(model, q, mesh):
        eng = Engine(model, q, Letters(), max_slots=2, max_context=64, prefill_chunk=16,
                     mesh=mesh)
        outs = [None] * len(prompts)
        with eng:
            def go(i):
                outs[i] = eng.generate(prompts[i], SamplingParams(
                    max_tokens=10, temperature=0, ignore_eos=True, logprobs=0))
            threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
            [t.start() for t in threads]
            [t.join() for t in threads]
        return ([o.token_ids for o in outs], np.array([o.logprobs for o in outs]),
                eng.runner.window_nll(windows), eng)

    def expert_stacks(params):  # float stacks or QArrays, as the runner holds them
        return [v for path, v in jax.tree_util.tree_leaves_with_path(
                    params, is_leaf=lambda v: isinstance(v, jquant.QArray))
                if "experts" in jax.tree_util.keystr(path)]

    def gathered_sizes(eng):
        r = eng.runner
        text = r._program(1, 1, r.width_buckets[0]).as_text()  # one decode step, compiled
        return [int(np.prod([int(d) for d in dims.split(",") if d]))
                for dims in re.findall(r"= \\w+\\[([0-9,]*)\\][^=]*? all-gather\\(", text)]

    worst = 0.0
    for name, cfg in MODELS.items():
        model = init_model(cfg, seed=0)
        # Weights x8: routers spread over the experts, greedy tokens vary.
        state = jax.tree.map(lambda x: x * 8, nnx.state(model, nnx.Param))
        for recipe in ("float", "w4a16-rtn-g128"):
            q = state if recipe == "float" else jquant.quantize(state, recipe)
            ref, ref_lp, ref_nll, _ = run(model, q, None)
            assert len({tuple(o) for o in ref}) == len(prompts), ref
            for tp, ep in MESHES[name, recipe]:
                mesh = Mesh(DEVICES.reshape(tp, ep), ("tp", "ep"))
                outs, lp, nll, eng = run(model, q, mesh)
                assert outs == ref, (name, recipe, tp, ep, outs, ref)
                d_lp = float(np.max(np.abs(lp - ref_lp)))
                rel = float(np.max(np.abs(nll - ref_nll) / np.abs(ref_nll)))
                assert d_lp <= LP_ATOL and rel <= RTOL, (name, recipe, tp, ep, d_lp, rel)
                worst = max(worst, rel)
                # Every device holds 1/ep of each expert stack (1/(tp*ep): F split too).
                stacks = expert_stacks(eng.runner.params)
                total = sum(x.nbytes for x in jax.tree.leaves(stacks))
                held = per_device_bytes(stacks)
                assert len(held) == 8 and set(held.values()) == {total // (tp * ep)}, held
                # No all-gather as large as one layer's local share of an expert stack.
                layers = cfg.num_layers if eng.runner.stacked else 1
                smallest = min(getattr(x, "qvalue", x).addressable_shards[0].data.size
                               for x in stacks) // layers
                big = [n for n in gathered_sizes(eng) if n >= smallest]
                assert not big, (name, recipe, tp, ep, big, smallest)
                print(f"{name} {recipe} tp={tp} ep={ep}: tokens equal, logprob diff "
                      f"{d_lp:.1e}, NLL rel diff {rel:.1e}, {max(held.values())} of {total} "
                      f"expert bytes per device")
    # E=8 experts over ep=3 devices: refused, naming the stack.
    model = init_model(MODELS["qwen2_moe-shared"], seed=0)
    try:
        Engine(model, nnx.state(model, nnx.Param), Letters(), max_slots=2, max_context=32,
               mesh=Mesh(DEVICES[:6].reshape(2, 3), ("tp", "ep")))
    except ValueError as e:
        assert re.search(r"^layers/mlp/experts/\\w+/kernel .*E=8 .*ep=3", str(e)), e
    else:
        raise AssertionError("E=8 over ep=3 was accepted")
    print(f"worst NLL rel diff {worst:.1e}")
    print("OK")
    """
)


def test_engine_expert_parallel_equals_one_device(eight_cpu_devices):
    out = subprocess.run([sys.executable, "-c", _RUN], env=eight_cpu_devices,
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    print(out.stdout)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), (
        out.stdout[-2000:] + out.stderr[-3000:]
    )


# ---- the placement rules, without devices ------------------------------------------------


def _layer(e=8, d=128, f=256, quantize=None):
    stacks = {"gate_proj": (e, d, f), "up_proj": (e, d, f), "down_proj": (e, f, d)}
    out = {}
    for name, shape in stacks.items():
        w = jax.numpy.ones(shape, jax.numpy.float32)
        if quantize:
            w = jquant.quantize_array(w, quantize, group_size=128, axis=1)
        out[name] = {"kernel": w}
    return {"mlp": {"experts": out, "gate": {"weight": jax.numpy.ones((e, d))}}}


def test_stack_specs_split_every_storage_leaf_on_the_expert_axis():
    """int4 g128: codes (E, N, K/2), scales and zero points (E, N, G) all on "ep"; with F
    split over tp, gate/up's N and down's K (2 groups over 2) and its scales' group axis."""
    layer = _layer(quantize="uint4")
    gate, up, down = (layer["mlp"]["experts"][n]["kernel"] for n in
                      ("gate_proj", "up_proj", "down_proj"))  # fmt: skip
    assert hidden_axis(gate, up, down, 2) == "tp" and hidden_axis(gate, up, down, 4) is None
    s = stack_specs(gate, "gate_proj", "tp", 2)
    assert (s.qvalue, s.scale, s.zero_point) == (P("ep", "tp", None),) * 3
    s = stack_specs(down, "down_proj", "tp", 2)
    assert (s.qvalue, s.scale, s.zero_point) == (P("ep", None, "tp"),) * 3
    s = stack_specs(down, "down_proj", None, 4)
    assert s.qvalue == P("ep", None, None)
    assert stack_specs(jax.numpy.ones((3, 8, 4, 6)), "up_proj", None, 1, lead=1) == P(
        None, "ep", None, None)


def test_expert_specs_leave_the_rest_and_refuse_an_uneven_split():
    params = {"layers": {"0": _layer(e=6)}}
    specs = jax.tree.map(lambda _: P(), params)
    got, notes = expert_specs(params, specs, 2, 1)
    assert got["layers"]["0"]["mlp"]["experts"]["down_proj"]["kernel"] == P("ep", None, None)
    assert got["layers"]["0"]["mlp"]["gate"]["weight"] == P() and notes == []
    _, notes = expert_specs(params, specs, 2, 3)  # F=256 does not split over tp=3
    assert len(notes) == 3 and all("not split over tp=3" in n for n in notes), notes
    with pytest.raises(ValueError, match=re.escape("layers/0/mlp/experts/down_proj/kernel "
                                                   "(6, 256, 128): E=6 experts do not split "
                                                   "over ep=4")):  # fmt: skip
        expert_specs(params, specs, 4, 1)
