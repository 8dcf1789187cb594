"""Recipe / Rule: parsing, validation messages, matching; the algorithm registry."""

import pytest

from jquant import algorithms
from jquant.recipe import Recipe, Rule

FULL = {
    "name": "full",
    "description": "every field set",
    "require_match": True,
    "experts": {"tokens": "all", "min_token_share": 0.01, "fallback": "hqq"},
    "rules": [
        {"pattern": "embed", "skip": True},
        {
            "pattern": r"layers/\d+/mlp/.*kernel$",
            "weight": "uint4",
            "group_size": 64,
            "scale_dtype": "float16",
            "clip": "minmax",
            "clip_ratio": 0.9,
            "axis": 0,
            "algorithm_args": {"clip_search": {"grid": 10, "max_shrink": 0.3}},
            "min_size": 4096,
        },
        {"pattern": "attn", "weight": "int8", "per_tensor": True, "activation": "int8"},
        {"pattern": "kernel$", "weight": "nf4", "group_size": 64, "double_quant": True},
    ],
}


def test_yaml_round_trip():
    r = Recipe.from_dict(FULL)
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.to_dict() == FULL


def test_to_dict_omits_defaults():
    r = Rule(pattern="x", weight="int8")
    assert r.to_dict() == {"pattern": "x", "weight": "int8"}


def test_load_by_path_from_any_directory(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text(Recipe.from_dict(FULL).to_yaml())
    monkeypatch.chdir(tmp_path)
    assert Recipe.load(path) == Recipe.from_dict(FULL)
    assert Recipe.load(str(path)).name == "full"
    assert Recipe.load("w4a16-rtn-g128").name == "w4a16-rtn-g128"  # shipped, from elsewhere


def test_load_unknown_name_lists_shipped():
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*w8a16"):
        Recipe.load("nope")
    with pytest.raises(ValueError, match="does not exist"):
        Recipe.load("missing/file.yaml")


def test_first_match_wins_and_skip():
    r = Recipe.from_dict(FULL)
    assert r.match("embed_tokens/embedding").skip
    assert r.match("layers/0/mlp/up_proj/kernel").weight == "uint4"
    assert r.match("layers/0/self_attn/q_proj/kernel").weight == "int8"
    assert r.match("head/kernel").weight == "nf4"
    assert r.match("norm/scale") is None
    assert [rule.index for rule in r.rules] == [0, 1, 2, 3]


def test_require_match_names_the_rule():
    r = Recipe.from_dict(FULL)
    r.check_matches(["embed/embedding", "layers/1/mlp/k/kernel", "attn/kernel"])
    with pytest.raises(ValueError, match=r"rules\[2\] \(pattern 'attn'\) matches no parameter"):
        r.check_matches(["embed/embedding", "layers/1/mlp/k/kernel"])


def test_clip_default_follows_format():
    assert Rule(pattern="x", weight="uint4").clip_method == "minmax"
    assert Rule(pattern="x", weight="int4").clip_method == "absmax"
    assert Rule(pattern="x", weight="fp8_e4m3").clip_method == "absmax"


def test_resolve_axis_defaults():
    rule = Rule(pattern="x", weight="int8")
    assert rule.resolve("params/Dense_0/kernel", 2).axis == 0
    assert rule.resolve("embed_tokens/embedding", 2).axis == -1
    assert Rule(pattern="x", weight="int8", axis=1).resolve("a/embedding", 2).axis == 1
    with pytest.raises(ValueError, match="a/kernel.*axis=2 is out of range"):
        Rule(pattern="x", weight="int8", axis=2).resolve("a/kernel", 2)


BAD_RULES = [
    ({"weight": "int8", "colour": "red"}, "unknown key 'colour'; allowed: pattern, skip"),
    ({"pattern": "a(b", "weight": "int8"}, "not a valid regular expression"),
    ({"weight": "int7"}, "unknown qtype 'int7'"),
    ({"weight": "int4", "group_size": 3}, "group_size=3 is invalid for int4"),
    ({"weight": "int4", "group_size": 0}, "group_size=0"),
    ({"weight": "int4", "group_size": 64, "per_tensor": True}, "per_tensor: true excludes"),
    ({"weight": "fp8_e4m3", "clip": "minmax"}, "minmax .asymmetric. is impossible"),
    ({"weight": "int4", "clip": "minmax"}, "minmax .asymmetric. is impossible"),
    ({"weight": "uint4", "clip": "absmax"}, "not supported for the asymmetric format"),
    ({"weight": "int4", "clip": "mse"}, "clip='mse'"),
    ({"weight": "int4", "clip_ratio": 0.0}, r"clip_ratio=0.0 must be a number in \(0, 1\]"),
    ({"weight": "int4", "clip_ratio": 1.5}, "clip_ratio=1.5"),
    ({"weight": "int4", "algorithm": "magic"}, "algorithm='magic' is not registered"),
    ({"weight": "int4", "algorithm_args": {"grid": 3}}, "unknown key.*grid"),
    ({"weight": "int4", "algorithm_args": {"clip_search": {"grid": 0}}}, "grid=0"),
    ({"weight": "int4", "activation": "int4"}, "activation='int4'"),
    ({"weight": "int4", "scale_dtype": "float64"}, "scale_dtype='float64'"),
    ({"weight": "int4", "axis": "0"}, "axis must be an integer"),
    ({"skip": "yes"}, "skip must be true or false"),
    ({"weight": "int4", "min_size": -1}, "min_size"),
    ({}, "weight .a qtype name. is required"),
    ({"skip": True, "weight": "int8"}, "skip: true excludes weight"),
    ({"skip": True, "group_size": 64, "activation": "int8"},
     "skip: true excludes group_size, activation"),
    ({"skip": True, "min_size": 10}, "skip: true excludes min_size"),
    ({"weight": "nf4", "per_tensor": True, "double_quant": True}, "double_quant needs"),
]


@pytest.mark.parametrize("rule, message", BAD_RULES)
def test_bad_rule_names_recipe_rule_and_value(rule, message):
    rule = {"pattern": "mlp/kernel$", **rule}
    d = {"name": "bad", "rules": [{"pattern": "embed", "skip": True}, rule]}
    with pytest.raises(ValueError, match=message) as e:
        Recipe.from_dict(d)
    msg = str(e.value)
    assert "recipe 'bad'" in msg and "rules[1]" in msg and repr(rule["pattern"]) in msg


def test_bad_rule_built_directly_names_pattern():
    with pytest.raises(ValueError, match=r"rule \(pattern 'k'\): .*group_size=3"):
        Rule(pattern="k", weight="int4", group_size=3)


def test_rule_without_pattern():
    with pytest.raises(ValueError, match=r"rules\[0\].*'pattern' is required"):
        Recipe.from_dict({"name": "x", "rules": [{"weight": "int8"}]})


def test_unknown_recipe_key_lists_allowed():
    with pytest.raises(ValueError, match="recipe 'x': unknown key 'rule'; allowed: name, "
                                         "description, rules, require_match"):
        Recipe.from_dict({"name": "x", "rule": []})


@pytest.mark.parametrize("d, message", [
    ({"rules": []}, "'name' is required"),
    ({"name": "x", "rules": {"pattern": "a"}}, "rules must be a list"),
    ({"name": "x", "require_match": "yes", "rules": [{"pattern": "a", "weight": "int8"}]},
     "require_match must be true or false"),
    ({"name": "x"}, "recipe 'x': no rules"),
    ({"name": "x", "rules": None}, "recipe 'x': no rules"),
    ({"name": "x", "rules": []}, "recipe 'x': no rules"),
    ({"name": "x", "require_match": True, "rules": []}, "recipe 'x': no rules"),
    ({"name": "x", "rules": [{"pattern": "a", "skip": True}, {"pattern": "b", "skip": True}]},
     "recipe 'x': every rule is skip: true"),
    ({"name": "x", "experts": {"tokens": "some"}, "rules": [{"pattern": "a", "weight": "int8"}]},
     r"recipe 'x': experts: tokens='some' is not one of \['routed', 'all'\]"),
    ({"name": "x", "experts": {"min_token_share": 1.5}, "rules": [{"pattern": "a",
                                                                   "weight": "int8"}]},
     r"recipe 'x': experts: min_token_share=1.5 must be a number in \[0, 1\)"),
    ({"name": "x", "experts": {"fallback": "gptq"}, "rules": [{"pattern": "a", "weight": "int8"}]},
     r"recipe 'x': experts: fallback='gptq' is not one of \['rtn', 'hqq'\]"),
    ({"name": "x", "experts": {"share": 0.1}, "rules": [{"pattern": "a", "weight": "int8"}]},
     r"recipe 'x': experts: unknown key\(s\) \['share'\]; allowed: tokens, min_token_share"),
    ({"name": "x", "experts": "all", "rules": [{"pattern": "a", "weight": "int8"}]},
     "recipe 'x': experts: expected a mapping"),
])  # fmt: skip
def test_bad_recipe(d, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(d)


def test_registry(monkeypatch):
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))

    @algorithms.register("demo")
    def demo(weight, rule, *, path, calibration=None):
        return weight

    assert algorithms.get("demo") is demo
    assert {"demo", "rtn"} <= set(algorithms.names())
    assert Rule(pattern="x", weight="int8", algorithm="demo", algorithm_args={"a": 1})
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register("demo")(lambda w, r, *, path, calibration=None: w)
    with pytest.raises(ValueError, match="unknown algorithm 'gone'; known: .*rtn"):
        algorithms.get("gone")


@pytest.mark.parametrize("content, message", [
    ("name: x\nrules: [\n  - pattern: a\n", r"is not valid YAML: .* line \d+, column \d+"),
    ("name: x\n\tbad: 1\n", "is not valid YAML"),
    (b"name: \xff\n", "is not UTF-8 text"),
    ("", "is empty"),
    ("- a list\n", "expected a mapping"),
    ("name: x\nrules:\n", "no rules"),
    ("name: x\nrules:\n  - {pattern: a, weight: int7}\n", r"rules\[0\].*unknown qtype"),
])  # fmt: skip
def test_bad_recipe_file_is_a_value_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as e:
        Recipe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_recipe_path_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}.* is a directory"):
        Recipe.load(tmp_path)


def test_from_yaml_bad_yaml_is_a_value_error():
    with pytest.raises(ValueError, match="not valid YAML"):
        Recipe.from_yaml("name: [unclosed\n")
