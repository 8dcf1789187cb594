"""One process of a 2-process served engine (run by `test_lockstep.py`).

    python lockstep_worker.py OUT.json --coordinator HOST:PORT --num-processes N
        --process-id I

Every process loads the same tiny model, quantizes it with each recipe and builds the same
`Engine` over a tensor-parallel mesh of every process's devices. Process 0 leads (its
runner a `jquant.serve.lockstep.Leader`): it serves the prompts greedily, scores the
windows, and writes the tokens, NLLs and the calls it announced to OUT.json.0; the others
follow and write the calls they replayed to OUT.json.I.
"""

import argparse
import json
import sys

import jax

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    args = p.parse_args(argv)
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)  # fmt: skip

    from lockstep_case import RECIPES, WINDOWS, build, serve

    from jquant.serve import lockstep

    results = {}
    for recipe in RECIPES:
        engine = build(recipe, mesh=jax.device_count())
        if jax.process_index() == 0:
            leader = lockstep.Leader(engine.runner)
            engine.runner = leader
            try:
                outs = serve(engine)
                nll = engine.runner.window_nll(WINDOWS)
            finally:
                leader.stop()
            cache_spec = engine.runner.cache.k.sharding.spec  # (layers, slots, kv_heads, ...)
            results[recipe] = {"tokens": outs, "nll": [float(x) for x in nll],
                               "calls": leader.calls, "mesh": engine.mesh.devices.size,
                               "kv_heads_axis": cache_spec[2], "notes": engine.tp_notes}
        else:
            results[recipe] = {"calls": lockstep.follow(engine.runner)}
    with open(f"{args.out}.{jax.process_index()}", "w") as f:
        json.dump(results, f)
    print(f"process {jax.process_index()}: {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
