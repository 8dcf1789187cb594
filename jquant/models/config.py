"""`LlamaConfig` and the family table, as `jquant.models` has always exported them.

They live in `jquant.arch`, a module that imports nothing of jquant, so that `jquant.io`
(which reads configs) never imports `jquant.models` (which imports `jquant.io` to load).
"""

from jquant.arch import FAMILIES as FAMILIES
from jquant.arch import FULL as FULL
from jquant.arch import SLIDING as SLIDING
from jquant.arch import SUPPORTED_ACTIVATIONS as SUPPORTED_ACTIVATIONS
from jquant.arch import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from jquant.arch import SUPPORTED_ROPE_TYPES as SUPPORTED_ROPE_TYPES
from jquant.arch import Family as Family
from jquant.arch import LlamaConfig as LlamaConfig
from jquant.arch import layer_types as layer_types
from jquant.arch import param_shapes as param_shapes
from jquant.arch import rope_inv_freq as rope_inv_freq
from jquant.arch import text_config as text_config
