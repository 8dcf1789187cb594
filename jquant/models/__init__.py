"""Reference Flax NNX models (the Llama family), loading, and generation.

>>> model, params, tokenizer = jquant.models.load("smollm2-135m")  # doctest: +SKIP
>>> logits, _ = jquant.models.forward(model, params, tokens)  # doctest: +SKIP
>>> out = jquant.models.generate(model, qparams, [ids], max_new_tokens=32)  # doctest: +SKIP
"""

from jquant.models.cache import KV_CACHE_FORMATS as KV_CACHE_FORMATS
from jquant.models.cache import KVCache as KVCache
from jquant.models.cache import KVFormat as KVFormat
from jquant.models.cache import PagedCache as PagedCache
from jquant.models.cache import init_cache as init_cache
from jquant.models.cache import kv_format as kv_format
from jquant.models.config import LlamaConfig as LlamaConfig
from jquant.models.config import rope_inv_freq as rope_inv_freq
from jquant.models.convert import global_params_from_hf as global_params_from_hf
from jquant.models.convert import hf_name as hf_name
from jquant.models.convert import layer_params_from_hf as layer_params_from_hf
from jquant.models.convert import params_from_hf as params_from_hf
from jquant.models.convert import params_to_hf as params_to_hf
from jquant.models.generate import Generation as Generation
from jquant.models.generate import chat_prompt as chat_prompt
from jquant.models.generate import generate as generate
from jquant.models.generate import prompt_ids as prompt_ids
from jquant.models.llama import Llama as Llama
from jquant.models.llama import abstract_model as abstract_model
from jquant.models.llama import forward as forward
from jquant.models.llama import init_model as init_model
from jquant.models.load import default_dtype as default_dtype
from jquant.models.load import load as load
from jquant.models.load import load_packed as load_packed
from jquant.models.load import model_from_arrays as model_from_arrays
from jquant.models.sampling import Sampler as Sampler
from jquant.models.sampling import Sampling as Sampling
from jquant.models.sampling import sample as sample
