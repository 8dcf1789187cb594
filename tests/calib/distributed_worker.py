"""One process of a data-parallel `quantize_to_disk` (run by `test_distributed.py`).

    python distributed_worker.py GGUF TOKENS.npy --run RECIPE OUTPUT [--run ...]
        [--data-parallel | --coordinator HOST:PORT --num-processes N --process-id I]
        [--die-at PART] [--perplexity OUT.json]

Each ``--run`` quantizes the GGUF with a recipe into a packed checkpoint, one after the other
in the same process (one start-up and one `jax.distributed` session for all of them). The
placement comes from `jquant quantize`'s own flags (`jquant.cli._args.placement`): a mesh
over every process's devices, over this process's devices, or none. With ``--die-at PART``
process 0 exits at once, as a killed process does, when the first run's writer is about to
write PART. Each run's report (rows, micro-batch, resumed layers) goes to
``OUTPUT.report-<process>.json``. ``--perplexity`` then scores the first run's checkpoint
over the same placement on the calibration tokens (windows of 7, 4 per call: the last call
is padded) and writes the result (on process 0).
"""

import argparse
import json
import os
import sys
import time

import jax

jax.config.update("jax_platforms", "cpu")


def main(argv=None) -> int:
    import numpy as np

    from jquant.calib.stream import quantize_to_disk
    from jquant.cli import _args
    from jquant.io import packed

    p = argparse.ArgumentParser()
    p.add_argument("gguf")
    p.add_argument("tokens")
    p.add_argument("--run", nargs=2, action="append", metavar=("RECIPE", "OUTPUT"),
                   required=True)  # fmt: skip
    p.add_argument("--die-at")
    p.add_argument("--perplexity")
    _args.add_distributed_args(p)
    args = p.parse_args(argv)

    place = _args.placement(args)
    tokens = np.load(args.tokens)
    write = packed.PackedWriter.write
    for n, (recipe, output) in enumerate(args.run):
        if args.die_at and n == 0:

            def dies(self, part, arrays):
                if part == args.die_at:
                    os._exit(3)  # no cleanup, no goodbye to the other processes: a kill
                return write(self, part, arrays)

            packed.PackedWriter.write = dies
        else:
            packed.PackedWriter.write = write
        t0 = time.perf_counter()
        _, report = quantize_to_disk(args.gguf, recipe, output, tokens=tokens, placement=place,
                                     progress=False)  # fmt: skip
        print(f"{recipe}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with open(f"{output}.report-{place.process}.json", "w") as f:
            keys = ("rows", "micro_batch", "resumed_layers")
            json.dump({k: report[k] for k in keys}, f)
    if args.perplexity:
        import dataclasses

        from jquant.eval import perplexity
        from jquant.models import load

        model, params, _ = load(args.run[0][1])
        result = perplexity(model, params, tokens.reshape(-1), seq_len=7, batch_size=4,
                            progress=False, placement=place)  # fmt: skip
        if place.process == 0:
            with open(args.perplexity, "w") as f:
                json.dump(dataclasses.asdict(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
