"""`rope_inv_freq`: the RoPE inverse frequencies a `LlamaConfig` implies, scaled as it says.

Default, linear and Llama 3.1 scaling, computed in float32 term for term as transformers does;
`jquant.arch` re-exports it (reading the RoPE keys of an HF config stays there, in `from_hf`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jquant.arch import LlamaConfig


def rope_inv_freq(config: LlamaConfig, *, local: bool = False) -> np.ndarray:
    """RoPE inverse frequencies ``(head_dim // 2,)`` float32, scaled as `config.rope_type` says.

    Computed in float32 as transformers does (`_compute_default_rope_parameters`,
    `_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`), so positions
    rotate by the same angles as in the reference implementation. ``local``: the sliding
    layers' frequencies (base `rope_local_theta`, unscaled, when the config has one).
    """
    dim = config.head_dim
    local = local and config.rope_local_theta is not None
    theta = config.rope_local_theta if local else config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
    if local:
        return inv_freq
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        return _llama3_scale(inv_freq, config)
    return inv_freq


def _llama3_scale(inv_freq: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths are divided by `factor`, short ones kept,
    and the band between is interpolated smoothly (transformers' formula, term for term)."""
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_max_position
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
