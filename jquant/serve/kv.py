"""Quantized KV cache: keys and values stored as int8 or fp8 codes with per-token, per-head scales.

Each key (and value) vector of one token and one key/value head — ``head_dim`` numbers — gets
its own scale, ``amax / qmax``, stored in bfloat16; the codes are ``x / scale`` rounded (int8)
or cast (fp8 E4M3). The scale is rounded to bfloat16 *before* the codes are computed, so
``codes * stored_scale`` is the value attention sees. Bytes per token and layer:

    bfloat16:  2 (K, V) * kv_heads * head_dim * 2
    int8, fp8: 2 (K, V) * kv_heads * (head_dim * 1 + 2)   (0.52x at head_dim 64)

`jquant.memory.memory_report` counts the same bytes. Attention reads the codes and folds the
scales into its scores and probabilities (`jquant.models.llama.attend`).

>>> import jax.numpy as jnp
>>> fmt = kv_format("int8")
>>> codes, scale = fmt.quantize(jnp.array([[0.5, -1.0, 0.25, 0.0]]))
>>> codes.dtype, codes.tolist(), float(scale[0]) * 127
(dtype('int8'), [[64, -127, 32, 0]], 1.0)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

#: Scales are stored in bfloat16: 2 bytes per token, head and K or V.
SCALE_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class KVFormat:
    """How the cache stores keys and values (hashable: it is a static argument of jit).

    Attributes:
      name: ``"float"`` (the model's compute dtype, no scales), ``"int8"`` or ``"fp8"``.
      storage: the code dtype (None for float: the compute dtype).
      qmax: the largest code magnitude (127 for int8, 448 for fp8 E4M3); None for float.
    """

    name: str
    storage: object = None
    qmax: float | None = None

    @property
    def quantized(self) -> bool:
        return self.qmax is not None

    def bytes_per_token(self, kv_heads: int, head_dim: int, layers: int, compute_dtype) -> int:
        """Cache bytes one token takes over every layer (K and V, scales included)."""
        if not self.quantized:
            per_head = head_dim * np.dtype(compute_dtype).itemsize
        else:
            per_head = head_dim * np.dtype(self.storage).itemsize + np.dtype(SCALE_DTYPE).itemsize
        return 2 * layers * kv_heads * per_head

    def quantize(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(codes, scale)`` of ``x (..., head_dim)``: codes ``x``'s shape in `storage`,
        scale ``x.shape[:-1]`` in bfloat16; ``codes * scale ≈ x``. All-zero vectors get
        scale 0 and zero codes."""
        if not self.quantized:
            raise ValueError(f"KV format {self.name!r} stores values as they are")
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
        scale = (amax * jnp.float32(1 / self.qmax)).astype(SCALE_DTYPE)
        s32 = scale.astype(jnp.float32)[..., None]
        scaled = jnp.where(s32 > 0, x.astype(jnp.float32) / jnp.where(s32 > 0, s32, 1), 0)
        scaled = jnp.clip(scaled, -self.qmax, self.qmax)
        if jnp.issubdtype(self.storage, jnp.integer):
            scaled = jnp.round(scaled)
        return scaled.astype(self.storage), scale


_FORMATS = {
    "float": KVFormat("float"),
    "int8": KVFormat("int8", jnp.int8, 127.0),
    "fp8": KVFormat("fp8", jnp.float8_e4m3fn, float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)),
}
_ALIASES = {None: "float", "none": "float", "bfloat16": "float", "float32": "float",
            "float16": "float", "e4m3": "fp8", "float8_e4m3fn": "fp8"}  # fmt: skip

#: Names `kv_format` accepts.
KV_CACHE_FORMATS = ("none", "int8", "fp8")


def kv_format(name: str | KVFormat | None) -> KVFormat:
    """The `KVFormat` called ``name``: None / "none" / "float" (the compute dtype), "int8",
    "fp8" (E4M3); a dtype name such as "bfloat16" means unquantized too.

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if isinstance(name, KVFormat):
        return name
    key = _ALIASES.get(name, name)
    if key not in _FORMATS:
        raise ValueError(
            f"KV cache format {name!r} is unknown; use one of {', '.join(KV_CACHE_FORMATS)}"
        )
    return _FORMATS[key]
