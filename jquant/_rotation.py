"""`Rotation`: the online part of a model rotated by `jquant.rotate`, as config data.

A rotated model computes the float function it had before; what it must do at run time
(online) is recorded here, in `LlamaConfig.rotation`, and in a checkpoint's config as
``"jquant_rotation": {"kind": "hadamard", "seed": 0, "residual_online": true}``.
Imports nothing of jquant (`jquant.arch` re-exports it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: The key of a rotated model's HF-style config dict that holds its `Rotation`.
HF_KEY = "jquant_rotation"
KINDS = ("hadamard",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rotation:
    """What a rotated model applies online; every sign vector is a function of ``seed``.

    >>> Rotation.from_hf({"kind": "hadamard", "seed": 0, "residual_online": True}).seed
    0
    """

    kind: str = "hadamard"  # the transform: randomized Hadamard (QuIP#'s RHT)
    seed: int = 0  # seeds the ±1 sign vectors (`jquant.hadamard.rht`)
    # The residual stream is rotated online after the embedding lookup and back before the
    # final norm (a tied embedding table stays as it is); False: folded into the table and
    # the LM head. The MLP's intermediate is always rotated online before down_proj.
    residual_online: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rotation: kind={self.kind!r} is not supported; supported: "
                             f"{', '.join(KINDS)}")  # fmt: skip
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"rotation: seed={self.seed!r} must be an int >= 0")
        if not isinstance(self.residual_online, bool):
            raise ValueError(
                f"rotation: residual_online={self.residual_online!r} must be true or false"
            )

    def to_hf(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, value: Mapping[str, Any] | None) -> Rotation | None:
        """The `Rotation` of a config's ``"jquant_rotation"`` entry (None: not rotated)."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError(f"{HF_KEY} must be a mapping, got {value!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise ValueError(f"{HF_KEY}: unknown keys {unknown}; allowed: {allowed}")
        return cls(**value)


def rotation_blocker(config) -> str | None:
    """Why a `LlamaConfig`'s structure cannot be rotated (None: it can).

    The rotation commutes with a norm only where the norm's weight can be folded into the
    linears that read it, and every branch writes to the residual stream through one
    linear; the families that satisfy it are llama, mistral, qwen2 and qwen3.
    """
    if config.sandwich_norms:
        return (f"{config.model_type}'s post-norms (sandwich norms) normalize the attention "
                "and MLP outputs before they join the residual stream, which a rotation of "
                "that stream does not commute with")  # fmt: skip
    if config.norm_offset or config.embed_scale != 1.0:
        return (f"{config.model_type}'s norms weight by (1 + w) and its embeddings are "
                "scaled; rotation is implemented for llama, mistral, qwen2 and qwen3")
    if config.num_experts or config.moe_layers:
        return (f"{config.model_type} has mixture-of-experts layers; rotation is "
                "implemented for dense MLPs only")  # fmt: skip
    return None
