"""`jquant allocate`: a budget in, a recipe out, that `jquant quantize` runs within it."""

import json

import pytest
import yaml

from jquant.cli import main

CALIB = ["--calib-samples", "2", "--calib-seq-len", "16"]
FORMATS = ["--formats", "uint4-g64,int8"]  # two candidates keep the pricing quick


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(" ".join(f"word{i % 37} and {i % 11}, then" for i in range(300)))
    return str(path)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path_factory.getbasetemp() / "jq-cache"))


def _allocate(capsys, model, text, *budget, extra=()):
    code = main(["allocate", model, *budget, "--calib", text, *CALIB, *FORMATS, "--json",
                 *extra])  # fmt: skip
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_allocated_recipe_quantizes_within_its_budget(capsys, tiny_model, text_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    code, out = _allocate(capsys, tiny_model, text_file, "--target-bits", "6",
                          extra=["-o", str(recipe)])  # fmt: skip
    assert code == 0, out
    rules = yaml.safe_load(recipe.read_text())["rules"]
    # One anchored rule per kernel (7 per layer, 2 layers) and two for the tied table.
    assert len(rules) == 7 * 2 + 2
    assert all(r["pattern"].startswith("^") and r["pattern"].endswith("$") for r in rules)
    assert out["weight_bytes"] <= out["budget_bytes"]
    assert out["active_bytes"] == out["weight_bytes"]  # no experts: a token reads every weight
    assert out["bits_per_weight"] <= 6.0
    q = tmp_path / "q"
    assert main(["quantize", tiny_model, "--recipe", str(recipe), "--calib", text_file, *CALIB,
                 "-o", str(q), "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["weight_bytes"] == out["weight_bytes"]  # the allocator's bytes are real
    # A second budget reuses the priced table (no new measurement is needed to answer).
    code, out8 = _allocate(capsys, tiny_model, text_file, "--target-bits", "8")
    assert code == 0 and out8["predicted_delta_percent"] <= out["predicted_delta_percent"]


def test_fit_gives_a_model_the_memory_report_says_fits(capsys, tiny_model, text_file, tmp_path):
    recipe = tmp_path / "fit.yaml"
    code, out = _allocate(capsys, tiny_model, text_file, "--fit", "L4", "--context", "64",
                          "--batch", "2", extra=["-o", str(recipe)])  # fmt: skip
    assert code == 0, out
    q = tmp_path / "q"
    assert main(["quantize", tiny_model, "--recipe", str(recipe), "--calib", text_file, *CALIB,
                 "-o", str(q)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["inspect", str(q), "--context", "64", "--batch", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits_on"]["L4 24GB"]


@pytest.mark.parametrize(
    "budget,message",
    [
        (["--fit", "TPU v5e", "--context", "100000000", "--batch", "64"],
         r"nothing fits on TPU v5e \(16GB/chip\).*GB over"),
        (["--target-bits", "1"], r"below the smallest model.*bits per weight.*short"),
        (["--target-size", "100MB", "--target-bits", "4"], r"exactly one of --target-bits"),
        (["--fit", "H300", "--context", "8", "--batch", "1"], r"'H300' is not a known device"),
        (["--target-size", "ten MB"], r"size 'ten MB'"),
        (["--fit", "H100"], r"--fit needs --context and --batch"),
    ],
)  # fmt: skip
def test_bad_budget_is_one_clear_error(capsys, tiny_model, text_file, budget, message):
    import re

    code, err = _allocate(capsys, tiny_model, text_file, *budget)
    assert code == 2
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1


def test_unknown_format_is_one_clear_error(capsys, tiny_model, text_file):
    code, err = _allocate(capsys, tiny_model, text_file, "--target-bits", "4",
                          extra=["--formats", "uint4-g64,int5"])  # fmt: skip
    assert code == 2 and "--formats 'uint4-g64,int5': unknown int5; known: uint3-g64" in err


def test_gguf_allocation_exports_as_gguf(capsys, tiny_model, text_file, tmp_path):
    """``--gguf``: the recipe chooses among GGUF's block formats only, and the model it
    quantizes is written by ``jquant export --format gguf`` (no tensor refused)."""
    recipe, q, out = tmp_path / "r.yaml", tmp_path / "q", tmp_path / "m.gguf"
    assert main(["allocate", tiny_model, "--target-bits", "6", "--calib", text_file, *CALIB,
                 "--gguf", "--formats", "uint4-g32,int8-g32", "--json", "-o",
                 str(recipe)]) == 0  # fmt: skip
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert set(choice.values()) <= {"uint4-g32", "int8-g32", "int4-g32", "int5-g32",
                                    "uint5-g32", "float16"}  # fmt: skip
    assert main(["quantize", tiny_model, "--recipe", str(recipe), "--calib", text_file, *CALIB,
                 "-o", str(q)]) == 0  # fmt: skip
    assert main(["export", str(q), "--format", "gguf", "-o", str(out)]) == 0
    assert f"wrote {out} (gguf)" in capsys.readouterr().out
