"""`ExpertCalibration`: a recipe's ``experts:`` settings, how calibrated algorithms treat the
experts of a mixture-of-experts layer (`jquant.models.moe`).

An expert sees only the tokens its router sends it. By default each expert is calibrated on
those (``tokens: routed``); ``tokens: all`` runs every calibration token through every
expert for the statistics only (llm-compressor's ``calibrate_all_experts``), while the
layer's outputs, which the next layer calibrates on, stay the routed ones. An expert that
received fewer than ``min_token_share`` of the calibration tokens (none at all, always) is
quantized by the data-free ``fallback`` instead, with a warning naming it, and the
calibration report lists it.

>>> ExpertCalibration.from_dict({"tokens": "all"}).to_dict()
{'tokens': 'all'}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

#: Which tokens calibrate an expert.
TOKENS = ("routed", "all")
#: Data-free algorithms an expert with too few tokens falls back to.
FALLBACKS = ("rtn", "hqq")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertCalibration:
    """How calibrated algorithms (GPTQ, AWQ, SmoothQuant) treat an MoE layer's experts.

    >>> ExpertCalibration().min_tokens(128 * 512)
    327.68
    """

    # "routed": each expert's statistics are over the tokens routed to it; "all": over every
    # calibration token (each token through every expert; the outputs stay the routed ones).
    tokens: str = "routed"
    # An expert that received fewer than this share of the calibration tokens (or none) is
    # quantized by `fallback`: 0.005, the 0.5% GPTQModel uses for MoE modules. At 128 x 512
    # tokens that is 328 tokens; an expert's average share is top-k / E (8 / 128 = 6.25%).
    min_token_share: float = 0.005
    # The data-free algorithm for such experts ("rtn" or "hqq"), with the rule's format,
    # groups and scale settings.
    fallback: str = "rtn"

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise ValueError(f"experts: tokens={self.tokens!r} is not one of {list(TOKENS)}")
        share = self.min_token_share
        if isinstance(share, int) and not isinstance(share, bool):
            object.__setattr__(self, "min_token_share", float(share))
            share = self.min_token_share
        if not isinstance(share, float) or not math.isfinite(share) or not 0.0 <= share < 1.0:
            raise ValueError(f"experts: min_token_share={share!r} must be a number in [0, 1) "
                             "(a share of the calibration tokens: 0.005 is 0.5%)")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"experts: fallback={self.fallback!r} is not one of "
                             f"{list(FALLBACKS)}")

    def min_tokens(self, tokens: int) -> float:
        """The token count below which an expert falls back, of ``tokens`` calibration tokens."""
        return self.min_token_share * tokens

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExpertCalibration:
        """From a recipe's ``experts:`` mapping, rejecting unknown keys."""
        if not isinstance(d, Mapping):
            raise ValueError(f"experts: expected a mapping with keys {', '.join(KEYS)}, got {d!r}")
        unknown = [k for k in d if k not in KEYS]
        if unknown:
            raise ValueError(f"experts: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        default = ExpertCalibration()
        return {k: getattr(self, k) for k in KEYS if getattr(self, k) != getattr(default, k)}


KEYS = tuple(f.name for f in dataclasses.fields(ExpertCalibration))
