"""Recipes: which parameters get which format, and by which algorithm.

A :class:`Recipe` is an ordered tuple of :class:`Rule`s. Each rule's ``pattern`` is
a regular expression searched (``re.search``) in a parameter's *path*: the keys
from the tree's root to the leaf joined by ``"/"``, list indices written as numbers,
e.g. ``"params/Dense_0/kernel"`` (Linen) or ``"layers/3/mlp/down_proj/kernel"``
(NNX state, jquant's Llama). The **first** rule that matches decides; a leaf that
no rule matches stays float, and so does every leaf of rank < 2 (biases, norms).

Recipes are plain data: ``Recipe.load("w4a16-rtn-g128")`` reads a shipped YAML file
(``jquant/configs``), ``Recipe.load("my.yaml")`` any other, and
``from_dict`` / ``to_dict`` / ``from_yaml`` / ``to_yaml`` round-trip. Every check
that does not need the weights runs when a rule is built, and its ``ValueError``
names the rule (index and pattern) and the bad key or value.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import yaml

from jquant import algorithms, qtypes
from jquant._moe_settings import ExpertCalibration as ExpertCalibration
from jquant._rotation import KINDS as ROTATION_KINDS
from jquant.qarray import validate_group_size

SCALE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
CLIPS = ("absmax", "minmax")
ACTIVATIONS = (None, "int8", "fp8_e4m3", "fp8_e5m2")


class RuleError(ValueError):
    """A bad rule; the message names the rule (index when known, pattern) and the value."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One line of a recipe: the parameters it matches and what happens to them.

    >>> Rule(pattern=r"mlp/.*/kernel$", weight="int4", group_size=128).clip_method
    'absmax'
    """

    # Regex searched (re.search) in the parameter path, e.g. "layers/3/mlp/down_proj/kernel".
    pattern: str
    # Keep matching parameters in float (first match wins, so a skip rule shields later ones).
    skip: bool = False
    # With skip: store the float parameters in this dtype ("bfloat16", "float16",
    # "float32"); None keeps the dtype they have.
    dtype: str | None = None
    # Format name from jquant.qtypes ("int8", "int4", "uint4", "nf4", "fp8_e4m3", "mxfp4",
    # "nvfp4", ...).
    weight: str | None = None
    # Elements per scale group along the contraction axis; None = one scale per channel.
    # The block-scaled formats take exactly their block: mxfp4 32, nvfp4 16.
    group_size: int | None = None
    # One scale for the whole tensor (excludes group_size).
    per_tensor: bool = False
    # Dtype of stored scales and zero points: "bfloat16", "float16" or "float32"; None =
    # "bfloat16", or what a block-scaled format fixes (mxfp4: E8M0, nvfp4: E4M3 blocks with
    # a float32 per-tensor scale), which takes no other.
    scale_dtype: str | None = None
    # Range statistic: "absmax" (symmetric formats) or "minmax" (uint*); None = the format's.
    clip: str | None = None
    # Shrink factor of the range in (0, 1]; 1.0 keeps the full absmax / min-max.
    clip_ratio: float = 1.0
    # Quantize the scales too (8-bit log-domain codes, QLoRA-style double quantization).
    double_quant: bool = False
    # Contraction axis; None = -1 for a leaf named "embedding" (rows gathered, a tied head
    # contracts features), 1 for an MoE layer's expert stack (E, K, N) (a path through
    # "experts"), else 0 (a Dense kernel (K, N), a DenseGeneral kernel (K, ...)).
    axis: int | None = None
    # Name of a registered algorithm (jquant.algorithms.names()).
    algorithm: str = "rtn"
    # Keyword settings for the algorithm, e.g. {"clip_search": {"grid": 20}} for rtn.
    algorithm_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Dynamic per-token activation format applied by jquant.ops: None (weight-only),
    # "int8", "fp8_e4m3" or "fp8_e5m2".
    activation: str | None = None
    # Leave tensors with fewer elements than this in float.
    min_size: int = 0
    # Position in the recipe, for error messages only (set by Recipe; not serialized).
    index: int | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "algorithm_args", dict(self.algorithm_args or {}))
        if isinstance(self.clip_ratio, int) and not isinstance(self.clip_ratio, bool):
            object.__setattr__(self, "clip_ratio", float(self.clip_ratio))
        self._validate()

    # ---- naming ------------------------------------------------------------------

    @property
    def where(self) -> str:
        """How messages name this rule: ``rules[2] (pattern 'mlp')``."""
        head = "rule" if self.index is None else f"rules[{self.index}]"
        return f"{head} (pattern {self.pattern!r})"

    def _fail(self, message: str):
        raise RuleError(f"{self.where}: {message}")

    # ---- validation ----------------------------------------------------------------

    def _validate(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            self._fail(f"pattern must be a non-empty string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            self._fail(f"pattern is not a valid regular expression: {e}")
        for key in ("skip", "per_tensor", "double_quant"):
            if not isinstance(getattr(self, key), bool):
                self._fail(f"{key} must be true or false, got {getattr(self, key)!r}")
        if not _is_int(self.min_size) or self.min_size < 0:
            self._fail(f"min_size must be a non-negative integer, got {self.min_size!r}")
        if self.skip:
            self._validate_skip()
            return
        self._validate_format()
        self._validate_numerics()
        self._validate_algorithm()

    def _validate_skip(self):
        if self.dtype is not None and self.dtype not in SCALE_DTYPES:
            self._fail(f"dtype={self.dtype!r} is not one of {list(SCALE_DTYPES)}")
        # A skip rule keeps parameters float, so any setting beside it would be ignored.
        ignored = [key for key in self.to_dict() if key not in ("pattern", "skip", "dtype")]
        if ignored:
            self._fail(f"skip: true excludes {', '.join(ignored)} (a skip rule keeps the "
                       "parameters float); drop skip or those keys")

    def _validate_format(self):
        if self.dtype is not None:
            self._fail(f"dtype={self.dtype!r} sets the dtype of float parameters and needs "
                       "skip: true; a quantized parameter's storage is its weight format")
        if self.weight is None:
            self._fail("weight (a qtype name) is required unless skip: true")
        try:
            qt = qtypes.get(self.weight)
        except ValueError as e:
            self._fail(f"weight: {e}")
        if qt.kind == "log":
            self._fail(f"weight: {qt.name} stores double-quantized scales only, not weights")
        if (qt.kind == "vector") != (self.algorithm == "gptvq"):
            self._fail(f"weight: {qt.name} with algorithm={self.algorithm!r}: the vector "
                       "formats (vq2, vq3) are made by algorithm: gptvq, and gptvq makes only them")
        if qt.kind == "vector" and (self.group_size is not None or self.per_tensor
                                    or self.double_quant or self.activation is not None):
            self._fail(f"weight: {qt.name} fixes its codebook tiles {qt.vector_tile} and has no "
                       "scalar scales: drop group_size, per_tensor, double_quant and activation")
        try:
            validate_group_size(qt, self.group_size, name=self.where)
        except ValueError as e:
            raise RuleError(str(e)) from None
        if self.per_tensor and self.group_size is not None:
            self._fail(f"per_tensor: true excludes group_size={self.group_size}; drop one")
        if self.double_quant and self.per_tensor:
            self._fail("double_quant needs per-channel or per-group scales, not per_tensor")
        if qt.block_scale is not None and self.double_quant:
            self._fail(f"double_quant does not apply to {qt.name}: its scales are 8-bit "
                       f"({qt.block_scale}) already")
        if qt.block_scale is not None and self.scale_dtype is not None:
            self._fail(f"scale_dtype={self.scale_dtype!r}: {qt.name} fixes its scales "
                       f"({qt.block_scale}); drop scale_dtype")
        if self.activation not in ACTIVATIONS:
            self._fail(f"activation={self.activation!r} is not one of {list(ACTIVATIONS)}")
        if self.clip is not None and self.clip not in CLIPS:
            self._fail(f"clip={self.clip!r} is not one of {list(CLIPS)}")
        if self.clip is not None and self.clip != _format_clip(qt):
            if self.clip == "minmax":
                self._fail(f"clip=minmax (asymmetric) is impossible for the symmetric format "
                           f"{qt.name}; use a uint* format for min/max with zero points")
            self._fail(f"clip=absmax (symmetric) is not supported for the asymmetric format "
                       f"{qt.name}; use clip: minmax or an int* format")

    def _validate_numerics(self):
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            self._fail(f"scale_dtype={self.scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
        r = self.clip_ratio
        if not isinstance(r, float) or not math.isfinite(r) or not 0.0 < r <= 1.0:
            self._fail(f"clip_ratio={r!r} must be a number in (0, 1]")
        if self.axis is not None and not _is_int(self.axis):
            self._fail(f"axis must be an integer or null, got {self.axis!r}")

    def _validate_algorithm(self):
        if self.algorithm not in algorithms.names():
            self._fail(f"algorithm={self.algorithm!r} is not registered; known: "
                       f"{', '.join(algorithms.names())}")
        if not isinstance(self.algorithm_args, dict):
            self._fail(f"algorithm_args must be a mapping, got {self.algorithm_args!r}")
        try:
            algorithms.check_args(self.algorithm, self.algorithm_args)
        except ValueError as e:
            self._fail(f"algorithm_args for {self.algorithm}: {e}")

    # ---- derived settings ------------------------------------------------------------

    @property
    def format(self) -> qtypes.QType:
        """The weight format (a ``QType``)."""
        return qtypes.get(self.weight)

    @property
    def clip_method(self) -> str:
        """The range statistic in force: ``clip`` or the format's default."""
        return self.clip if self.clip is not None else _format_clip(self.format)

    @property
    def jnp_scale_dtype(self):
        """``scale_dtype`` as a JAX dtype (the format's own for mxfp4 / nvfp4, bfloat16 when
        unset)."""
        if self.format.scale_dtype is not None:
            return jnp.dtype(self.format.scale_dtype)
        return SCALE_DTYPES[self.scale_dtype or "bfloat16"]

    def matches(self, path: str) -> bool:
        """Whether ``pattern`` is found in ``path``."""
        return re.search(self.pattern, path) is not None

    def resolve(self, path: str, ndim: int) -> Rule:
        """This rule with ``axis`` and ``clip`` made concrete for one leaf.

        Algorithms receive resolved rules, so they never guess defaults.

        >>> Rule(pattern="embed", weight="int8").resolve("embed/embedding", 2).axis
        -1
        """
        axis = self.axis
        if axis is None:
            parts = path.split("/")
            if parts[-1] == "embedding":
                axis = -1
            else:  # an MoE layer's expert stack (E, K, N) contracts K; a Dense kernel, axis 0
                axis = ndim - 2 if "experts" in parts and ndim == 3 else 0
        if not -ndim <= axis < ndim:
            raise RuleError(f"{path}: {self.where}: axis={axis} is out of range for a "
                            f"{ndim}-D parameter")
        return dataclasses.replace(self, axis=axis, clip=self.clip_method)

    # ---- (de)serialization ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, index: int | None = None) -> Rule:
        """Builds a rule from a mapping (YAML), rejecting unknown keys.

        >>> Rule.from_dict({"pattern": "kernel$", "weight": "int8"}).weight
        'int8'
        """
        where = "rule" if index is None else f"rules[{index}]"
        if not isinstance(d, Mapping):
            raise RuleError(f"{where}: expected a mapping, got {d!r}")
        where = f"{where} (pattern {d.get('pattern')!r})"
        _check_keys(d, RULE_KEYS, where)
        if "pattern" not in d:
            raise RuleError(f"{where}: 'pattern' is required")
        return cls(**d, index=index)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (``pattern`` always)."""
        out = {"pattern": self.pattern}
        for f in dataclasses.fields(self):
            if f.name in ("pattern", "index"):
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            if value != default:
                out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out


RULE_KEYS = tuple(f.name for f in dataclasses.fields(Rule) if f.name != "index")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered list of rules; the first rule whose pattern matches a path decides.

    >>> r = Recipe.from_dict({"name": "demo", "rules": [
    ...     {"pattern": "embed", "skip": True},
    ...     {"pattern": "kernel$", "weight": "int4", "group_size": 128}]})
    >>> r.match("params/embed/kernel").skip
    True
    """

    # Short name used in reports and the CLI.
    name: str
    # One line saying what the recipe is for.
    description: str = ""
    # Rules in priority order; the first whose pattern matches a path wins. At least one
    # rule must quantize something: a recipe that quantizes nothing is an error, not float.
    rules: tuple[Rule, ...]
    # Raise when a rule's pattern matches no parameter of the tree being quantized.
    require_match: bool = False
    # How calibrated rules treat mixture-of-experts layers' experts (YAML: a mapping with
    # tokens, min_token_share, fallback; see jquant._moe_settings).
    experts: ExpertCalibration = dataclasses.field(default_factory=ExpertCalibration)
    # Rotate the float model before it is quantized or calibrated (`jquant.rotate`):
    # ``{"kind": "hadamard", "seed": 0}``; None: no rotation.
    rotation: Mapping[str, Any] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"recipe: name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.description, str):
            raise ValueError(f"recipe {self.name!r}: description must be a string")
        if not isinstance(self.require_match, bool):
            raise ValueError(f"recipe {self.name!r}: require_match must be true or false")
        if not isinstance(self.experts, ExpertCalibration):
            try:
                experts = ExpertCalibration.from_dict(self.experts)
            except (TypeError, ValueError) as e:
                raise ValueError(f"recipe {self.name!r}: {e}") from None
            object.__setattr__(self, "experts", experts)
        if self.rotation is not None:
            object.__setattr__(self, "rotation", _rotation(self.rotation, self.name))
        if isinstance(self.rules, Mapping) or not isinstance(self.rules, list | tuple):
            raise ValueError(f"recipe {self.name!r}: rules must be a list, got {self.rules!r}")
        rules = []
        for i, rule in enumerate(self.rules):
            try:
                if isinstance(rule, Rule):
                    rule = rule if rule.index == i else dataclasses.replace(rule, index=i)
                else:
                    rule = Rule.from_dict(rule, index=i)
            except RuleError as e:
                raise RuleError(f"recipe {self.name!r}: {e}") from None
            rules.append(rule)
        if not rules:
            raise ValueError(f"recipe {self.name!r}: no rules; give at least one rule under "
                             "'rules' (no recipe at all means float)")
        if all(rule.skip for rule in rules):
            raise ValueError(f"recipe {self.name!r}: every rule is skip: true, so it would "
                             "quantize nothing; add a rule with a weight format")
        object.__setattr__(self, "rules", tuple(rules))

    # ---- matching ------------------------------------------------------------------

    def match(self, path: str) -> Rule | None:
        """The first rule whose pattern is found in ``path``, or None."""
        return next((r for r in self.rules if r.matches(path)), None)

    def check_matches(self, paths) -> None:
        """With ``require_match``, raises if some rule's pattern matches none of ``paths``."""
        if not self.require_match:
            return
        paths = list(paths)
        for rule in self.rules:
            if not any(rule.matches(p) for p in paths):
                raise RuleError(
                    f"recipe {self.name!r}: {rule.where} matches no parameter "
                    f"(require_match is on); {len(paths)} paths, e.g. {paths[:3]}"
                )

    # ---- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """Builds a recipe from a mapping, rejecting unknown keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"recipe: expected a mapping, got {type(d).__name__}")
        _check_keys(d, RECIPE_KEYS, f"recipe {d.get('name')!r}")
        if "name" not in d:
            raise ValueError("recipe: 'name' is required")
        rules = d.get("rules") or ()
        return cls(**{**d, "rules": tuple(rules) if isinstance(rules, list) else rules})

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        """Parses a recipe from YAML text.

        Raises:
          ValueError: the text is not valid YAML, or not a valid recipe.
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe: not valid YAML: {_yaml_problem(e)}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> Recipe:
        """A shipped recipe by name (``"w4a16-rtn-g128"``) or a YAML file by path.

        >>> Recipe.load("w8a16").rules[-1].weight
        'int8'
        """
        text = os.fspath(name_or_path)
        if os.path.exists(text) or text.endswith((".yaml", ".yml")) or os.sep in text:
            return cls._load_file(text)
        resource = _configs() / f"{text}.yaml"
        if not resource.is_file():
            raise ValueError(
                f"unknown recipe {text!r}: not a file and not a shipped recipe "
                f"({', '.join(cls.list_shipped())})"
            )
        return cls.from_yaml(resource.read_text(encoding="utf-8"))

    @classmethod
    def _load_file(cls, path: str) -> Recipe:
        """A recipe from a YAML file; every error is one ValueError line naming the file."""
        where = f"recipe file {path!r}"
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise ValueError(f"{where} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"{where} is a directory; give a .yaml file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text (byte {e.start}: {e.reason}); "
                             "is it a recipe?") from None
        except OSError as e:
            raise ValueError(f"{where} cannot be read: {e.strerror or e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{where} is not valid YAML: {_yaml_problem(e)}") from None
        if data is None:
            raise ValueError(f"{where} is empty; a recipe needs 'name' and 'rules'")
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a mapping with 'name' and 'rules', "
                             f"got a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise type(e)(f"{where}: {e}") from None

    @staticmethod
    def list_shipped() -> list[str]:
        """Names of the recipes shipped in ``jquant/configs``, sorted."""
        return sorted(p.name[: -len(".yaml")] for p in _configs().iterdir()
                      if p.name.endswith(".yaml"))

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that :meth:`from_dict` turns back into an equal recipe."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        if self.require_match:
            out["require_match"] = True
        if self.experts.to_dict():
            out["experts"] = self.experts.to_dict()
        if self.rotation is not None:
            out["rotation"] = dict(self.rotation)
        out["rules"] = [r.to_dict() for r in self.rules]
        return out

    def to_yaml(self) -> str:
        """YAML text that :meth:`from_yaml` turns back into an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RECIPE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe))


def _configs():
    return importlib.resources.files("jquant.configs")


def _format_clip(qt: qtypes.QType) -> str:
    return "minmax" if qt.asymmetric else "absmax"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from PyYAML's multi-line message: the problem and where (1-based)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


ROTATION_KEYS = ("kind", "seed")


def _rotation(value, name: str) -> dict[str, Any]:
    """A recipe's ``rotation`` entry checked, with its defaults filled in."""
    where = f"recipe {name!r}: rotation"
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping like {{kind: hadamard, seed: 0}}, "
                         f"got {value!r}")  # fmt: skip
    _check_keys(value, ROTATION_KEYS, where)
    out = {"kind": value.get("kind", "hadamard"), "seed": value.get("seed", 0)}
    if out["kind"] not in ROTATION_KINDS:
        raise ValueError(f"{where}: kind={out['kind']!r} is not supported; supported: "
                         f"{', '.join(ROTATION_KINDS)}")  # fmt: skip
    if not _is_int(out["seed"]) or out["seed"] < 0:
        raise ValueError(f"{where}: seed={out['seed']!r} must be an int >= 0")
    return out


def _check_keys(d: Mapping, allowed: tuple[str, ...], where: str):
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise RuleError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )
