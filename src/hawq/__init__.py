"""hawq: Hessian-aware mixed-precision quantization for PyTorch models.

One verb per stage: :func:`analyze` (per-layer Hessian statistics), :func:`allocate` (bits under a
budget), :func:`quantize_` / :func:`calibrate_` (in place), :func:`evaluate`, :func:`finetune`,
:func:`save_quantized`; and the whole jobs :func:`compress` and :func:`zeroq`, on any model with
its own data and :class:`Task`.
"""

from hawq.modules.accounting import BudgetReport, budget_report, count_params
from hawq.maths.allocation import Allocation, allocate
from hawq.post.biascorr import bias_correct_
from hawq.maths.budgets import Budget
from hawq.post.config import CompressConfig, ZeroQConfig
from hawq.base.errors import (BudgetError, ConfigError, DataError, HawqError, NumericalError,
                         UnsupportedLayerError)
from hawq.modules.evaluate import EvalResult, evaluate
from hawq.post.export import load_quantized, save_quantized
from hawq.post.finetune import FinetuneConfig, finetune
from hawq.analysis.hessian import HessianResult, analyze
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.post.refine import refine_plan
from hawq.analysis.sensitivities import register_sensitivity, sensitivity_costs
from hawq.modules.surgery import (LayerInfo, QuantizeReport, calibrate_, current_plan, layers,
                          quantizable_layers, quantize_)
from hawq.feed.tasks import Task, custom_task, register_task
from hawq.workflows.workflow import CompressResult, Splits, compress, finetune_plan, zeroq

__version__ = "0.2.0"

__all__ = [
    "Allocation", "BitPlan", "Budget", "BudgetError", "BudgetReport", "CompressConfig",
    "CompressResult", "ConfigError", "DataError", "EvalResult", "FinetuneConfig", "HawqError",
    "HessianResult", "LayerInfo", "LayerSpec", "NumericalError", "QuantConfig", "QuantizeReport",
    "Splits", "Task", "UnsupportedLayerError", "ZeroQConfig", "allocate", "analyze",
    "bias_correct_", "budget_report", "calibrate_", "compress", "count_params", "current_plan",
    "custom_task", "evaluate", "finetune", "finetune_plan", "layers", "load_quantized",
    "quantizable_layers", "quantize_", "refine_plan", "register_sensitivity", "register_task",
    "save_quantized", "sensitivity_costs", "zeroq",
]
