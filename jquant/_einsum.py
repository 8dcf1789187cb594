"""Two-operand einsum specs as ``dot_general`` dimension numbers, for ``jquant.ops.qeinsum``.

An index is **batch** when x, w and the output all carry it, **contracted** when x and w
carry it and the output does not, **free** when one operand and the output carry it, and
**x-summed** when only x carries it (summed out of x before the dot). A quantized weight
may not be summed alone, and no operand may repeat an index (no diagonals).
"""

from __future__ import annotations

from typing import NamedTuple

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class EinsumPlan(NamedTuple):
    """How to run ``einsum(spec, x, w)`` as ``transpose(dot_general(sum(x), w), perm)``."""

    # Axes of x that only x carries: summed out of x before the dot.
    x_summed: tuple[int, ...]
    # ``dot_general`` dimension numbers for the summed x and w.
    dims: tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]
    # Permutation of the ``dot_general`` result (batch, x free, w free) into the output.
    perm: tuple[int, ...]


def plan(spec: str, x_ndim: int, w_ndim: int, *, op: str, w_desc: str) -> EinsumPlan:
    """Plans ``einsum(spec, x, w)``; ``op`` and ``w_desc`` name the call and the weight in
    error messages.

    >>> plan("btd,dhk->bthk", 3, 3, op="qeinsum", w_desc="w")
    EinsumPlan(x_summed=(), dims=(((2,), (0,)), ((), ())), perm=(0, 1, 2, 3))
    """
    xs, ws, outs = parse(spec, x_ndim, w_ndim, op=op, w_desc=w_desc)
    x_summed = tuple(i for i, c in enumerate(xs) if c not in ws and c not in outs)
    xs = "".join(c for c in xs if c in ws or c in outs)
    batch = [c for c in xs if c in ws and c in outs]
    contract = [c for c in xs if c in ws and c not in outs]
    dims = (
        (tuple(xs.index(c) for c in contract), tuple(ws.index(c) for c in contract)),
        (tuple(xs.index(c) for c in batch), tuple(ws.index(c) for c in batch)),
    )
    result = (
        "".join(batch)
        + "".join(c for c in xs if c not in ws)
        + "".join(c for c in ws if c not in xs)
    )
    return EinsumPlan(x_summed, dims, tuple(result.index(c) for c in outs))


def parse(spec: str, x_ndim: int, w_ndim: int, *, op: str, w_desc: str) -> tuple[str, str, str]:
    """Splits ``spec`` into (x, w, out) index strings with ellipses expanded."""
    spec = spec.replace(" ", "")
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"{op}: a QArray operand needs an explicit two-operand spec 'ab,bc->ac'")
    ins, outs = spec.split("->")
    xs, ws = ins.split(",")
    terms = [xs, ws]
    if any("..." in t for t in (*terms, outs)):
        free = [c for c in _LETTERS if c not in spec]
        ell = [n - (len(t) - 3) if "..." in t else 0 for t, n in zip(terms, (x_ndim, w_ndim))]
        letters = "".join(free[: max(ell)])
        xs, ws = (t.replace("...", letters[len(letters) - e :]) for t, e in zip(terms, ell))
        outs = outs.replace("...", letters)
    for name, term, ndim in (("x", xs, x_ndim), ("w", ws, w_ndim)):
        if len(term) != ndim or len(set(term)) != len(term):
            raise ValueError(
                f"{op}: operand {name} has {ndim} axes but its indices are {term!r} "
                "(each index once per operand, one per axis)"
            )
    if dropped := [c for c in ws if c not in xs and c not in outs]:
        raise ValueError(f"{op}: cannot sum the quantized weight ({w_desc}) over {dropped}")
    if unknown := [c for c in outs if c not in xs and c not in ws]:
        raise ValueError(f"{op}: output indices {unknown} appear in no operand")
    return xs, ws, outs
