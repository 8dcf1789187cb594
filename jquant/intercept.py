"""Running unmodified stock Flax modules (Linen and NNX) on quantized params.

A quantized tree holds QArrays where the model expects float kernels. Stock Flax
layers cannot consume them (``kernel[...]``, ``jnp.asarray(kernel)`` fail), so the
calls of the layers below are re-implemented on ``jquant.ops`` **when their
parameter is a QArray**, and left to Flax otherwise:

==========================  =====================================  ========================
layer (Linen / NNX)         parameter and the axis it is quantized  op
                            along (``quantize_array(..., axis=)``)
==========================  =====================================  ========================
``Dense`` / ``Linear``      ``kernel (K, N)``: ``axis=0``           ``qdot``
``DenseGeneral`` /          ``kernel (*batch, *in, *out)``: one     ``qdot_general``
``LinearGeneral``           of the ``in`` axes, normally the last
``Einsum``                  ``kernel``: an axis whose index is      ``qeinsum``
                            contracted by ``einsum_str``
``Embed`` (call, attend)    ``embedding (V, D)``: ``axis=-1``       ``qembed``, ``qattend``
==========================  =====================================  ========================

Calibration's `Tap` kernels (``jquant.calib``) take the same route, so a calibrated
quantization sees the inputs of stock Dense/Linear layers too.

A parameter quantized along any other axis raises a ``ValueError`` from the op,
naming the layer's shapes and the axis. Flax's dtype rules are kept: the compute
dtype is whatever the module's ``promote_dtype`` gives for (inputs, kernel with
its original dtype, bias), and ``precision`` / ``preferred_element_type`` pass
through. A module's custom ``dot_general`` / ``einsum_op`` is *not* called for a
QArray (jquant's op replaces it); ``out_sharding`` is not supported yet.

Subclasses are intercepted only where they inherit the stock method unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import meta

from jquant import ops
from jquant._act import ActQuantized
from jquant._lora import LoRAWeight
from jquant._tap import Tap
from jquant.qarray import QArray

# ---- shared helpers -----------------------------------------------------------------


def _struct(a):
    return None if a is None else jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)


def _compute_dtype(promote, args, *, variadic: bool, **kwargs):
    """The dtype ``promote`` (a module's ``promote_dtype``) gives ``args``.

    Evaluated on shapes only, so a QArray stands in as its logical shape and
    original dtype, and custom promotion functions keep working.
    """
    structs = tuple(map(_struct, args))
    fn = (lambda *a: promote(*a, **kwargs)) if variadic else (lambda *a: promote(a, **kwargs))
    out = jax.eval_shape(fn, *structs)
    return next(o.dtype for o in out if o is not None)


def _check_shape(layer: str, name: str, value, expected) -> None:
    # Flax checks a param's shape against its initializer's; reading the variable
    # directly skips that check, so it is repeated here.
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{layer}: parameter {name!r} has shape {tuple(value.shape)} but the layer "
            f"expects {tuple(expected)} for these inputs"
        )


def _no_out_sharding(layer: str, out_sharding) -> None:
    if out_sharding is not None:
        raise NotImplementedError(f"{layer}: out_sharding is not supported for a QArray kernel")


def _normalize_axes(axes, ndim: int) -> tuple[int, ...]:
    return tuple(sorted(a % ndim for a in axes))


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, list | tuple) else (x,)


def _add_bias(y, bias, shape, dtype):
    return y if bias is None else y + jnp.reshape(bias.astype(dtype), shape)


# ---- the computations, shared by Linen and NNX ---------------------------------------


def _dense(layer, inputs, kernel, bias, *, dtype, precision, preferred=None):
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    y = ops.qdot_general(
        inputs.astype(dtype), kernel, dims, precision, preferred, op=f"{layer} (qdot)"
    )
    return _add_bias(y, bias, (1,) * (y.ndim - 1) + (-1,), dtype)


def _dense_general(
    layer, inputs, kernel, bias, *, axis, batch_dims, features, dtype, precision, preferred=None
):  # fmt: skip
    ndim = inputs.ndim
    axis, batch_dims = _normalize_axes(axis, ndim), _normalize_axes(batch_dims, ndim)
    expected = (*(inputs.shape[a] for a in batch_dims), *(inputs.shape[a] for a in axis), *features)
    _check_shape(layer, "kernel", kernel, expected)
    nb = len(batch_dims)
    dims = ((axis, tuple(range(nb, nb + len(axis)))), (batch_dims, tuple(range(nb))))
    y = ops.qdot_general(
        inputs.astype(dtype), kernel, dims, precision, preferred, op=f"{layer} (qdot_general)"
    )
    expanded = tuple(
        inputs.shape[a] if a in batch_dims else 1 for a in range(ndim) if a not in axis
    )
    return _add_bias(y, bias, (*expanded, *features), dtype)


def _embed(layer, inputs, table, *, dtype, num_embeddings, features):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    _check_shape(layer, "embedding", table, (num_embeddings, features))
    if num_embeddings == 1:  # Flax broadcasts the single row whatever the ids
        return jnp.broadcast_to(table.dequantize(dtype), (*inputs.shape, features))
    return ops.qembed(inputs, table, dtype=dtype)


def _attend(layer, query, table, *, dtype):
    return ops.qattend(query.astype(dtype), table)


# ---- Linen ------------------------------------------------------------------------------


def _linen_param(module, name):
    value = module.get_variable("params", name)
    return value.unbox() if isinstance(value, meta.AxisMetadata) else value


def _linen_dtype(module, *args, **kwargs):
    return _compute_dtype(module.promote_dtype, args, variadic=True, dtype=module.dtype, **kwargs)


def _linen_dense(module, kernel, inputs):
    bias = _linen_param(module, "bias") if module.use_bias else None
    _check_shape("nn.Dense", "kernel", kernel, (inputs.shape[-1], module.features))
    dtype = _linen_dtype(module, inputs, kernel, bias)
    return _dense("nn.Dense", inputs, kernel, bias, dtype=dtype, precision=module.precision)


def _linen_dense_general(module, kernel, inputs):
    bias = _linen_param(module, "bias") if module.use_bias else None
    dtype = _linen_dtype(module, inputs, kernel, bias)
    return _dense_general(
        "nn.DenseGeneral", inputs, kernel, bias, axis=_as_tuple(module.axis),
        batch_dims=_as_tuple(module.batch_dims), features=_as_tuple(module.features),
        dtype=dtype, precision=module.precision,
    )  # fmt: skip


def _linen_einsum(module, kernel, inputs, einsum_str=None):
    einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    _check_shape("nn.Einsum", "kernel", kernel, module.shape)
    bias = _linen_param(module, "bias") if module.use_bias else None
    dtype = _linen_dtype(module, inputs, kernel, bias)
    y = ops.qeinsum(
        einsum_str, inputs.astype(dtype), kernel, precision=module.precision,
        preferred_element_type=module.preferred_element_type,
    )  # fmt: skip
    if bias is not None:
        _, shape = module._get_bias_shape(einsum_str, inputs, _struct(kernel))
        y = _add_bias(y, bias, shape, dtype)
    return y


def _linen_embed(module, table, inputs):
    return _embed(
        "nn.Embed", inputs, table, dtype=_linen_dtype(module, table, inexact=False),
        num_embeddings=module.num_embeddings, features=module.features,
    )  # fmt: skip


def _linen_attend(module, table, query):
    return _attend("nn.Embed.attend", query, table, dtype=_linen_dtype(module, query, table))


def _linen_setup_embed(module, table):
    # Embed.setup() would call self.param(), whose shape check compares the packed
    # storage with the float shape; setting the attribute keeps `embed.embedding` usable.
    module.embedding = table


# (stock class, method name) -> (parameter name, handler(module, param, *args, **kwargs))
_LINEN_HANDLERS = {
    (nn.Dense, "__call__"): ("kernel", _linen_dense),
    (nn.DenseGeneral, "__call__"): ("kernel", _linen_dense_general),
    (nn.Einsum, "__call__"): ("kernel", _linen_einsum),
    (nn.Embed, "setup"): ("embedding", _linen_setup_embed),
    (nn.Embed, "__call__"): ("embedding", _linen_embed),
    (nn.Embed, "attend"): ("embedding", _linen_attend),
}


def _linen_interceptor(next_fun, args, kwargs, context):
    module, name = context.module, context.method_name
    for (cls, method), (param, handler) in _LINEN_HANDLERS.items():
        if (
            method == name
            and isinstance(module, cls)
            and getattr(type(module), name, None) is getattr(cls, name)
            and module.has_variable("params", param)
        ):
            value = _linen_param(module, param)
            if isinstance(value, QArray | Tap | ActQuantized | LoRAWeight):
                return handler(module, value, *args, **kwargs)
            break
    return next_fun(*args, **kwargs)


def linen_quantized():
    """A context in which stock Linen layers run on QArray params (see the module docstring).

    Wrap your own ``module.apply`` calls in it (or the first call of a jitted
    function that makes them); :func:`apply` is the one-call form. The context is
    thread-local (Flax's interceptor stack).

    >>> with linen_quantized():  # doctest: +SKIP
    ...     y = model.apply(qvariables, x, mutable=["cache"])
    """
    return nn.intercept_methods(_linen_interceptor)


def apply(module: nn.Module, variables, *args, method=None, **kwargs):
    """``module.apply(variables, *args, ...)`` with QArrays allowed in ``variables``.

    Args:
      module: an unmodified Linen module (any tree of stock layers).
      variables: its variables, with some params replaced by QArrays (for example
        by ``jquant.quantize``); float params run exactly as Flax runs them.
      *args: positional arguments of the method.
      method: the method to apply (default ``__call__``), as in ``Module.apply``.
      **kwargs: keyword arguments of ``Module.apply`` and of the method.

    Returns:
      Whatever ``module.apply`` returns.

    >>> from jquant.qarray import quantize_array
    >>> model = nn.Dense(4)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> kernel = quantize_array(variables["params"]["kernel"], "int8", axis=0)
    >>> qvariables = {"params": {**variables["params"], "kernel": kernel}}
    >>> apply(model, qvariables, jnp.ones((1, 8))).shape
    (1, 4)
    """
    with linen_quantized():
        return module.apply(variables, *args, method=method, **kwargs)


# ---- NNX --------------------------------------------------------------------------------


def _nnx_value(variable):
    return None if variable is None else variable.get_value()


def _nnx_dtype(module, *args, **kwargs):
    return _compute_dtype(module.promote_dtype, args, variadic=False, dtype=module.dtype, **kwargs)


def _nnx_linear(module, kernel, inputs, out_sharding=None):
    _no_out_sharding("nnx.Linear", out_sharding)
    bias = _nnx_value(module.bias)
    _check_shape("nnx.Linear", "kernel", kernel, (module.in_features, module.out_features))
    return _dense(
        "nnx.Linear", inputs, kernel, bias, dtype=_nnx_dtype(module, inputs, kernel, bias),
        precision=module.precision, preferred=module.preferred_element_type,
    )  # fmt: skip


def _nnx_linear_general(module, kernel, inputs, out_sharding=None):
    _no_out_sharding("nnx.LinearGeneral", out_sharding)
    bias = _nnx_value(module.bias)
    return _dense_general(
        "nnx.LinearGeneral", inputs, kernel, bias, axis=module.axis,
        batch_dims=tuple(module.batch_axis.keys()), features=module.out_features,
        dtype=_nnx_dtype(module, inputs, kernel, bias), precision=module.precision,
        preferred=module.preferred_element_type,
    )  # fmt: skip


def _nnx_einsum(module, kernel, inputs, einsum_str=None, out_sharding=None):
    _no_out_sharding("nnx.Einsum", out_sharding)
    einsum_str = (einsum_str if einsum_str is not None else module.einsum_str).replace(" ", "")
    module._einsum_str_check(einsum_str)
    _check_shape("nnx.Einsum", "kernel", kernel, module.kernel_shape)
    bias = _nnx_value(module.bias)
    dtype = _nnx_dtype(module, inputs, kernel, bias)
    y = ops.qeinsum(
        einsum_str, inputs.astype(dtype), kernel, precision=module.precision,
        preferred_element_type=module.preferred_element_type,
    )  # fmt: skip
    if bias is not None:
        shape = module._infer_broadcasted_bias_shape(einsum_str, inputs, _struct(kernel))
        y = _add_bias(y, bias, shape, dtype)
    return y


def _nnx_embed(module, table, inputs, out_sharding=None):
    _no_out_sharding("nnx.Embed", out_sharding)
    return _embed(
        "nnx.Embed", inputs, table, dtype=_nnx_dtype(module, table, inexact=False),
        num_embeddings=module.num_embeddings, features=module.features,
    )  # fmt: skip


def _nnx_attend(module, table, query, out_sharding=None):
    _no_out_sharding("nnx.Embed.attend", out_sharding)
    return _attend("nnx.Embed.attend", query, table, dtype=_nnx_dtype(module, query, table))


_NNX_HANDLERS = {
    (nnx.Linear, "__call__"): ("kernel", _nnx_linear),
    (nnx.LinearGeneral, "__call__"): ("kernel", _nnx_linear_general),
    (nnx.Einsum, "__call__"): ("kernel", _nnx_einsum),
    (nnx.Embed, "__call__"): ("embedding", _nnx_embed),
    (nnx.Embed, "attend"): ("embedding", _nnx_attend),
}


def _nnx_patched(orig, param, handler):
    @functools.wraps(orig)
    def method(self, *args, **kwargs):
        if _nnx_active.get():
            value = _nnx_value(getattr(self, param, None))
            if isinstance(value, QArray | Tap | ActQuantized | LoRAWeight):
                return handler(self, value, *args, **kwargs)
        return orig(self, *args, **kwargs)

    return method


# Whether the current context (thread, asyncio task) is inside nnx_quantized(): the patched
# methods act only where it is set, so other threads keep Flax's behaviour.
_nnx_active: contextvars.ContextVar[bool] = contextvars.ContextVar("jquant_nnx", default=False)
_nnx_lock = threading.Lock()
_nnx_depth = 0  # contexts open in any thread: the methods are patched while it is > 0
_nnx_saved: list = []  # (class, name, Flax's method) to restore


@contextlib.contextmanager
def nnx_quantized():
    """A context in which stock NNX layers run on QArray params (see the module docstring).

    Only the calling thread (more exactly, the current ``contextvars`` context) sees the
    quantized behaviour: ``__call__`` / ``attend`` of ``nnx.Linear``,
    ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Embed`` are wrapped while any such
    context is open in the process, but the wrapper defers to Flax's own method unless
    its caller is inside one, so another thread running NNX layers meanwhile gets plain
    Flax. Nesting is fine; the methods are restored when the last context exits, also on
    error. A layer whose param is a float array runs Flax's own code, untouched.

    Jitted functions must be traced inside the context (the first call); their
    compiled code no longer needs it.

    >>> graphdef, state = nnx.split(model)           # doctest: +SKIP
    >>> qmodel = nnx.merge(graphdef, jquant.quantize(state, recipe))  # doctest: +SKIP
    >>> with nnx_quantized():                        # doctest: +SKIP
    ...     logits = qmodel(tokens)
    """
    global _nnx_depth
    with _nnx_lock:
        if _nnx_depth == 0:
            for (cls, name), (param, handler) in _NNX_HANDLERS.items():
                orig = cls.__dict__[name]
                _nnx_saved.append((cls, name, orig))
                setattr(cls, name, _nnx_patched(orig, param, handler))
        _nnx_depth += 1
    token = _nnx_active.set(True)
    try:
        yield
    finally:
        _nnx_active.reset(token)
        with _nnx_lock:
            _nnx_depth -= 1
            if _nnx_depth == 0:
                while _nnx_saved:
                    cls, name, orig = _nnx_saved.pop()
                    setattr(cls, name, orig)


def nnx_apply(model: nnx.Module, *args, method: str = "__call__", **kwargs):
    """Calls ``model.<method>(*args, **kwargs)`` inside :func:`nnx_quantized`.

    >>> qmodel = nnx.merge(graphdef, qstate)         # doctest: +SKIP
    >>> logits = nnx_apply(qmodel, tokens)           # doctest: +SKIP
    """
    with nnx_quantized():
        return getattr(model, method)(*args, **kwargs)
