"""hawq: Hessian-aware mixed-precision quantization for PyTorch models."""

from hawq.accounting import BudgetReport, budget_report, count_params
from hawq.biascorr import bias_correct_
from hawq.errors import (BudgetError, ConfigError, DataError, HawqError, NumericalError,
                         UnsupportedLayerError)
from hawq.evaluate import EvalResult, evaluate
from hawq.plan import BitPlan, LayerSpec, QuantConfig
from hawq.surgery import (LayerInfo, QuantizeReport, calibrate_, current_plan, layers,
                          quantizable_layers, quantize_)

__version__ = "0.1.0"

__all__ = [
    "BitPlan", "BudgetError", "BudgetReport", "ConfigError", "DataError", "EvalResult",
    "HawqError", "LayerInfo", "LayerSpec", "NumericalError", "QuantConfig", "QuantizeReport",
    "UnsupportedLayerError", "bias_correct_", "budget_report", "calibrate_", "count_params", "current_plan",
    "evaluate", "layers", "quantizable_layers", "quantize_",
]
