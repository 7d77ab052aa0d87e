"""Model surgery: list quantizable layers, swap in quantized twins from a plan, calibrate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from hawq.errors import ConfigError
from hawq.plan import BitPlan, QuantConfig
from hawq.qmodules import ActQuantizer, QuantMixin, is_quantizable, to_twin


@dataclass
class LayerInfo:
    """One quantizable layer: weight parameter count, MACs per sample, shapes (batch dim 1)."""

    name: str
    type: str
    params: int
    bias_params: int
    macs: int
    in_shape: list[int]
    out_shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> module for every Conv1d/Conv2d/Linear (or registered type, or twin) in ``model``."""
    return {n: m for n, m in model.named_modules() if n and is_quantizable(m)}


def unsupported_layers(model: nn.Module) -> list[str]:
    """Leaf modules with a weight of 2+ dims whose type has no quantized twin (they stay float)."""
    out = []
    for name, m in model.named_modules():
        if not name or is_quantizable(m) or next(m.children(), None) is not None:
            continue
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            out.append(name)
    return out


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    per_sample_out = out[0].numel()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = math.prod(module.kernel_size) * module.in_channels // module.groups
        return per_sample_out * k
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    w = getattr(module, "weight", None)
    return per_sample_out * (w[0].numel() if w is not None else 0)


@torch.no_grad()
def layers(model: nn.Module, example_input: torch.Tensor) -> list[LayerInfo]:
    """Table of quantizable layers, in forward order, measured by hooks on one real forward.

    ``example_input`` is a batch (its first dim is the batch); MACs and shapes are per sample.
    Layers that the forward never reaches are listed last with ``macs=0``. Cost: one forward.
    """
    mods = quantizable_layers(model)
    if not mods:
        raise ConfigError("the model has no Conv1d/Conv2d/Linear layer to quantize")
    seen: dict[str, LayerInfo] = {}
    hooks = []

    def hook(name: str):
        def fn(module, inputs, output):
            if name in seen:  # a module called twice: add its MACs
                seen[name].macs += _macs(module, output)
                return
            bias = getattr(module, "bias", None)
            seen[name] = LayerInfo(name, type(module).__name__, module.weight.numel(),
                                   0 if bias is None else bias.numel(), _macs(module, output),
                                   [1, *inputs[0].shape[1:]], [1, *output.shape[1:]])
        return fn

    for name, m in mods.items():
        hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        model(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for name, m in mods.items():
        if name not in seen:
            bias = getattr(m, "bias", None)
            seen[name] = LayerInfo(name, type(m).__name__, m.weight.numel(),
                                   0 if bias is None else bias.numel(), 0, [], [])
    return list(seen.values())


@dataclass
class QuantizeReport:
    """What :func:`quantize_` did: layers swapped, left float, and unsupported."""

    quantized: list[str] = field(default_factory=list)
    left_float: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, plan: BitPlan, config: QuantConfig | None = None) -> QuantizeReport:
    """Swap quantizable layers for quantized twins in place, following ``plan``.

    Layers the plan does not name (and no default) stay untouched; unsupported layer types are
    listed, not touched. Activation quantizers start in calibration mode: call
    :func:`calibrate_` before evaluating with ``a_bits`` < 16. Cost: no forward passes (plus the
    clipping search per layer when ``config.w_clip='mse'``).
    """
    config = config or QuantConfig()
    mods = quantizable_layers(model)
    unknown = sorted(set(plan.layers) - set(mods))
    if unknown:
        raise ConfigError(f"plan names layers the model does not have: {unknown}; quantizable "
                          f"layers are {sorted(mods)}")
    report = QuantizeReport(unsupported=unsupported_layers(model))
    for name, m in mods.items():
        spec = plan.spec_for(name)
        if spec is None:
            report.left_float.append(name)
            continue
        spec.check_channels(name, m.weight.shape[0])
        _set_child(model, name, to_twin(m, spec, config))
        report.quantized.append(name)
    return report


def current_plan(model: nn.Module) -> BitPlan:
    """The bit plan a quantized model carries (its twins' bits)."""
    from hawq.plan import LayerSpec

    return BitPlan({n: LayerSpec(m.w_bits, m.a_bits) for n, m in model.named_modules()
                    if isinstance(m, QuantMixin)})


def _batches(data: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if hasattr(data, "tensors"):  # TensorDataset
        yield from data.tensors[0].split(batch_size)
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate_(model: nn.Module, data: Any, batch_size: int = 256,
               max_samples: int | None = None) -> int:
    """Calibrate every activation quantizer on ``data``, then freeze them. Returns samples used.

    ``data``: a tensor of inputs, a TensorDataset, or an iterable of batches (x or (x, y)).
    Cost: one forward over at most ``max_samples`` samples, model in eval mode. The forward
    runs under ``torch.inference_mode``; the calibrated ranges are returned to ordinary tensors
    afterwards, so they can be edited or loaded into later (``load_state_dict``, fine-tuning).
    """
    seen = _calibrate(model, data, batch_size, max_samples)
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            for name in ("lo", "hi", "batches"):
                setattr(q, name, getattr(q, name).clone())  # out of inference mode
    return seen


@torch.inference_mode()
def _calibrate(model: nn.Module, data: Any, batch_size: int,
               max_samples: int | None) -> int:
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.state = "calibrating"
        q.lo.fill_(float("inf"))
        q.hi.fill_(float("-inf"))
        q.batches.zero_()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for x in _batches(data, batch_size):
            if max_samples is not None and seen >= max_samples:
                break
            if max_samples is not None:
                x = x[: max_samples - seen]
            model(x.to(device))
            seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("calibration data is empty: give at least one batch of inputs")
    for q in quantizers:
        q.freeze()
    return seen
