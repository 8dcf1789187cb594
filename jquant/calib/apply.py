"""A recipe applied to a loaded model, whatever it needs: what ``jquant quantize``,
``eval``, ``compare`` and ``serve`` run.

`quantize_loaded` quantizes without calibration (``jquant.quantize`` on the model's State);
`apply_recipe` calibrates first when the recipe asks (`jquant.calib.quantize_model`) and
reports either way. Both rotate the float model first when the recipe has a ``rotation``
(`jquant.rotate`), and untie the LM head when the recipe names it apart from a tied
embedding (`jquant.models.convert.prepare_head`), so they return the model as well.

>>> model, params, tok = jquant.models.load("smollm2-135m")  # doctest: +SKIP
>>> model, qparams, report = apply_recipe(model, params, "w4a16-gptq-g128", tokenizer=tok)
...  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax

from jquant.calib.data import DEFAULT_CORPUS
from jquant.qarray import is_qarray
from jquant.recipe import Recipe


def is_quantized(params) -> bool:
    """Whether any leaf of ``params`` is a QArray (a ``jquant quantize`` checkpoint, say).

    >>> is_quantized({"w": jax.numpy.ones(3)})
    False
    """
    return any(is_qarray(x) for x in jax.tree.leaves(params, is_leaf=is_qarray))


def check_float(params, recipe: Recipe) -> None:
    """Raises ValueError if ``params`` is already quantized, so ``recipe`` cannot apply."""
    if is_quantized(params):
        raise ValueError(
            f"the model is already quantized (a jquant quantize checkpoint); "
            f"drop --recipe {recipe.name}"
        )


def _recipe(recipe: Recipe | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)


def prepare(model, params, recipe: Recipe):
    """``(model, params, recipe)`` ready to quantize: rotated when the recipe asks (the
    returned recipe no longer does), then untied when it names the head apart."""
    from jquant.models.convert import prepare_head

    if recipe.rotation is not None:
        from jquant.rotate import rotate

        model, params = rotate(model, params, seed=recipe.rotation["seed"])
        recipe = dataclasses.replace(recipe, rotation=None)
    return (*prepare_head(model, params, recipe), recipe)


def quantize_loaded(model, params, recipe: Recipe | str | None, *, report: bool = False):
    """``(model, quantized params)`` (``(model, params, rows)`` with ``report``), without
    calibration; ``recipe`` None returns them as given (no rows). The model is untied when
    the recipe names the head apart from a tied embedding.

    Raises:
      ValueError: ``params`` already quantized, or a rule that needs calibration.
    """
    from jquant.transform import quantize

    if recipe is None:
        return (model, params, None) if report else (model, params)
    recipe = _recipe(recipe)
    check_float(params, recipe)
    model, params, recipe = prepare(model, params, recipe)
    if report:
        qparams, rows = quantize(params, recipe, report=True)
        return model, qparams, rows
    return model, quantize(params, recipe)


def apply_recipe(
    model, params, recipe: Recipe | str, *, tokenizer=None, calib: str = DEFAULT_CORPUS,
    samples: int = 128, seq_len: int = 512, tokens=None, progress: bool = False,
) -> tuple[Any, Any, dict[str, Any]]:  # fmt: skip
    """``(model, quantized params, report dict)``: calibrated when ``recipe`` asks
    (`needs_calibration`), else plain ``jquant.quantize``.

    Args:
      model, params: a jquant model and its float State (`jquant.models.load`).
      recipe: a `Recipe`, a shipped recipe name or a YAML path.
      tokenizer: encodes the calibration text (needed only by calibrated recipes).
      calib: the calibration corpus name or text file (`jquant.eval.load_corpus`).
      samples, seq_len: calibration windows and their length.
      tokens: calibration token windows already made (then ``calib`` only names them in
        the report, and no tokenizer is needed).
      progress: show the calibration's progress bar.

    Returns:
      The model (untied if the recipe names the head apart), the quantized params and the
      report: ``{"seconds", "calibrated": False, "rows"}`` (`jquant.ReportRow` dicts), or
      ``{"calibrated": True, "corpus": calib, **CalibrationReport.to_dict()}``.
    """
    from jquant import calib as calib_
    from jquant.transform import quantize

    recipe = _recipe(recipe)
    model, params, recipe = prepare(model, params, recipe)
    if not calib_.needs_calibration(recipe):
        start = time.perf_counter()
        qparams, rows = quantize(params, recipe, report=True)
        report = {"seconds": time.perf_counter() - start, "calibrated": False,
                  "rows": [dataclasses.asdict(r) for r in rows]}  # fmt: skip
        return model, qparams, report
    if tokens is None:
        if tokenizer is None:
            raise ValueError(
                f"recipe {recipe.name!r} needs calibration text, and the model has "
                "no tokenizer to encode it"
            )
        tokens = calib_.calibration_tokens(tokenizer, calib, samples=samples, seq_len=seq_len)
    qparams, report = calib_.quantize_model(model, params, recipe, tokens, progress=progress)
    return model, qparams, {"calibrated": True, "corpus": calib, **report.to_dict()}
