"""The `jquant` command, end to end on a tiny GGUF model written by the test."""

import json
import math

import pytest

from jquant.cli import main


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


def test_eval_through_the_kv_cache(capsys, tiny_model, text_file):
    args = ["eval", tiny_model, "--text", text_file, "--seq-len", "16", "--max-tokens", "64",
            "--json"]  # fmt: skip
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--kv-cache", "none"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert none["kv_cache"] == "none" and none["tokens"] == plain["tokens"]
    assert none["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-5)
    assert main([*args, "--kv-cache", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["perplexity"] != none["perplexity"]
    # A random model: the per-token NLL (log perplexity) moves by a few percent at most.
    assert math.log(int8["perplexity"]) == pytest.approx(math.log(none["perplexity"]), rel=0.05)
    assert main([*args[:-1], "--kv-cache", "int8"]) == 0
    assert "KV cache int8" in capsys.readouterr().out


def test_generate_json(capsys, tiny_model):
    args = ["generate", tiny_model, "--prompt", "hello", "--max-new-tokens", "5", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert 1 <= len(out["tokens"]) <= 5 and isinstance(out["text"], str)


# (add_bos_token, flags, prompt): raw prompts, one already written with BOS (<|im_start|> is
# the tiny vocabulary's BOS), and chat prompts.
@pytest.mark.parametrize("add_bos, argv, prompt", [
    (False, ["--raw"], "hello"), (True, ["--raw"], "hello"),
    (True, ["--raw"], "<|im_start|>hello"), (True, [], "hello"), (True, [], "<|im_start|>hello"),
])  # fmt: skip
def test_generate_prompt_starts_with_bos_iff_the_tokenizer_says(
    capsys, monkeypatch, tmp_path, tiny, add_bos, argv, prompt
):
    import jquant.models
    from jquant.io import load_gguf

    path = tiny.write_gguf(tmp_path / "m.gguf", tiny.tensors(tied=True), add_bos=add_bos)
    tok = load_gguf(path).tokenizer  # BOS is <|im_start|>, id 1, which the template writes
    seen, real = [], jquant.models.generate

    def spy(model, params, prompts, **kw):
        seen.extend(prompts)
        return real(model, params, prompts, **kw)

    monkeypatch.setattr(jquant.models, "generate", spy)
    assert main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "2", "--json",
                 *argv]) == 0  # fmt: skip
    capsys.readouterr()
    [ids] = seen
    text = tok.encode("hello", add_special_tokens=False)
    if argv:  # raw: exactly one BOS iff add_bos_token
        assert ids == ([1] if add_bos else []) + text
    else:  # chat: the template's rendering only
        messages = [{"role": "user", "content": prompt}]
        assert ids == tok.apply_chat_template(messages, tokenize=True) and ids[:2] != [1, 1]


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


# --- bad input: checked before the model loads, one line, exit status 2 ------------------------


@pytest.fixture
def no_load(monkeypatch):
    """Replaces the model loader with one that records calls: bad arguments must not reach it."""
    import jquant.models

    calls = []

    def load(source, **kwargs):
        calls.append(source)
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(jquant.models, "load", load)
    return calls


def _one_line_error(capsys, argv, *expected):
    """Runs `main(argv)`; asserts exit status 2 and one stderr line containing `expected`."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors (the usage line comes first)
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jquant") and "error:" in last, err
    for text in expected:
        assert text in last, err
    assert "Traceback" not in err
    return last


@pytest.mark.parametrize("argv, expected", [
    (["eval", "m", "--max-tokens", "-1"], ["--max-tokens", "-1"]),
    (["eval", "m", "--max-tokens", "0"], ["--max-tokens", "0"]),
    (["eval", "m", "--seq-len", "1"], ["--seq-len", "1"]),
    (["eval", "m", "--batch-size", "0"], ["--batch-size", "0"]),
    (["eval", "m", "--seq-len", "512", "--max-tokens", "100"], ["--max-tokens 100", "512"]),
    (["inspect", "m", "--batch", "0"], ["--batch", "0"]),
    (["inspect", "m", "--context", "-5"], ["--context", "-5"]),
    (["inspect", "m", "--kv-cache", "int3"], ["int3"]),
    (["generate", "m", "--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    (["generate", "m", "--prompt", "hi", "--temperature", "-1"], ["--temperature", "-1"]),
    (["generate", "m", "--prompt", "hi", "--top-p", "0"], ["--top-p", "0"]),
    (["generate", "m", "--prompt", "hi", "--top-k", "-2"], ["--top-k", "-2"]),
    (["compare", "m", "--decode-tokens", "-1"], ["--decode-tokens", "-1"]),
    (["compare", "m", "--recipes", " , "], ["--recipes"]),
    (["compare", "m", "--plot", "/no/such/dir/p.png"], ["/no/such/dir"]),
    (["eval", "m", "--recipe", "w3a16-nope"], ["w3a16-nope"]),
    (["inspect", "m", "--recipe", "w3a16-nope"], ["w3a16-nope"]),
    (["generate", "m", "--prompt", "hi", "--recipe", "w3a16-nope"], ["w3a16-nope"]),
    (["eval", "m", "--text", "/no/such/text.txt"], ["/no/such/text.txt"]),
    (["eval", "m", "--corpus", "no-such-corpus"], ["no-such-corpus"]),
])  # fmt: skip
def test_bad_arguments_fail_before_the_model_loads(capsys, no_load, argv, expected):
    _one_line_error(capsys, argv, *expected)
    assert no_load == []


@pytest.mark.parametrize("text, expected", [
    ("name: x\nrules: [\n  - pattern: a\n", "not valid YAML"),
    ("name: x\n\tbad: 1\n", "not valid YAML"),
    (b"name: \xff\xfe\n", "not UTF-8"),
    ("", "is empty"),
    ("- just\n- a list\n", "mapping"),
    ("name: x\nrules:\n", "rules"),
])  # fmt: skip
def test_bad_recipe_file_is_one_line(capsys, no_load, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _one_line_error(capsys, ["eval", "m", "--recipe", str(path)], str(path), expected)
    _one_line_error(capsys, ["recipes", "show", str(path)], str(path), expected)


def test_recipe_directory_is_one_line(capsys, no_load, tmp_path):
    (tmp_path / "d.yaml").mkdir()
    _one_line_error(capsys, ["recipes", "show", str(tmp_path / "d.yaml")], "d.yaml", "directory")


def test_unfetchable_hub_id_is_one_line(capsys, monkeypatch):
    from jquant.io import registry

    def offline(repo_id, *, tokenizer=True, lazy=False):
        raise OSError(f"could not fetch {repo_id!r} from the Hugging Face hub (no network)")

    monkeypatch.setattr(registry, "load_hub", offline)
    _one_line_error(capsys, ["eval", "someorg/some-model"], "someorg/some-model", "no network")


@pytest.mark.parametrize("source", ["./models/x", "models/missing.gguf", "../x/y", "~/nope/m"])
def test_missing_path_is_not_a_hub_id(capsys, monkeypatch, tmp_path, source):
    from jquant.io import registry

    def hub(repo_id, *, tokenizer=True):
        raise AssertionError(f"{repo_id!r} was taken for a hub id")

    monkeypatch.setattr(registry, "load_hub", hub)
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["eval", source], "no such file or directory", source)


def test_unsupported_gguf_architecture_is_one_line(capsys, tmp_path, tiny):
    path = tiny.write_gguf(tmp_path / "f.gguf", tiny.tensors(), arch="falcon")
    _one_line_error(capsys, ["inspect", str(path)], "architecture 'falcon' is not supported")
