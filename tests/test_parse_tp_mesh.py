"""`jquant.sharding.parse_mesh` (``jquant serve --mesh``) and `jquant.serve.engine_report`
(the line ``jquant serve`` prints about the engine's memory)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from jquant.serve import engine_report
from jquant.sharding import parse_mesh


@pytest.mark.parametrize("text, axes", [("tp=1", {"tp": 1}), (" tp=8 ", {"tp": 8}),
                                        ("tp=02", {"tp": 2}), ("tp=2,ep=4", {"tp": 2, "ep": 4}),
                                        ("tp=1,ep=8", {"tp": 1, "ep": 8})])  # fmt: skip
def test_parse_mesh(text, axes):
    assert parse_mesh(text) == axes


@pytest.mark.parametrize("text", ["tp=0", "dp=2", "tp=2,dp=1", "tp=", "tp=-1", "2", "",
                                  "ep=2", "tp=2,ep=0", "ep=2,tp=2", "tp=2,ep="])  # fmt: skip
def test_parse_mesh_refuses_anything_else(text):
    with pytest.raises(ValueError) as e:
        parse_mesh(text)
    assert str(e.value) == (f"{text!r}: expected tp=N with N >= 1 devices, e.g. tp=2, or "
                            "tp=N,ep=M (MoE experts split over M >= 1), e.g. tp=2,ep=4")


def _engine(mesh, notes=(), held=None):
    runner = types.SimpleNamespace(fmt=types.SimpleNamespace(name="int8"), num_pages=64,
                                   page_size=16, cache=types.SimpleNamespace(nbytes=12_345_678),
                                   weight_bytes=98_765_432,
                                   per_device_bytes=lambda: held)  # fmt: skip
    return types.SimpleNamespace(runner=runner, max_slots=4, max_context=256, mesh=mesh,
                                 tp_notes=list(notes), speculative=None, adapters=None)  # fmt: skip


def test_engine_report_one_line_without_a_mesh():
    assert engine_report(_engine(None)) == (
        "jquant serve: 4 rows, 256 tokens per request, KV cache int8 64 pages x 16 tokens "
        "12.3 MB, weights 98.8 MB")


def _mesh(size):
    return types.SimpleNamespace(devices=types.SimpleNamespace(size=size))


def test_engine_report_per_device_and_replicated_tensors_under_a_mesh():
    held = {"d0": 60_000_000, "d1": 61_000_000}
    report = engine_report(_engine(_mesh(2), ["lm_head/kernel: vocab 49 % 2", "x: y"], held))
    assert report.splitlines() == [
        "jquant serve: 4 rows, 256 tokens per request, KV cache int8 64 pages x 16 tokens "
        "12.3 MB, weights 98.8 MB; tp=2: 61.0 MB per device (2 tensors replicated)",
        "  replicated: lm_head/kernel: vocab 49 % 2",
        "  replicated: x: y",
    ]


def test_engine_report_counts_the_whole_mesh_over_several_processes():
    """Over 2 processes this one holds one of the mesh's 2 devices: tp is the mesh's."""
    report = engine_report(_engine(_mesh(2), [], {"d0": 61_000_000}))
    assert report.endswith("; tp=2: 61.0 MB per device (0 tensors replicated)")


def test_engine_report_names_the_expert_parallel_axis():
    mesh = types.SimpleNamespace(shape={"tp": 2, "ep": 4}, devices=np.zeros((2, 4)))
    report = engine_report(_engine(mesh, [], {"d0": 61_000_000}))
    assert report.endswith("; tp=2,ep=4: 61.0 MB per device (0 tensors replicated)")
