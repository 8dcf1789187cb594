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
