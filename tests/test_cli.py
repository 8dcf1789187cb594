"""The `jquant` command, end to end on a tiny GGUF model written by the test."""

import json

import pytest

from jquant.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    tiny.write_gguf(path, tiny.tensors(tied=True))
    return str(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("hello world, hello there. " * 40)
    return str(path)


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    for name in ("w8a16", "w4a16-rtn-g128", "fp8", "nf4", "mixed"):
        assert name in listed
    assert main(["recipes", "show", "w4a16-rtn-g128"]) == 0
    assert "group_size: 128" in capsys.readouterr().out


def test_bad_recipe_is_one_clear_error(capsys, tiny_model):
    assert main(["recipes", "show", "w3a16-nope"]) == 2
    err = capsys.readouterr().err
    assert "w3a16-nope" in err and err.count("\n") == 1


def test_inspect_reports_quantized_bytes(capsys, tiny_model):
    assert main(["inspect", tiny_model, "--json"]) == 0
    float_bytes = json.loads(capsys.readouterr().out)["weight_bytes"]
    assert main(["inspect", tiny_model, "--recipe", "w8a16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["weight_bytes"] < float_bytes
    assert out["kv_cache_bytes"] == 2 * 2 * 1 * 4096 * 32 * 2  # K/V, layers, batch, ctx, width


def test_eval_json(capsys, tiny_model, text_file):
    args = ["eval", tiny_model, "--text", text_file, "--seq-len", "16", "--max-tokens", "64"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"perplexity", "weight_bytes", "bits_per_weight", "tokens"}
    assert out["tokens"] == (64 // 16) * 15 and out["bits_per_weight"] == 32.0
    assert out["perplexity"] > 1.0
    assert main([*args, "--recipe", "w4a16-rtn-g64", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["weight_bytes"] < out["weight_bytes"] and q["perplexity"] != out["perplexity"]


def test_generate_json(capsys, tiny_model):
    args = ["generate", tiny_model, "--prompt", "hello", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["tokens"]) <= 5 and isinstance(out["text"], str)


def test_compare_table_and_plot(capsys, tiny_model, text_file, tmp_path):
    plot = tmp_path / "cmp.png"
    args = ["compare", tiny_model, "--recipes", "w8a16,nf4", "--text", text_file,
            "--seq-len", "16", "--max-tokens", "64", "--decode-tokens", "3",
            "--plot", str(plot)]
    assert main(args) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["float", "w8a16", "nf4"]
    assert "+0.0%" in rows[1]
    assert plot.stat().st_size > 1000


def test_unknown_model_is_one_clear_error(capsys):
    assert main(["eval", "no-such-model-xyz"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model-xyz" in err
