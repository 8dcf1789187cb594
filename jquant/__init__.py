"""jquant: quantize JAX/Flax models and run them with fused kernels on TPU, GPU and CPU."""

from jquant import algorithms as algorithms
from jquant import alloc as alloc
from jquant import calib as calib
from jquant import eval as eval
from jquant import intercept as intercept
from jquant import models as models
from jquant import ops as ops
from jquant import qtypes as qtypes
from jquant import sharding as sharding
from jquant import tree as tree
from jquant.intercept import apply as apply
from jquant.intercept import linen_quantized as linen_quantized
from jquant.intercept import nnx_apply as nnx_apply
from jquant.intercept import nnx_quantized as nnx_quantized
from jquant.memory import MemoryReport as MemoryReport
from jquant.memory import memory_report as memory_report
from jquant.qarray import QArray as QArray
from jquant.qarray import quantize_array as quantize_array
from jquant.qtypes import QType as QType
from jquant.recipe import Recipe as Recipe
from jquant.recipe import Rule as Rule
from jquant.sharding import shard_params as shard_params
from jquant.sharding import storage_partition_spec as storage_partition_spec
from jquant.transform import ReportRow as ReportRow
from jquant.transform import format_report as format_report
from jquant.transform import quantize as quantize

__version__ = "0.1.0"
