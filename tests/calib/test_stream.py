"""`quantize_to_disk`: a checkpoint read lazily, quantized a layer at a time, written as it
goes, resumable; checked against the in-memory quantization of the same model."""

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jquant
from jquant.calib import quantize_model
from jquant.calib.stream import parse_bytes, quantize_to_disk
from jquant.io import packed
from jquant.io.packed import read_packed

RECIPE = "w4a16-gptq-g64"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny):
    """A tiny untied llama GGUF and calibration windows for it."""
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    tiny.write_gguf(path, tiny.tensors(tied=False))
    tokens = np.random.RandomState(0).randint(0, 200, (4, 16))
    return str(path), tokens


def _arrays(directory) -> dict[str, list[np.ndarray]]:
    arrays, _, _ = read_packed(directory)
    return {p: [np.asarray(x) for x in jax.tree.leaves(v)] for p, v in arrays.items()}


def _file_hashes(directory: Path) -> dict[str, str]:
    """Every file's sha256, less the report (it records times) and jquant.json (it records
    the report's hash), plus jquant.json's parameter descriptors."""
    skip = ("report.json", "jquant.json")
    hashes = {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip
    }  # fmt: skip
    meta = json.loads((directory / "jquant.json").read_text())
    hashes["params"] = json.dumps(meta["params"], sort_keys=True)
    return hashes


def test_streamed_checkpoint_equals_the_in_memory_quantization(source, tmp_path):
    path, tokens = source
    out, report = quantize_to_disk(path, RECIPE, tmp_path / "q", tokens=tokens, progress=False)
    model, params, _ = jquant.models.load(path)
    expected, _ = quantize_model(model, params, RECIPE, tokens, progress=False,
                                 micro_batch=report["micro_batch"])  # fmt: skip
    expected = {p: [np.asarray(x) for x in jax.tree.leaves(v)]
                for p, v in jquant.tree.leaves(expected)}  # fmt: skip
    got = _arrays(out)
    assert set(got) == set(expected)
    for p in expected:
        for a, b in zip(got[p], expected[p], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=p)
    assert report["calibrated"] and len(report["rows"]) == 7 * 2 + 1  # and the untied head


def test_data_free_recipe_equals_quantize(source, tmp_path):
    path, _ = source
    out, report = quantize_to_disk(path, "w4a16-rtn-g64", tmp_path / "q", progress=False)
    _, params, _ = jquant.models.load(path)
    expected = dict(jquant.tree.leaves(jquant.quantize(params, "w4a16-rtn-g64")))
    got = _arrays(out)
    for p, v in expected.items():
        for a, b in zip(got[p], jax.tree.leaves(v), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b), err_msg=p)
    assert not report["calibrated"]


class _Killed(Exception):
    pass


def _dies_at(part: str):
    """`PackedWriter.write` that raises (a killed run) when it reaches ``part``."""
    write = packed.PackedWriter.write

    def dying(self, name, arrays):
        if name == part:
            raise _Killed
        return write(self, name, arrays)

    return dying


def test_a_killed_run_resumes_to_the_same_checkpoint(source, tmp_path, monkeypatch):
    path, tokens = source
    whole, _ = quantize_to_disk(path, RECIPE, tmp_path / "whole", tokens=tokens, progress=False)
    write = packed.PackedWriter.write
    monkeypatch.setattr(packed.PackedWriter, "write", _dies_at("layers.00001"))
    target = tmp_path / "resumed"
    with pytest.raises(_Killed):
        quantize_to_disk(path, RECIPE, target, tokens=tokens, progress=False)
    assert not target.exists()  # nothing loadable yet
    with pytest.raises(ValueError):
        jquant.models.load_packed(target)
    monkeypatch.setattr(packed.PackedWriter, "write", write)
    calls = []
    monkeypatch.setattr("jquant.calib.driver._calibrate_layer",
                        _counting(jquant.calib.driver._calibrate_layer, calls))  # fmt: skip
    out, report = quantize_to_disk(path, RECIPE, target, tokens=tokens, progress=False)
    assert report["resumed_layers"] == [0]
    assert len(calls) == 1  # layer 0 was only run, not calibrated again
    assert _file_hashes(out) == _file_hashes(whole)


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_resuming_with_other_calibration_is_refused(source, tmp_path, monkeypatch):
    path, tokens = source

    def dies(self, part, arrays):
        raise _Killed

    monkeypatch.setattr(packed.PackedWriter, "write", dies)
    with pytest.raises(_Killed):
        quantize_to_disk(path, RECIPE, tmp_path / "q", tokens=tokens, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="tokens"):
        quantize_to_disk(path, RECIPE, tmp_path / "q", tokens=tokens[::-1], progress=False)


def test_spilled_activations_give_the_same_checkpoint(source, tmp_path):
    path, tokens = source
    a, _ = quantize_to_disk(path, RECIPE, tmp_path / "a", tokens=tokens, progress=False)
    spill = tmp_path / "spill"
    spill.mkdir()
    b, report = quantize_to_disk(path, RECIPE, tmp_path / "b", tokens=tokens, progress=False,
                                 spill_dir=spill)  # fmt: skip
    assert report["spilled"]
    assert not any(spill.iterdir())  # the spill files are removed at the end
    assert _file_hashes(a) == _file_hashes(b)


def test_a_budget_too_small_is_refused_up_front(source, tmp_path):
    path, tokens = source
    with pytest.raises(ValueError, match=r"at least [\d.]+ GiB is needed"):
        quantize_to_disk(path, RECIPE, tmp_path / "q", tokens=tokens, max_memory="10MB",
                         progress=False)  # fmt: skip
    assert not (tmp_path / "q").exists()
    assert not (tmp_path / ".q.partial").exists()


def test_micro_batches_accumulate_the_statistics_of_the_whole_batch(source):
    """Hessians of 1-window micro-batches equal the whole batch's, up to float rounding:
    the per-layer output errors agree closely and the codes almost everywhere."""
    path, tokens = source
    model, params, _ = jquant.models.load(path)
    one, r1 = quantize_model(model, params, RECIPE, tokens, progress=False, micro_batch=1)
    whole, r4 = quantize_model(model, params, RECIPE, tokens, progress=False, micro_batch=4)
    for a, b in zip(r1.rows, r4.rows, strict=True):
        assert a.output_error == pytest.approx(b.output_error, rel=1e-3)
    codes = [(np.asarray(x.qvalue), np.asarray(y.qvalue))
             for (_, x), (_, y) in zip(jquant.tree.leaves(one), jquant.tree.leaves(whole))
             if isinstance(x, jquant.QArray)]  # fmt: skip
    differ = sum(int(np.sum(x != y)) for x, y in codes) / sum(x.size for x, _ in codes)
    assert differ < 1e-3


@pytest.mark.parametrize("text, value", [("4GB", 4 * 10**9), ("6GiB", 6 * 2**30),
                                         ("512 MiB", 512 * 2**20), ("100", 100)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("four gigs")


def test_report_and_metadata(source, tmp_path):
    path, tokens = source
    out, report = quantize_to_disk(path, RECIPE, tmp_path / "q", tokens=tokens, progress=False)
    stored = json.loads((out / "report.json").read_text())
    assert stored["micro_batch"] == report["micro_batch"] and stored["resumed_layers"] == []
    assert 4 < report["quantized_bits_per_weight"] < 8.1  # int4 g64 kernels, int8 table and head


def test_a_run_killed_after_the_layers_resumes(source, tmp_path, monkeypatch):
    """Killed while writing the parts outside the layers (embedding written, norm not)."""
    path, tokens = source
    whole, _ = quantize_to_disk(path, RECIPE, tmp_path / "whole", tokens=tokens, progress=False)
    write = packed.PackedWriter.write
    monkeypatch.setattr(packed.PackedWriter, "write", _dies_at("norm"))
    with pytest.raises(_Killed):
        quantize_to_disk(path, RECIPE, tmp_path / "r", tokens=tokens, progress=False)
    monkeypatch.setattr(packed.PackedWriter, "write", write)
    out, report = quantize_to_disk(path, RECIPE, tmp_path / "r", tokens=tokens, progress=False)
    assert report["resumed_layers"] == [0, 1]
    assert _file_hashes(out) == _file_hashes(whole)
