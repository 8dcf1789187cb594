"""FP4 formats as allocation candidates: named by a request, priced, chosen under a budget
that only they meet, and the recipe they make quantizes within it."""

import json

import pytest
import yaml

from jquant.alloc import FP4_CANDIDATES, KERNEL_CANDIDATES
from jquant.alloc.request import select_candidates
from jquant.cli import main

CALIB = ["--calib-samples", "2", "--calib-seq-len", "16"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path_factory.getbasetemp() / "jq-cache-fp4"))


def test_fp4_are_named_not_default():
    assert [c.name for c in select_candidates("nvfp4,int8,mxfp4")] == ["nvfp4", "int8", "mxfp4"]
    assert select_candidates(None) == KERNEL_CANDIDATES
    assert {c.rule().weight: c.rule().group_size for c in FP4_CANDIDATES} == {
        "mxfp4": 32, "nvfp4": 16}


def test_allocation_chooses_fp4_and_its_recipe_quantizes(capsys, tiny_model, tmp_path):
    """Between mxfp4 (4.25 bits), nvfp4 (4.5) and int8, a 4.6-bit budget leaves the kernels
    FP4: the allocation picks them and `jquant quantize` writes them within its bytes."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 37} and {i % 11}, then" for i in range(300)))
    recipe = tmp_path / "r.yaml"
    code = main(["allocate", tiny_model, "--target-bits", "4.6", "--calib", str(text), *CALIB,
                 "--formats", "mxfp4,nvfp4,int8", "--json", "-o", str(recipe)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    rules = yaml.safe_load(recipe.read_text())["rules"]
    chosen = {r["weight"] for r in rules if "proj" in r["pattern"]}
    assert chosen & {"mxfp4", "nvfp4"}, out["formats"]
    assert out["weight_bytes"] <= out["budget_bytes"]
    assert main(["quantize", tiny_model, "--recipe", str(recipe), "--calib", str(text), *CALIB,
                 "-o", str(tmp_path / "q"), "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["weight_bytes"] == out["weight_bytes"]
