"""Budget accounting: model size, compression, BOPs and average bits of a bit plan.

Conventions: quantized weights count at their bit width; everything else (biases, BatchNorm,
layers the plan leaves float, unsupported layers) counts at 32 bits. Weight compression and
average bits are over the quantizable layers' weights only (all-4-bit = exactly 8x), as in the
HAWQ papers. BOPs = sum over layers of MACs x w_bits x a_bits (float counts as 32).
Per-channel ``w_bits`` (a list, one per output channel) count exactly: each channel's
params/out_channels weights at its own bits, and MACs/out_channels x its bits x a_bits BOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from hawq.base.errors import ConfigError
from hawq.maths.plan import BitPlan
from hawq.modules.surgery import LayerInfo

__all__ = ["BudgetReport", "budget_report", "count_params", "layer_bits"]


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


def layer_bits(plan: BitPlan, infos: list[LayerInfo]) -> list[tuple[int | list[int], int]]:
    """(w_bits, a_bits) per layer; layers the plan leaves out are (32, 32). ``w_bits`` is a list
    for per-channel layers."""
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
    for info, (w, _) in zip(infos, bits):
        if isinstance(w, list):
            _check_channels(info, len(w))
    # per-channel: (params/C) * sum(bits), exact because C divides params and MACs
    weight_bits = sum(i.params * w if isinstance(w, int) else i.params // len(w) * sum(w)
                      for i, (w, _) in zip(infos, bits))
    size_bits = weight_bits + 32 * (total_params - q_params)
    bops = sum(i.macs * w * a if isinstance(w, int) else i.macs // len(w) * sum(w) * a
               for i, (w, a) in zip(infos, bits))
    macs = sum(i.macs for i in infos)
    return BudgetReport(
        total_params=total_params, quantizable_params=q_params, weight_bits=weight_bits,
        size_bits=size_bits, size_bytes=size_bits / 8, fp32_bytes=total_params * 4,
        compression=32 * total_params / size_bits, weight_compression=32 * q_params / weight_bits,
        avg_bits=weight_bits / q_params, bops=bops, fp32_bops=macs * 32 * 32, macs=macs)


def _check_channels(info: LayerInfo, n: int) -> None:
    """Per-channel bits must match the layer's output channels (from its output shape)."""
    shape = info.out_shape
    expected = (shape[-1] if "Linear" in info.type else shape[1]) if len(shape) >= 2 else None
    if expected is None and info.params % n == 0:
        return
    if n != expected or info.params % n or info.macs % n:
        raise ConfigError(f"layer {info.name!r}: w_bits has {n} per-channel bit widths but the "
                          f"layer has {expected if expected is not None else '?'} output channels;"
                          " give one bit width per output channel")


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers) of ``model``; learned quantizer step sizes
    (``w_step``, ``act.step``, from ``QuantConfig(learn_steps=True)``) are quantization
    metadata, not weights, and are not counted."""
    return sum(p.numel() for n, p in model.named_parameters()
               if not n.endswith(("w_step", "act.step")))
