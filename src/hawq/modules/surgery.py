"""Model surgery: list quantizable layers, swap in quantized twins from a plan, calibrate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hawq.modules.attention import attention_safe, pin_slow_path_
from hawq.base.errors import ConfigError
from hawq.maths.plan import BitPlan, LayerSpec, QuantConfig
from hawq.modules.qmodules import (ActQuantizer, QuantMixin, is_quantizable, layer_bias, layer_weight,
                           to_twin)
from hawq.modules.passes import model_device
from hawq.feed.tasks import Task, as_task, batch_len, batch_to, iter_batches

__all__ = ["LayerInfo", "QuantizeReport", "calibrate_", "current_plan", "layers",
           "quantizable_layers", "quantize_", "unsupported_layers"]


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
    """Name -> module for every Conv1d/Conv2d/Linear/MultiheadAttention (or registered type, or
    twin) in ``model``. A MultiheadAttention is the layer of its Q/K/V input projection (weight
    ``in_proj_weight``, see :func:`hawq.modules.qmodules.layer_weight`); its ``out_proj`` is its own
    layer ``<name>.out_proj``."""
    return {n: m for n, m in model.named_modules() if n and is_quantizable(m)}


def unsupported_layers(model: nn.Module) -> list[str]:
    """Modules with a parameter of their own (not a child's) of 2+ dims whose type has no
    quantized twin: they stay float. Leaves such as Embedding, and containers that hold such a
    parameter themselves (the root model is not listed)."""
    out = []
    for name, m in model.named_modules():
        if not name or is_quantizable(m):
            continue
        if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            out.append(name)
    return out


def _mha_qkv(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """query, key, value of a MultiheadAttention call (positional or keyword)."""
    names = ("query", "key", "value")
    return [*args[:3], *(kwargs[n] for n in names[len(args[:3]):] if n in kwargs)]


def _mha_batch(module: nn.Module, query: torch.Tensor) -> int:
    if query.dim() != 3:
        return 1
    return query.shape[0] if module.batch_first else query.shape[1]


def _mha_info(name: str, module: nn.Module, args: tuple, kwargs: dict) -> LayerInfo:
    """LayerInfo of an attention's in-projection, per sample (its ``out_proj`` is a module
    call of its own under :func:`hawq.modules.attention.attention_safe`)."""
    qkv = _mha_qkv(args, kwargs)
    n = _mha_batch(module, qkv[0])
    w, b = layer_weight(module), layer_bias(module)
    per = qkv[0].shape[1:] if qkv[0].dim() == 3 and module.batch_first else qkv[0].shape
    return LayerInfo(name, f"{type(module).__name__.removeprefix('Routed')}[in_proj Linear]",
                     w.numel(), 0 if b is None else b.numel(),
                     module.embed_dim * sum(t.numel() for t in qkv) // n,
                     [1, *per], [1, *per[:-1], w.shape[0]])


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
def layers(model: nn.Module, example_input: Any,
           task: Task | str | None = None) -> list[LayerInfo]:
    """Table of quantizable layers, in forward order, measured by hooks on one real forward.

    ``example_input`` is a batch (its first dim is the batch: a tensor, an (inputs, targets)
    pair, a dict of tensors such as a tokenizer's output) or any data
    :func:`hawq.feed.tasks.iter_batches` reads; its first sample is fed by ``task`` (default
    classification's feeding: a tensor itself, a pair's first item, a dict as keyword
    arguments). MACs and shapes are per sample.
    Layers that the forward never reaches are listed last with ``macs=0``. A MultiheadAttention
    is listed as its in-projection (type ``"...[in_proj Linear]"``, params of
    ``in_proj_weight``, MACs of the Q/K/V projections, out_shape ending in its 3E output
    channels), followed by its ``out_proj``. The forward runs under
    :func:`hawq.modules.attention.attention_safe` (no fused fast path). Cost: one forward.
    """
    mods = quantizable_layers(model)
    if not mods:
        raise ConfigError("the model has no Conv1d/Conv2d/Linear layer to quantize")
    task = as_task(task)
    batch = next(iter(iter_batches(example_input, 1, "example_input", limit=1)))
    batch = batch_to(batch, model_device(model))
    seen: dict[str, LayerInfo | None] = {}
    hooks = []

    def hook(name: str):
        def fn(module, inputs, output):
            if seen.get(name) is not None:  # a module called twice: add its MACs
                seen[name].macs += _macs(module, output)
                return
            bias = getattr(module, "bias", None)
            seen[name] = LayerInfo(name, type(module).__name__, module.weight.numel(),
                                   0 if bias is None else bias.numel(), _macs(module, output),
                                   [1, *inputs[0].shape[1:]], [1, *output.shape[1:]])
        return fn

    def reserve(name: str):
        def fn(module, args):
            seen.setdefault(name, None)
        return fn

    def mha_hook(name: str):
        def fn(module, args, kwargs, output):
            info = _mha_info(name, module, args, kwargs)
            if seen.get(name) is None:  # fill the slot its pre-hook reserved
                seen[name] = info
            else:
                seen[name].macs += info.macs
        return fn

    for name, m in mods.items():
        if isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_pre_hook(reserve(name)))  # keep forward order
            hooks.append(m.register_forward_hook(mha_hook(name), with_kwargs=True))
        else:
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with attention_safe(model):
            task.forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for name, m in mods.items():
        if seen.get(name) is None:
            seen.pop(name, None)
            bias = layer_bias(m)
            seen[name] = LayerInfo(name, type(m).__name__, layer_weight(m).numel(),
                                   0 if bias is None else bias.numel(), 0, [], [])
    return [info for info in seen.values() if info is not None]


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
    :func:`calibrate_` before evaluating with ``a_bits`` < 16. A quantized ``out_proj`` whose
    MultiheadAttention the plan leaves float gets that attention as a float-bits twin (32/32,
    listed in ``left_float``), which routes the attention output through ``out_proj``; and the
    transformer blocks holding twins lose their fused eval fast path for good
    (:func:`hawq.modules.attention.pin_slow_path_`), so the twins run in ``torch.no_grad`` evaluation
    too. Cost: no forward passes (plus the clipping search per layer when
    ``config.w_clip='mse'``).
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
        spec.check_channels(name, layer_weight(m).shape[0])
        _set_child(model, name, to_twin(m, spec, config))
        report.quantized.append(name)
    for name, m in list(model.named_modules()):  # a float MHA would bypass its out_proj twin
        if (isinstance(m, nn.MultiheadAttention) and not isinstance(m, QuantMixin)
                and isinstance(m.out_proj, QuantMixin)):
            _set_child(model, name, to_twin(m, LayerSpec(32, 32), config))
    pin_slow_path_(model)
    return report


def current_plan(model: nn.Module) -> BitPlan:
    """The bit plan a quantized model carries (its twins' bits)."""
    return BitPlan({n: LayerSpec(m.w_bits, m.a_bits) for n, m in model.named_modules()
                    if isinstance(m, QuantMixin)})


def calibrate_(model: nn.Module, data: Any, batch_size: int = 256,
               max_samples: int | None = None, task: Task | str | None = None) -> int:
    """Calibrate every activation quantizer on ``data``, then freeze them. Returns samples used.

    ``data``: any form :func:`hawq.feed.tasks.iter_batches` reads (a tensor of inputs, (inputs,
    labels), a TensorDataset, a dict of tensors, a Dataset, a DataLoader of tensors, pairs or
    dicts); labels are not needed. Batches are fed by ``task`` (default classification's
    feeding: a tensor itself, a pair's first item, a dict as keyword arguments without
    ``labels``). Raises :class:`hawq.base.errors.DataError` naming ``calibration data`` when it
    cannot be read or holds no samples.
    Cost: one forward over at most ``max_samples`` samples, model in eval mode, under
    :func:`hawq.modules.attention.attention_safe` (so attention twins are not bypassed). The forward
    runs under ``torch.inference_mode``; the calibrated ranges are returned to ordinary tensors
    afterwards, so they can be edited or loaded into later (``load_state_dict``, fine-tuning).
    """
    seen = _calibrate(model, data, batch_size, max_samples, as_task(task))
    for q in model.modules():
        if isinstance(q, ActQuantizer):
            for name in ("lo", "hi", "batches"):
                setattr(q, name, getattr(q, name).clone())  # out of inference mode
    return seen


@torch.inference_mode()
def _calibrate(model: nn.Module, data: Any, batch_size: int,
               max_samples: int | None, task: Task) -> int:
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.state = "calibrating"
        q.lo.fill_(float("inf"))
        q.hi.fill_(float("-inf"))
        q.batches.zero_()
    was_training = model.training
    model.eval()
    device = model_device(model)
    seen = 0
    try:
        with attention_safe(model):
            for batch in iter_batches(data, batch_size, "calibration data", limit=max_samples):
                task.forward(model, batch_to(batch, device))
                seen += batch_len(batch)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError("calibration data is empty: give at least one batch of inputs")
    for q in quantizers:
        q.freeze()
    return seen
