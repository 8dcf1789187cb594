"""Pallas kernels for jquant's quantized matmuls (dense and MoE grouped), paged attention and
the Hadamard transform (installed as `jquant.kernels`).

Imports only jax and numpy, never jquant: the kernels are a leaf that jquant.ops calls.
"""

from ._formats import NF4_CODEBOOK as NF4_CODEBOOK
from ._formats import QTYPES as QTYPES
from .block_sizes import BlockSizes as BlockSizes
from .block_sizes import get_block_sizes as get_block_sizes
from .dispatch_table import has_dispatch_table as has_dispatch_table
from .dispatch_table import kernel_max_m as kernel_max_m
from .dispatch_table import prefer_kernel as prefer_kernel
from .dispatch_table import set_dispatch_table as set_dispatch_table
from .grouped_matmul import can_use_grouped_matmul as can_use_grouped_matmul
from .grouped_matmul import grouped_matmul as grouped_matmul
from .grouped_matmul import grouped_matmul_reference as grouped_matmul_reference
from .hadamard import can_use_hadamard_kernel as can_use_hadamard_kernel
from .hadamard import hadamard_reference as hadamard_reference
from .hadamard import hadamard_transform as hadamard_transform
from .paged_attention import can_use_paged_attention as can_use_paged_attention
from .paged_attention import paged_attention as paged_attention
from .paged_attention import paged_attention_reference as paged_attention_reference
from .quantized_matmul import _normalize_backend
from .quantized_matmul import can_use_gpu_kernel as can_use_gpu_kernel
from .quantized_matmul import can_use_tpu_kernel as can_use_tpu_kernel
from .quantized_matmul import dequantize as dequantize
from .quantized_matmul import planes_matmul_xla as planes_matmul_xla
from .quantized_matmul import quantized_matmul as quantized_matmul
from .quantized_matmul import quantized_matmul_reference as quantized_matmul_reference
from .quantized_matmul import select_gpu_kernel as select_gpu_kernel
from .quantized_matmul import validate_inputs as validate_inputs
from .w8a8 import can_use_gpu_w8a8 as can_use_gpu_w8a8
from .w8a8 import can_use_tpu_w8a8 as can_use_tpu_w8a8
from .w8a8 import quantize_activations as quantize_activations
from .w8a8 import quantized_matmul_w8a8 as quantized_matmul_w8a8
from .w8a8 import quantized_matmul_w8a8_reference as quantized_matmul_w8a8_reference
from .w8a8 import select_gpu_w8a8_kernel as select_gpu_w8a8_kernel

# "cuda" / "rocm" -> "gpu", None -> jax.default_backend(): one normaliser for jquant too.
normalize_backend = _normalize_backend
