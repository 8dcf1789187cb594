"""Serving over several processes (`jax.distributed`): one engine, every process's devices.

Under JAX's multi-controller runtime every process must run the same compiled programs in
the same order, each on its own devices of the global mesh. Process 0 holds the engine (its
queue, its scheduling, the HTTP server); its runner is wrapped in a `Leader`, which before
each call (`compile`, `prefill`, `decode`, `verify`, `window_nll`) broadcasts the call and its
arguments to the other processes. Those run `follow`: they hold the same `Runner` (the same
model, loaded by each, placed by the same tensor-parallel rules on the same global mesh)
and replay each call as it arrives, so the programs' collectives meet. The results are the
single-process engine's up to float summation order, as under tensor parallelism on one
process.

Calls travel as pickled bytes through `multihost_utils.broadcast_one_to_all` (a length,
then the bytes), which is a collective itself: a follower blocks until process 0 announces
the next call. `Leader.stop` (called by `jquant serve` when it closes) releases them. A
process that dies leaves the others waiting for JAX's collective timeouts.
"""

from __future__ import annotations

import pickle

import jax
import numpy as np

CALLS = ("compile", "prefill", "decode", "verify", "window_nll")
_STOP = "stop"


def _broadcast(payload: bytes | None) -> bytes:
    """``payload`` of process 0, received by every process."""
    from jax.experimental import multihost_utils

    leader = jax.process_index() == 0
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload) if leader else 0)))
    buf = np.frombuffer(payload, np.uint8) if leader else np.zeros(n, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


class Leader:
    """Process 0's runner: each call is announced to the followers, then run here."""

    def __init__(self, runner):
        if jax.process_index() != 0:
            raise ValueError(f"Leader runs on process 0; this is process {jax.process_index()}")
        self.runner = runner
        self.stopped = False
        self.calls = 0  # announced so far

    def __getattr__(self, name):
        attr = getattr(self.runner, name)
        if name not in CALLS:
            return attr

        def announced(*args, **kwargs):
            if self.stopped:
                raise RuntimeError("the followers were stopped; no more calls can run")
            _broadcast(pickle.dumps((name, args, kwargs)))
            self.calls += 1
            return attr(*args, **kwargs)

        return announced

    def stop(self) -> None:
        """Releases the followers (idempotent)."""
        if not self.stopped:
            self.stopped = True
            _broadcast(pickle.dumps((_STOP, (), {})))


def follow(runner) -> int:
    """Replays process 0's calls on this process's ``runner`` until it stops; returns the
    number of calls run."""
    if jax.process_index() == 0:
        raise ValueError("follow runs on processes other than 0 (process 0 leads)")
    calls = 0
    while True:
        name, args, kwargs = pickle.loads(_broadcast(None))
        if name == _STOP:
            return calls
        if name not in CALLS:
            raise ValueError(f"process 0 announced {name!r}; a follower runs {CALLS}")
        getattr(runner, name)(*args, **kwargs)
        calls += 1
