"""Model import: GGUF files, Hugging Face directories and hub ids, named models.

Every importer returns a `Checkpoint`: an HF-style config dict, float32 numpy tensors named and
laid out as transformers' `LlamaForCausalLM` state dict, and a `Tokenizer` (or None). With
``lazy=True`` the tensors are a `LazyTensors`, which reads each one from disk when it is looked
up: a model larger than host memory is then read a layer at a time.

>>> from jquant.io import load_checkpoint
>>> ckpt = load_checkpoint("smollm2-135m")  # doctest: +SKIP
>>> lazy = load_checkpoint("smollm2-135m", lazy=True)  # doctest: +SKIP
"""

from ._checkpoint import CONFIG_KEYS as CONFIG_KEYS
from ._checkpoint import MOE_CONFIG_KEYS as MOE_CONFIG_KEYS
from ._checkpoint import SUPPORTED_MODEL_TYPES as SUPPORTED_MODEL_TYPES
from ._checkpoint import Checkpoint as Checkpoint
from ._checkpoint import expected_shapes as expected_shapes
from ._lazy import LazyTensors as LazyTensors
from .gguf import load_gguf as load_gguf
from .hf import load_hf_dir as load_hf_dir
from .hf import load_hub as load_hub
from .registry import MODELS as MODELS
from .registry import ModelSpec as ModelSpec
from .registry import cache_dir as cache_dir
from .registry import list_models as list_models
from .registry import load_checkpoint as load_checkpoint
from .registry import model_path as model_path
from .tokenizer import Tokenizer as Tokenizer
from .tokenizer import encode_prompt as encode_prompt
from .tokenizer import leading_bos as leading_bos
