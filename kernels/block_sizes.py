"""Block sizes for the quantized matmul kernels, and the table of unmeasured defaults.

`DEFAULT_BLOCK_SIZES` is a starting point, not a measurement: no TPU or GPU was available
when it was written, so its rows are reasoned from the hardware rules, never timed. They
stay unmeasured defaults until `python benchmarks/tune_blocks.py` runs on the device: it
sweeps the legal sizes per M and prints replacement rows; paste them with the device that
measured them named. (Whether the kernel or XLA runs at a given M is `dispatch_table.py`'s
call.)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile of one kernel program, in elements (not bytes).

    Kernels shrink a block that is larger than the problem (a decode step with M = 1 never
    pads to `block_m` = 128) but never grow one, and raise `ValueError` when an explicitly
    requested block breaks a hardware rule (TPU: (8, 128) tiles; GPU: powers of two).
    """

    # Rows of x per program. Decode batches are small; prefill wants 128+.
    block_m: int
    # Output columns (rows of the stored (N, K) weight) per program.
    block_n: int
    # Elements of K per step of the reduction; a multiple of the group size, so a step
    # holds whole groups. 4-bit formats read block_k // 2 bytes per step.
    block_k: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")


# (backend, largest M of the bucket) -> block sizes; the first bucket with m <= max_m wins.
# Unmeasured (see the module docstring).
# TPU: block_k = 512 elements is 256 bytes of a 4-bit row (two 128-lane vregs), and a
# multiple of every supported group size. GPU: block_k only matters per-channel (a
# grouped kernel steps one group at a time); M <= 8 takes the FMA (no tensor core) path.
DEFAULT_BLOCK_SIZES: dict[str, tuple[tuple[int, BlockSizes], ...]] = {
    "tpu": (
        (16, BlockSizes(block_m=16, block_n=512, block_k=1024)),
        (128, BlockSizes(block_m=128, block_n=256, block_k=512)),
        (1 << 62, BlockSizes(block_m=256, block_n=256, block_k=512)),
    ),
    "gpu": (
        (8, BlockSizes(block_m=8, block_n=64, block_k=128)),
        (64, BlockSizes(block_m=32, block_n=64, block_k=64)),
        (1 << 62, BlockSizes(block_m=64, block_n=128, block_k=64)),
    ),
}


def get_block_sizes(backend: str, m: int) -> BlockSizes:
    """Default block sizes for `backend` ("tpu" or "gpu") and M rows of activations."""
    try:
        rows = DEFAULT_BLOCK_SIZES[backend]
    except KeyError:
        raise ValueError(f"no block sizes for {backend=}; expected one of "
                         f"{sorted(DEFAULT_BLOCK_SIZES)}") from None
    for max_m, sizes in rows:
        if m <= max_m:
            return sizes
    return rows[-1][1]
