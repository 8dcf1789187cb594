"""Dynamic activation quantization (W8A8-style), with straight-through gradients.

When a weight's ``QArray.activation`` names a format, ``jquant.ops`` quantizes the
activations into it right before the matmul, **per token**: one absmax scale per
row, taken over the contracted axes (``K``), so that no calibration is needed.

* ``int8`` against an int8 symmetric per-channel (or per-tensor) weight runs as a
  true integer matmul, int8 x int8 with int32 accumulation, and applies
  ``row_scale * channel_scale`` in an epilogue (:func:`int8_matmul`).
* ``fp8_e4m3`` against an fp8_e4m3 per-channel weight runs as a true fp8 x fp8
  matmul on GPU and TPU (:func:`fp8_matmul`, the W8A8 Pallas kernel, f32 accumulation)
  where ``jquant.ops`` picks that kernel; elsewhere it fake-quantizes like the combinations below.
* Every other combination (other fp8 pairs, grouped or 4-bit weights) fake-quantizes
  the activations (quantize, then dequantize: :func:`fake_quant`) and runs the
  ordinary dequantize-then-dot path.

Both are differentiable w.r.t. the activations with a straight-through estimator:
the rounding counts as the identity in the backward pass.
Absmax scaling never clips, so the identity is the exact derivative between steps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jquant import kernels, qtypes
from jquant._weight import weight_wrapper

# Formats an activation may be quantized into (8-bit: 4-bit activations lose too much).
ACTIVATION_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2")


def check_format(fmt: str) -> None:
    """Raises ValueError unless ``fmt`` is an activation format."""
    if fmt not in ACTIVATION_FORMATS:
        raise ValueError(
            f"activation format {fmt!r} is not supported; use one of {ACTIVATION_FORMATS}"
        )


def quantize_rows(x, fmt: str, axes=(-1,)):
    """Per-token absmax quantization of ``x`` over ``axes``.

    Args:
      x: float activations.
      fmt: an activation format (``"int8"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``).
      axes: the contracted axes; each row over them gets one scale.

    Returns:
      ``(codes, scale)``: codes of ``fmt``'s code dtype, shape of ``x``; float32
      scales with ``axes`` kept as size 1. ``x ≈ decode(codes) * scale``. A row holding
      NaN or inf gets a NaN or inf scale, so it stays non-finite through the matmul
      (``kernels.quantize_activations``, the one per-row quantizer, says how).

    >>> codes, scale = quantize_rows(jnp.array([[1.0, -2.0]]), "int8")
    >>> codes.tolist(), scale.shape
    ([[64, -127]], (1, 1))
    """
    check_format(fmt)
    return kernels.quantize_activations(x, qtypes.get(fmt).code_dtype, axis=tuple(axes))


def _fake_quant(x, fmt, axes):
    codes, scale = quantize_rows(x, fmt, axes)
    return (qtypes.decode(fmt, codes) * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant(x, fmt: str, axes=(-1,)):
    """Quantizes ``x`` per token into ``fmt`` and back (same dtype), with an identity gradient.

    >>> y = fake_quant(jnp.array([[1.0, -2.0]]), "int8")
    >>> round(y[0, 0].item(), 4), y[0, 1].item()
    (1.0079, -2.0)
    """
    return _fake_quant(x, fmt, axes)


def _fake_quant_fwd(x, fmt, axes):
    return _fake_quant(x, fmt, axes), None


def _fake_quant_bwd(fmt, axes, _, g):
    return (g,)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@weight_wrapper("value", misuse=(
    "an ActQuantized weight quantizes the activations of its matmuls: pass it to jquant.ops "
    "(qdot / qeinsum / qattend) or run the model through jquant.apply"))
class ActQuantized:
    """A float weight whose matmuls quantize their activations first (QAT of W8A8 / W4A8).

    `jquant.qat.fake_quantize` returns one for a weight whose rule sets ``activation``:
    `jquant.ops` then fake-quantizes the activations per token over the contracted axes
    (:func:`fake_quant`, the quantizer serving uses) and multiplies by ``value`` (the
    fake-quantized weight). A pytree: ``value`` is the leaf, ``activation`` static.
    """

    value: jax.Array
    activation: str = dataclasses.field(metadata=dict(static=True), default="int8")

    def __post_init__(self):
        check_format(self.activation)


# Activation format -> the weight qtype of a true 8-bit matmul (same code dtype).
W8A8_FORMATS = {"int8": "int8", "fp8_e4m3": "fp8_e4m3"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _w8a8_matmul(x, codes, scale, fmt, backend, interpret):
    xq, xs = quantize_rows(x, fmt)
    # Exact int32 sums (fp8: float32 sums of exact products), then the two scales (row x
    # channel) in float32: the backend's kernel on TPU (int8) and GPU, XLA elsewhere.
    scale = jnp.broadcast_to(scale.reshape(-1, 1), (codes.shape[0], 1)).astype(jnp.float32)
    return kernels.quantized_matmul_w8a8(xq, xs, codes, scale, out_dtype=jnp.float32,
                                         backend=backend, interpret=interpret)


def _w8a8_matmul_fwd(x, codes, scale, fmt, backend, interpret):
    # A zero-size array carries x's dtype into the backward pass.
    y = _w8a8_matmul(x, codes, scale, fmt, backend, interpret)
    return y, (codes, scale, jnp.zeros((0,), x.dtype))


def _w8a8_matmul_bwd(fmt, backend, interpret, res, g):
    codes, scale, like = res
    w = codes.astype(jnp.float32) * scale  # (N, K)
    gx = jax.lax.dot_general(g, w, (((1,), (0,)), ((), ())))
    return gx.astype(like.dtype), None, None


_w8a8_matmul.defvjp(_w8a8_matmul_fwd, _w8a8_matmul_bwd)


def int8_matmul(x, codes, scale, *, backend=None, interpret=False):
    """``x @ (codes * scale).T`` with ``x`` quantized per row to int8, accumulated in int32.

    Args:
      x: activations ``(M, K)``, any float dtype.
      codes: int8 weight codes in storage layout ``(N, K)``.
      scale: float32 weight scales ``(N, 1)`` (per channel) or ``(1, 1)`` (per tensor).
      backend, interpret: passed to ``kernels.quantized_matmul_w8a8`` (default: the
        kernel of ``jax.default_backend()``, XLA on CPU).

    Returns:
      ``(M, N)`` float32. Gradients flow to ``x`` only (straight-through); the
      weight is treated as a constant.

    >>> y = int8_matmul(jnp.ones((1, 4)), jnp.ones((2, 4), jnp.int8), jnp.ones((2, 1)))
    >>> y.tolist()
    [[4.0, 4.0]]
    """
    return _w8a8_matmul(x, codes, scale, "int8", backend, interpret)


def fp8_matmul(x, codes, scale, *, backend=None, interpret=False):
    """``x @ (codes * scale).T`` with ``x`` quantized per row to fp8 e4m3, f32 accumulation.

    Like :func:`int8_matmul` for ``float8_e4m3fn`` weight codes: a real fp8 x fp8 matmul
    (the GPU kernel; the XLA reference where no kernel applies), straight-through for ``x``.

    >>> y = fp8_matmul(jnp.ones((1, 4)), jnp.ones((2, 4), jnp.float8_e4m3fn), jnp.ones((2, 1)))
    >>> y.tolist()
    [[4.0, 4.0]]
    """
    return _w8a8_matmul(x, codes, scale, "fp8_e4m3", backend, interpret)
