"""Quantization-aware training: fake quantization driven by the PTQ recipe, in any optax loop.

The recipe that will serve the model drives training too: every weight it quantizes is
replaced, inside your loss, by its fake-quantized value (quantize, then dequantize,
exactly as `jquant.quantize` would) with straight-through gradients; learned scales and
zero points (LSQ / LSQ+) sit beside the params in a plain dict that optax updates; and
:func:`convert` packs the trained weights into the QArrays that serve them, code for code.

>>> state = jquant.qat.init(params, "w4a16-rtn-g128")                    # doctest: +SKIP
>>> loss = jquant.qat.wrap(float_loss, "w4a16-rtn-g128")                 # doctest: +SKIP
>>> tx = jquant.qat.optimizer(optax.adamw(1e-5), scales=optax.adam(1e-3))  # doctest: +SKIP
>>> grads = jax.grad(loss, argnums=(0, 1))(params, state, batch)          # doctest: +SKIP
>>> jquant.qat.check_loss(loss(params, state, batch), step=0)  # NaN: error  # doctest: +SKIP
>>> qparams = jquant.qat.convert(params, state, "w4a16-rtn-g128")        # doctest: +SKIP

QLoRA (LoRA adapters on a frozen quantized base) is `jquant.qat.lora`. See docs/qat.md.
"""

from jquant._act import ActQuantized as ActQuantized
from jquant.qat import lora as lora
from jquant.qat.core import QATState as QATState
from jquant.qat.core import convert as convert
from jquant.qat.core import fake_quantize as fake_quantize
from jquant.qat.core import from_quantized as from_quantized
from jquant.qat.core import init as init
from jquant.qat.core import nonpositive_scales as nonpositive_scales
from jquant.qat.core import optimizer as optimizer
from jquant.qat.core import quantized_paths as quantized_paths
from jquant.qat.core import wrap as wrap
from jquant.qat.distill import check_loss as check_loss
from jquant.qat.distill import kl_divergence as kl_divergence
from jquant.qat.distill import next_token_loss as next_token_loss
from jquant.qat.fake import fake_quantize_leaf as fake_quantize_leaf
