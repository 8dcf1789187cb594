"""``quantize``: the tree rewrite from float parameters to QArrays.

``quantize(params, recipe)`` walks any parameter tree — a Flax Linen param dict
(``{"params": {"Dense_0": {"kernel": ...}}}``, FrozenDict too), a Flax NNX
``nnx.State`` (whose leaves are ``nnx.Variable``s) or nested dicts/lists of
arrays — and returns the same structure with every leaf that a rule quantizes
replaced by a QArray (inside a new Variable of the same type for NNX, so
``nnx.merge(graphdef, qstate)`` works). Every other leaf is returned as the very
same object. It runs on the host, leaf by leaf: do not ``jit`` it.

Paths join dict keys (and NNX state keys) with ``"/"`` and write list indices as
numbers: ``"params/Dense_0/kernel"``, ``"layers/3/mlp/down_proj/kernel"``
(`jquant.tree` walks trees by these paths and gives the rule for a leaf).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant import algorithms, tree
from jquant.qarray import QArray
from jquant.recipe import SCALE_DTYPES, Recipe, Rule
from jquant.tree import path_str as path_str  # the path API lives in jquant.tree
from jquant.vq import VQArray


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportRow:
    """What ``quantize`` did to one array leaf."""

    # Parameter path, e.g. "params/Dense_0/kernel".
    path: str
    # Logical shape.
    shape: tuple[int, ...]
    # Format name, or "skip" (a rule or min_size kept it float), or "float" (no rule / rank < 2).
    qtype: str
    # Group size of the QArray (None: per-channel / per-tensor / not quantized).
    group_size: int | None
    # Storage bits per element, scales and zero points included.
    bits_per_weight: float
    # Storage bytes after quantize.
    nbytes: int
    # Storage bytes of the leaf as given.
    float_nbytes: int
    # ||w - dequantize(q)||_F / ||w||_F (0.0 for leaves left float).
    rel_error: float
    # Algorithm that produced the QArray, or None.
    algorithm: str | None


def quantize(
    params,
    recipe: Recipe | str,
    *,
    calibration: Mapping[str, Any] | Callable[[str], Any] | None = None,
    report: bool = False,
):
    """Returns ``params`` with the weights that ``recipe`` selects replaced by QArrays.

    Args:
      params: a Linen param dict, an ``nnx.State``, or nested dicts/lists of arrays.
      recipe: a :class:`Recipe`, a shipped recipe name or a path to a YAML file.
      calibration: per-parameter data for calibrated algorithms: a mapping from
        path to data, or a function of the path; None for none. Each algorithm
        receives the entry for its path (or None).
      report: also return one :class:`ReportRow` per array leaf.

    Returns:
      The new tree, or ``(tree, rows)`` when ``report`` is true.

    Raises:
      ValueError: naming the parameter path and the rule, for a weight that cannot be
        quantized as asked (integer dtype, NaN/inf, bad axis), or a rule that matches
        nothing under ``require_match``.

    Warns:
      UserWarning: naming the rule and the paths, once per quantizing (non-skip) rule that
        matches leaves it cannot quantize: Python numbers, rank-0/1 arrays (biases, norm
        scales), PRNG keys. They stay as they are; a broad pattern usually caused it.

    >>> params = {"params": {"Dense_0": {"kernel": jnp.ones((256, 4)), "bias": jnp.zeros(4)}}}
    >>> q = quantize(params, "w4a16-rtn-g128")
    >>> dense = q["params"]["Dense_0"]
    >>> dense["kernel"].qtype, dense["bias"] is params["params"]["Dense_0"]["bias"]
    ('int4', True)
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    if recipe.rotation is not None:
        raise ValueError(
            f"recipe {recipe.name!r} rotates the model (rotation: {dict(recipe.rotation)}), "
            "which needs the model, not its parameters alone: use "
            "jquant.calib.apply_recipe(model, params, recipe), or jquant.rotate.rotate first"
        )
    flat, treedef = tree.flatten(params)
    recipe.check_matches([path for path, _ in flat])
    leaves, rows = [], []
    unquantizable: dict[int, list[str]] = {}  # rule index -> matched paths it cannot quantize
    for path, leaf in flat:
        new, row = _quantize_leaf(path, leaf, recipe, calibration, report, unquantizable)
        leaves.append(new)
        if row is not None:
            rows.append(row)
    _warn_unquantizable(recipe, unquantizable)
    out = tree.unflatten(treedef, leaves)
    return (out, rows) if report else out


def _quantize_leaf(path, leaf, recipe, calibration, report, unquantizable):
    """(new leaf, report row or None) for one leaf; records in ``unquantizable`` the
    leaves a quantizing rule matches but cannot quantize."""
    value = tree.unwrap(leaf)
    if isinstance(value, QArray | VQArray):  # already quantized: leave it, report what it is
        return leaf, _row(path, value, value, None) if report else None
    rule = recipe.match(path)
    if rule is not None and not rule.skip and not (tree.is_array(value) and value.ndim >= 2):
        unquantizable.setdefault(rule.index, []).append(path)
    if not tree.is_array(value):
        return leaf, None
    status = tree.decide(rule, value)
    if status is not None:
        if rule is not None and rule.skip and rule.dtype is not None:
            value = _as_float(value, rule)
            leaf = tree.rewrap(leaf, value)
        return leaf, _row(path, value, value, None, status=status) if report else None
    resolved = tree.resolve(rule, path, value, recipe)
    data = calibration(path) if callable(calibration) else (calibration or {}).get(path)
    try:
        q = algorithms.run(resolved.algorithm, value, resolved, path=path, calibration=data)
    except ValueError as e:
        msg = str(e) if path in str(e) else f"{path}: {e}"
        raise ValueError(f"{msg} [{rule.where} of recipe {recipe.name!r}]") from None
    return tree.rewrap(leaf, q), _row(path, value, q, resolved.algorithm) if report else None


def _warn_unquantizable(recipe: Recipe, unquantizable: dict[int, list[str]]) -> None:
    """One UserWarning per quantizing rule that matched leaves it cannot quantize (not
    arrays, or rank < 2: biases, norm scales, Python numbers); they stay as they are."""
    for index, paths in unquantizable.items():
        rule = recipe.rules[index]
        shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
        warnings.warn(
            f"{rule.where} of recipe {recipe.name!r} matches {len(paths)} parameter(s) it "
            f"cannot quantize (not an array of rank >= 2), left as they are: {shown}. "
            "Narrow the pattern (e.g. end it in kernel$) or add a skip rule before it.",
            UserWarning, stacklevel=3,
        )  # fmt: skip


def _as_float(value, rule: Rule):
    """A skipped leaf in the rule's ``dtype`` (float leaves only; integer ones stay)."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        return value
    return jnp.asarray(value, SCALE_DTYPES[rule.dtype])


def _row(path, value, q, algorithm, *, status=None) -> ReportRow:
    float_nbytes = _nbytes(value)
    if isinstance(q, QArray | VQArray):
        shape, nbytes = tuple(q.shape), q.nbytes
        err = _rel_error(value, q) if value is not q else float("nan")
        return ReportRow(
            path=path, shape=shape, qtype=q.qtype, group_size=q.group_size,
            bits_per_weight=q.bits_per_weight, nbytes=nbytes,
            float_nbytes=float_nbytes if value is not q else nbytes, rel_error=err,
            algorithm=algorithm,
        )  # fmt: skip
    size = math.prod(value.shape)
    return ReportRow(
        path=path, shape=tuple(value.shape), qtype=status, group_size=None,
        bits_per_weight=8.0 * float_nbytes / size if size else 0.0, nbytes=float_nbytes,
        float_nbytes=float_nbytes, rel_error=0.0, algorithm=None,
    )  # fmt: skip


def _nbytes(x) -> int:
    if isinstance(x, QArray | VQArray):
        return x.nbytes
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _rel_error(w, q: QArray) -> float:
    w = jnp.asarray(w, jnp.float32)
    err = float(jnp.linalg.norm((w - q.dequantize(jnp.float32)).ravel()))
    norm = float(jnp.linalg.norm(w.ravel()))
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


def format_report(rows: list[ReportRow]) -> str:
    """A readable table of report rows, with a total line.

    >>> _, rows = quantize({"w": jnp.ones((64, 8))}, "w8a16", report=True)
    >>> print(format_report(rows).splitlines()[0].split())
    ['path', 'shape', 'qtype', 'group', 'bits/w', 'bytes', 'float', 'rel_err', 'algorithm']
    """
    header = ("path", "shape", "qtype", "group", "bits/w", "bytes", "float", "rel_err",
              "algorithm")
    body = [
        (r.path, "x".join(map(str, r.shape)) or "()", r.qtype, "-" if r.group_size is None
         else str(r.group_size), f"{r.bits_per_weight:.3f}", _human(r.nbytes),
         _human(r.float_nbytes), f"{r.rel_error:.2e}", r.algorithm or "-")
        for r in rows
    ]
    total, total_float = sum(r.nbytes for r in rows), sum(r.float_nbytes for r in rows)
    n = sum(math.prod(r.shape) for r in rows)
    ratio = f"{total_float / total:.2f}x smaller" if total else ""
    body.append(("total", f"{n} params", "", "", f"{8.0 * total / n:.3f}" if n else "-",
                 _human(total), _human(total_float), "", ratio))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
