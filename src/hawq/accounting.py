"""Budget accounting: model size, compression, BOPs and average bits of a bit plan.

Conventions: quantized weights count at their bit width; everything else (biases, BatchNorm,
layers the plan leaves float, unsupported layers) counts at 32 bits. Weight compression and
average bits are over the quantizable layers' weights only (all-4-bit = exactly 8x), as in the
HAWQ papers. BOPs = sum over layers of MACs x w_bits x a_bits (float counts as 32).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from hawq.plan import BitPlan
from hawq.surgery import LayerInfo


@dataclass
class BudgetReport:
    """Size and cost of a plan; see the module docstring for the conventions."""

    total_params: int
    quantizable_params: int
    weight_bits: int
    size_bits: int
    size_bytes: float
    fp32_bytes: float
    compression: float
    weight_compression: float
    avg_bits: float
    bops: int
    fp32_bops: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_bits(plan: BitPlan, infos: list[LayerInfo]) -> list[tuple[int, int]]:
    """(w_bits, a_bits) per layer; layers the plan leaves out are (32, 32)."""
    out = []
    for info in infos:
        spec = plan.spec_for(info.name)
        out.append((32, 32) if spec is None else (spec.w_bits, spec.a_bits))
    return out


def budget_report(infos: list[LayerInfo], plan: BitPlan, total_params: int) -> BudgetReport:
    """Account ``plan`` over the layers ``infos`` of a model with ``total_params`` parameters.

    Pure arithmetic over the table from :func:`hawq.layers`; no forward passes.
    """
    bits = layer_bits(plan, infos)
    q_params = sum(i.params for i in infos)
    weight_bits = sum(i.params * w for i, (w, _) in zip(infos, bits))
    size_bits = weight_bits + 32 * (total_params - q_params)
    bops = sum(i.macs * w * a for i, (w, a) in zip(infos, bits))
    macs = sum(i.macs for i in infos)
    return BudgetReport(
        total_params=total_params, quantizable_params=q_params, weight_bits=weight_bits,
        size_bits=size_bits, size_bytes=size_bits / 8, fp32_bytes=total_params * 4,
        compression=32 * total_params / size_bits, weight_compression=32 * q_params / weight_bits,
        avg_bits=weight_bits / q_params, bops=bops, fp32_bops=macs * 32 * 32, macs=macs)


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers) of ``model``."""
    return sum(p.numel() for p in model.parameters())
