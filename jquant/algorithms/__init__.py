"""The algorithm registry: how a matched weight becomes a QArray.

An *algorithm* is a function::

    fn(weight, rule, *, path: str, calibration=None) -> QArray

* ``weight``: the float array of one parameter, in its logical layout.
* ``rule``: the :class:`jquant.recipe.Rule` that matched, already *resolved* for
  this leaf (``rule.axis`` and ``rule.clip`` are concrete, see ``Rule.resolve``);
  its ``algorithm_args`` carry the algorithm's own settings.
* ``path``: the parameter path; pass it on as ``name=`` so errors name the parameter.
* ``calibration``: whatever the caller of ``jquant.quantize`` supplied for this
  path (layer inputs, Hessians, ...), or None. Round-to-nearest ignores it.

Register one with ``@register("name")``; recipes then refer to it by name and
``jquant.quantize`` runs it, so new algorithms (GPTQ, AWQ, SmoothQuant, ...) need
no change to the transform. ``check_args`` lets an algorithm reject bad
``algorithm_args`` when the recipe is loaded rather than halfway through a model.

Calibrated quantization (``jquant.calib``) calls algorithms inside ``jit``, with traced
weights and statistics, so an algorithm must be traceable: no Python decision on array
values. One that has something to report about values (GPTQ raising its dampening) may
return ``(qarray, info)`` with ``info`` a dict of scalar arrays; the caller then runs the
registered ``check_info(path, info)`` on the host with concrete values, which warns or
raises ``ValueError``. `run` does both for eager callers.

>>> "rtn" in names()
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Algorithm = Callable[..., Any]
ArgsCheck = Callable[[Mapping[str, Any]], None]
InfoCheck = Callable[[str, Mapping[str, Any]], None]

_REGISTRY: dict[str, tuple[Algorithm, ArgsCheck | None]] = {}
_INFO_CHECKS: dict[str, InfoCheck] = {}
_EAGER: set[str] = set()


def register(name: str, *, check_args: ArgsCheck | None = None,
             check_info: InfoCheck | None = None, eager: bool = False):  # fmt: skip
    """Decorator registering an algorithm under ``name``.

    Args:
      name: the name recipes use (``algorithm: name``).
      check_args: optional ``fn(algorithm_args)`` raising ValueError on bad settings;
        run when a rule naming this algorithm is built.
      check_info: optional ``fn(path, info)`` run on the host with the concrete ``info``
        of an algorithm that returned ``(qarray, info)``; warns or raises ValueError.
      eager: the algorithm compiles its own pieces and does better called with concrete
        arrays than traced inside a caller's ``jit`` (GPTQ factors its Hessian with LAPACK
        in place on the host); drivers check :func:`runs_eagerly`. It stays traceable.

    >>> @register("identity-demo")
    ... def _identity(weight, rule, *, path, calibration=None):
    ...     return weight
    >>> get("identity-demo") is _identity
    True
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"algorithm name must be a non-empty string, got {name!r}")

    def decorate(fn: Algorithm) -> Algorithm:
        if name in _REGISTRY and _REGISTRY[name][0] is not fn:
            raise ValueError(f"algorithm {name!r} is already registered")
        _REGISTRY[name] = (fn, check_args)
        if check_info is not None:
            _INFO_CHECKS[name] = check_info
        if eager:
            _EAGER.add(name)
        return fn

    return decorate


def get(name: str) -> Algorithm:
    """The algorithm registered as ``name``; ValueError listing the known ones otherwise."""
    try:
        return _REGISTRY[name][0]
    except (KeyError, TypeError):
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(names())}") from None


def runs_eagerly(name: str) -> bool:
    """Whether ``name`` was registered ``eager=True`` (call it outside ``jit``)."""
    get(name)
    return name in _EAGER


def names() -> list[str]:
    """Registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def check_args(name: str, args: Mapping[str, Any]) -> None:
    """Runs ``name``'s argument check on ``args`` (no-op for algorithms without one)."""
    get(name)
    check = _REGISTRY[name][1]
    if check is not None:
        check(args)


def split_result(name: str, result) -> tuple[Any, dict[str, Any]]:
    """``(qarray, info)`` of an algorithm's return value (``info`` is ``{}`` if it gave none)."""
    if isinstance(result, tuple):
        q, info = result
        return q, dict(info)
    return result, {}


def check_info(name: str, path: str, info: Mapping[str, Any]) -> None:
    """Runs ``name``'s registered ``check_info`` on concrete ``info`` (no-op without one)."""
    check = _INFO_CHECKS.get(name)
    if check is not None and info:
        check(path, info)


def run(name: str, weight, rule, *, path: str, calibration=None):
    """Calls algorithm ``name`` eagerly and checks its info on the host; returns the QArray."""
    q, info = split_result(name, get(name)(weight, rule, path=path, calibration=calibration))
    check_info(name, path, info)
    return q


from jquant.algorithms import awq as awq  # noqa: E402  (registers "awq")
from jquant.algorithms import gptq as gptq  # noqa: E402  (registers "gptq")
from jquant.algorithms import gptvq as gptvq  # noqa: E402  (registers "gptvq")
from jquant.algorithms import hqq as hqq  # noqa: E402  (registers "hqq")
from jquant.algorithms import rtn as rtn  # noqa: E402  (registers "rtn")
from jquant.algorithms import smoothquant as smoothquant  # noqa: E402  (registers "smoothquant")
