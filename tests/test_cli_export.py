"""``jquant export``: a model quantized by a recipe, written as compressed-tensors and GPTQ,
evaluates to the perplexity of the model it was written from, loaded back by `jquant eval`
through the importers; what a format cannot hold is refused before anything is written."""

import json

import pytest

from jquant.cli import main


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("hello world, hello there. " * 40)
    return str(path)


def _perplexity(capsys, model, text_file, *more):
    args = ["eval", model, "--text", text_file, "--seq-len", "16", "--max-tokens", "64", "--json"]
    assert main([*args, *more]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gptq-v1"])
def test_export_evaluates_as_the_model_it_was_written_from(capsys, tiny_model, text_file, tmp_path,
                                                           fmt):  # fmt: skip
    # uint4 with zero points in groups of 32 (the tiny model's MLP is 96 wide): GPTQ's
    # format (v1 too: min-max ranges of N(0, 1) weights give every zero point at least 1),
    # compressed-tensors' asymmetric pack-quantized.
    recipe = str(tmp_path / "uint4-g32.yaml")
    (tmp_path / "uint4-g32.yaml").write_text(
        "name: uint4-g32\nrules:\n  - pattern: '(?i)embed'\n    skip: true\n"
        "  - pattern: 'kernel$'\n    weight: uint4\n    group_size: 32\n    clip: minmax\n"
    )
    out = tmp_path / fmt
    assert main(["export", tiny_model, "--recipe", recipe, "--format", fmt, "-o", str(out)]) == 0
    assert f"wrote {out} ({fmt})" in capsys.readouterr().out
    want = _perplexity(capsys, tiny_model, text_file, "--recipe", recipe)
    got = _perplexity(capsys, str(out), text_file)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["bits_per_weight"] < 32.0 and got["weight_bytes"] < 2 * want["weight_bytes"]


def test_export_refuses_a_format_it_cannot_hold(capsys, tiny_model, tmp_path):
    out = tmp_path / "nf4"
    assert main(["export", tiny_model, "--recipe", "nf4", "--format", "gptq", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "GPTQ cannot hold" in err and "nf4" in err and err.count("\n") == 1
    assert not out.exists()


def test_export_gguf_writes_a_file_load_gguf_reads(capsys, tiny_model, text_file, tmp_path):
    """``--format gguf -o FILE``: the gguf-q4_0 model evaluates (read back packed by
    ``--keep-packed``) to the perplexity of the model it was written from."""
    out = tmp_path / "m.gguf"
    args = ["export", tiny_model, "--recipe", "gguf-q4_0", "--format", "gguf", "-o", str(out)]
    assert main(args) == 0
    assert f"wrote {out} (gguf)" in capsys.readouterr().out
    want = _perplexity(capsys, tiny_model, text_file, "--recipe", "gguf-q4_0")
    got = _perplexity(capsys, str(out), text_file, "--keep-packed")
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_export_gguf_refuses_group_64(capsys, tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["export", tiny_model, "--recipe", "w4a16-rtn-g64", "--format", "gguf", "-o",
                 str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "have no GGUF type" in err and "int4 g64 bfloat16 scales: layers/0/" in err
    assert err.count("\n") == 1 and not out.exists()
