"""Automatic bit allocation: the best recipe a budget allows, written out as plain YAML.

1. **Measure** (`measure`, or `measure_source` for a checkpoint read one layer at a time):
   one forward and backward pass over calibration windows gathers, for every matmul kernel,
   its input second moment ``H`` and the squared loss gradients at its outputs ``G``
   (`jquant.alloc.sensitivity`); every tensor is then quantized in every candidate format
   (with the candidate's algorithm: GPTQ uses ``H``) and priced: the predicted increase of
   the mean cross-entropy ``½ Σ_j G_j ΔW_jᵀ H ΔW_j`` and the bytes. The backward pass runs
   layer by layer, and each layer is priced as soon as its statistics are complete, so
   only one layer's weights and statistics are held at a time. The table is cached, so a
   second budget costs seconds.
2. **Allocate** (`allocate`): one candidate per tensor, least total predicted cost, total
   bytes (every weight counted, float leaves included) within the budget: a multiple-choice
   knapsack solved by dynamic programming (`jquant.alloc.knapsack`). A tied embedding may
   keep one shared table or be split into an embedding and a head of different formats.
3. **Write** (`Allocation.recipe`): a `jquant.Recipe` with one explicit rule per tensor,
   which ``jquant quantize --recipe`` runs like any other.

The budget (`budget_bytes`) is given as bits per weight, as a size, or as an accelerator
with a context and batch to serve (the memory report's KV cache and overhead subtracted).

>>> table = measure(model, params, tokens)  # doctest: +SKIP
>>> allocate(table, budget_bytes(table, target_bits=4.25)).recipe("smollm2-4.25b")  # doctest: +SKIP

The modules: `jquant.alloc.table` (`Sensitivity`, `measure`, the cache),
`jquant.alloc.budget` (`budget_bytes`, `parse_size`, `find_device`),
`jquant.alloc.allocation` (`allocate`, `Allocation`), `jquant.alloc.sensitivity` (the
statistics, layer by layer), `jquant.alloc.pricing` (the candidates and their prices),
`jquant.alloc.experts` (a mixture-of-experts layer's expert stacks:
one choice each, priced expert by expert) and `jquant.alloc.knapsack` (the solver).
"""

from jquant.alloc.allocation import Allocation as Allocation
from jquant.alloc.allocation import allocate as allocate
from jquant.alloc.budget import budget_bytes as budget_bytes
from jquant.alloc.budget import find_device as find_device
from jquant.alloc.budget import parse_size as parse_size
from jquant.alloc.knapsack import BudgetError as BudgetError
from jquant.alloc.knapsack import solve as solve
from jquant.alloc.pricing import Candidate as Candidate
from jquant.alloc.pricing import Option as Option
from jquant.alloc.pricing import candidate as candidate
from jquant.alloc.table import FP4_CANDIDATES as FP4_CANDIDATES
from jquant.alloc.table import GGUF_KERNEL_CANDIDATES as GGUF_KERNEL_CANDIDATES
from jquant.alloc.table import GGUF_TABLE_CANDIDATES as GGUF_TABLE_CANDIDATES
from jquant.alloc.table import KERNEL_CANDIDATES as KERNEL_CANDIDATES
from jquant.alloc.table import TABLE_CANDIDATES as TABLE_CANDIDATES
from jquant.alloc.table import Sensitivity as Sensitivity
from jquant.alloc.table import cache_dir as cache_dir
from jquant.alloc.table import measure as measure
from jquant.alloc.table import measure_source as measure_source

__all__ = ["BudgetError", "Candidate", "candidate", "measure", "measure_source", "allocate",
           "budget_bytes",
           "Sensitivity", "Allocation", "KERNEL_CANDIDATES", "FP4_CANDIDATES",
           "TABLE_CANDIDATES", "GGUF_KERNEL_CANDIDATES", "GGUF_TABLE_CANDIDATES"]  # fmt: skip
