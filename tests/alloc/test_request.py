"""`jquant.alloc.request`: candidates by name, the recipe's default name, atomic writing."""

from __future__ import annotations

import pytest

from jquant.alloc import KERNEL_CANDIDATES
from jquant.alloc.request import default_name, select_candidates, write_recipe


def test_select_candidates_keeps_the_given_order_once():
    assert select_candidates(None) is KERNEL_CANDIDATES
    chosen = select_candidates(" int8, uint4-g64,int8 ")
    assert [c.name for c in chosen] == ["int8", "uint4-g64"]
    assert select_candidates(["uint3-g64"]) == (KERNEL_CANDIDATES[0],)


@pytest.mark.parametrize("names, message", [
    ("uint4-g64,int5", "'uint4-g64,int5': unknown int5; known: uint3-g64, uint4-g64"),
    (" , ", "' , ': unknown empty; known: "),
])  # fmt: skip
def test_select_candidates_names_what_is_unknown(names, message):
    with pytest.raises(ValueError) as e:
        select_candidates(names)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("kw, name", [
    (dict(target_bits=4.25), "alloc-4.25bits"),
    (dict(target_bits=4.0, fit="H100", context=8, batch=1), "alloc-4bits"),
    (dict(target_size="1.5 GiB"), "alloc-1.5GiB"),
    (dict(fit="TPU v5e", context=4096, batch=8), "alloc-fit-tpuv5e-4096x8"),
])  # fmt: skip
def test_default_name_follows_the_budget(kw, name):
    assert default_name(**kw) == name


def test_default_name_needs_a_budget():
    with pytest.raises(ValueError, match="no budget"):
        default_name()


def test_write_recipe_replaces_the_file_and_leaves_no_temporary(tmp_path):
    from jquant.recipe import Recipe

    path = tmp_path / "r.yaml"
    path.write_text("old")
    recipe = Recipe.load("w8a16")
    write_recipe(recipe, path)
    assert Recipe.from_yaml(path.read_text()).to_dict() == recipe.to_dict()
    write_recipe("name: x\n", str(path))
    assert path.read_text() == "name: x\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_gguf_candidates_are_what_a_gguf_file_holds(tmp_path, tiny):
    """Every ``--gguf`` candidate maps onto a ggml type, and a model quantized by each one
    (kernels and table) is written by `write_gguf` without refusal."""
    from jquant import io as jio
    from jquant.alloc import GGUF_KERNEL_CANDIDATES, GGUF_TABLE_CANDIDATES
    from jquant.arch import LlamaConfig
    from jquant.io._gguf_types import rule_type
    from jquant.io.gguf_export import write_gguf
    from jquant.models import params_from_hf
    from jquant.recipe import Recipe
    from jquant.transform import quantize

    assert select_candidates(None, gguf=True) is GGUF_KERNEL_CANDIDATES
    assert [c.name for c in select_candidates("uint4-g32,int8-g32", gguf=True)] == [
        "uint4-g32", "int8-g32"]  # fmt: skip
    with pytest.raises(ValueError, match="unknown uint4-g64; known with --gguf: int8-g32"):
        select_candidates("uint4-g64", gguf=True)
    types = {rule_type(dict(c.settings)) for c in GGUF_KERNEL_CANDIDATES + GGUF_TABLE_CANDIDATES}
    assert types == {"Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "F16"}
    ckpt = jio.load_gguf(tiny.write_gguf(tmp_path / "t.gguf", tiny.tensors(tied=True)))
    _, params = params_from_hf(ckpt.tensors, LlamaConfig.from_hf(ckpt.config))
    for kernel, table in zip(GGUF_KERNEL_CANDIDATES, GGUF_TABLE_CANDIDATES):
        settings = {k: v for k, v in kernel.settings.items() if k != "algorithm_args"}
        recipe = Recipe.from_dict({"name": "c", "rules": [
            {"pattern": "embed", **table.settings}, {"pattern": "kernel$", **settings,
                                                     "algorithm": "rtn"}]})  # fmt: skip
        write_gguf(quantize(params, recipe), ckpt.config, None, tmp_path / f"{kernel.name}.gguf")
