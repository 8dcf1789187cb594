"""`jquant quantize`: calibrate, write a packed checkpoint, and use it from every command."""

import json

import numpy as np
import pytest

from jquant import calib, models
from jquant.cli import main
from jquant.eval import perplexity
from jquant.io.packed import is_packed


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    words = " ".join(f"word{i % 37} and {i % 11}, then" for i in range(300))
    path.write_text(words)
    return str(path)


CALIB = ["--calib-samples", "4", "--calib-seq-len", "16"]


def test_quantize_writes_a_checkpoint_that_every_command_reads(
    capsys, tiny_model, text_file, tmp_path
):
    out = tmp_path / "q"
    argv = ["quantize", tiny_model, "--recipe", "w4a16-gptq-g64", "--calib", text_file, *CALIB,
            "-o", str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert is_packed(out) and report["calibrated"] and report["samples"] == 4
    assert 4.0 < report["quantized_bits_per_weight"] < 8.1  # int4 g64 kernels, int8 table
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["rows"]) == 7 * 2 and all(r["algorithm"] == "gptq" for r in saved["rows"])

    # The checkpoint evaluates exactly as the same calibration run in this process.
    model, params, tok = models.load(tiny_model)
    tokens = calib.calibration_tokens(tok, text_file, samples=4, seq_len=16)
    qparams, _ = calib.quantize_model(model, params, "w4a16-gptq-g64", tokens, progress=False)
    want = perplexity(model, qparams, open(text_file).read(), tokenizer=tok, seq_len=16,
                      max_tokens=64, progress=False).perplexity  # fmt: skip
    eval_args = ["eval", str(out), "--text", text_file, "--seq-len", "16", "--max-tokens", "64"]
    assert main([*eval_args, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(want, rel=1e-6)
    assert main(["generate", str(out), "--prompt", "word1", "--max-new-tokens", "3",
                 "--json"]) == 0  # fmt: skip
    assert len(json.loads(capsys.readouterr().out)["tokens"]) >= 1
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_bytes"] == report["weight_bytes"]


def test_a_quantized_checkpoint_refuses_a_second_recipe(capsys, tiny_model, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", tiny_model, "--recipe", "w8a16", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--recipe", "w4a16-rtn-g64"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_existing_output_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    import jquant.models

    monkeypatch.setattr(jquant.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "m", "--recipe", "w8a16", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_too_short_calibration_text_leaves_no_directory(capsys, tiny_model, text_file, tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", tiny_model, "--recipe", "w4a16-gptq-g64", "--calib", text_file,
            "--calib-samples", "5000", "--calib-seq-len", "64", "-o", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "too short for 5000 calibration samples" in err
    assert not out.exists()


def test_calibrated_algorithm_without_calibration_is_one_clear_error():
    import jquant

    params = {"dense": {"kernel": np.ones((64, 8), np.float32)}}
    with pytest.raises(ValueError, match="gptq needs calibration"):
        jquant.quantize(params, "w4a16-gptq-g64")


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "10.0.0.1"], "given alone"),
    (["--coordinator", "10.0.0.1", "--num-processes", "2"], "--coordinator, --num-processes"),
    (["--coordinator", "10.0.0.1", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", ":1234", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is out of range for --num-processes 2 (0 to 1)"),
])  # fmt: skip
def test_bad_multi_process_flags_are_refused_before_anything_starts(
    capsys, monkeypatch, tmp_path, flags, message
):
    import jax

    import jquant.models

    monkeypatch.setattr(jquant.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("joined"))
    argv = ["quantize", "m", "--recipe", "w8a16", "-o", str(tmp_path / "q"), *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_multi_process_flags_join_the_run_and_mesh_every_device(monkeypatch):
    import argparse

    import jax

    from jquant.cli import _args

    joined = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: joined.append((a, k)))
    p = argparse.ArgumentParser()
    _args.add_distributed_args(p)
    place = _args.placement(p.parse_args(["--coordinator", "host:1234", "--num-processes", "1",
                                          "--process-id", "0"]))  # fmt: skip
    assert joined == [(("host:1234",), {"num_processes": 1, "process_id": 0})]
    assert place.mesh.axis_names == ("data",) and place.devices == len(jax.devices())
    place = _args.placement(p.parse_args(["--data-parallel"]))
    assert place.devices == len(jax.local_devices()) and len(joined) == 1
    assert _args.placement(p.parse_args([])).mesh is None
