"""Calibrated post-training quantization: data, input statistics, scale folding, drivers.

>>> model, params, tok = jquant.models.load("smollm2-135m")  # doctest: +SKIP
>>> tokens = jquant.calib.calibration_tokens(tok)  # 128 x 512 from python-mix  # doctest: +SKIP
>>> qparams, report = jquant.calib.quantize_model(model, params, "w4a16-gptq-g128", tokens)
...  # doctest: +SKIP
>>> model, qparams, report = jquant.calib.apply_recipe(model, params, "w4a16-gptq-g128",
...                                                    tokenizer=tok)  # doctest: +SKIP
"""

from jquant._tap import Tap as Tap
from jquant._tap import tapping as tapping
from jquant._tap import with_taps as with_taps
from jquant.calib.apply import apply_recipe as apply_recipe
from jquant.calib.apply import check_float as check_float
from jquant.calib.apply import is_quantized as is_quantized
from jquant.calib.apply import quantize_loaded as quantize_loaded
from jquant.calib.data import calibration_tokens as calibration_tokens
from jquant.calib.driver import CALIBRATED as CALIBRATED
from jquant.calib.driver import CalibrationReport as CalibrationReport
from jquant.calib.driver import LayerRow as LayerRow
from jquant.calib.driver import needs_calibration as needs_calibration
from jquant.calib.driver import quantize_model as quantize_model
from jquant.calib.driver import quantize_with_inputs as quantize_with_inputs
from jquant.calib.fold import Fold as Fold
from jquant.calib.fold import apply_fold as apply_fold
from jquant.calib.fold import llama_folds as llama_folds
from jquant.calib.stats import Calibration as Calibration
