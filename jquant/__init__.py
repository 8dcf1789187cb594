"""jquant: quantize JAX/Flax models and run them with fused kernels on TPU, GPU and CPU."""

from jquant import ops as ops
from jquant import qtypes as qtypes
from jquant.qarray import QArray as QArray
from jquant.qarray import quantize_array as quantize_array
from jquant.qtypes import QType as QType

__version__ = "0.1.0"
