"""Empirical bias correction after weight quantization.

Rounding weights shifts each layer's mean output: E[Q(W) x] - E[W x] = (Q(W) - W) E[x] is not
zero channel by channel, and the shift grows at 2-3 bits. :func:`bias_correct_` measures, layer by
layer in forward order, the mean output per channel of the quantized model (earlier layers
already corrected) against the float reference on calibration inputs and adds the difference to
the layer's bias (creating one where the layer had none). This is the "empirical bias
correction" of Nagel et al. (data-free quantization, 2019), done with real calibration data.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.modules.attention import attention_safe
from hawq.base.errors import ConfigError
from hawq.modules.passes import StopForward, hooked, model_device, read_batches, run_batches
from hawq.maths.quantizers import is_float
from hawq.modules.qmodules import ActQuantizer, QuantMixin
from hawq.modules.surgery import quantizable_layers
from hawq.feed.tasks import Task, as_task

__all__ = ["bias_correct_", "quantize_calibrate_"]


def _channel_dim(module: nn.Module) -> int:
    """The dim of a layer's output that holds its channels: the last for a Linear (its
    features, also on (batch, seq, features) inputs), 1 for a convolution."""
    return -1 if isinstance(module, nn.Linear) else 1


def _channel_mean(out: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sum over every dim but the channel dim ``dim``, in float64."""
    dim = dim % out.dim()
    dims = [d for d in range(out.dim()) if d != dim]
    return out.detach().double().sum(dim=dims)


@torch.no_grad()
def bias_correct_(model: nn.Module, reference: nn.Module, data: Any, max_samples: int = 512,
                  batch_size: int = 256, progress: bool = False,
                  task: Task | str | None = None) -> dict[str, float]:
    """Correct the biases of ``model``'s quantized layers (in place) against ``reference``.

    ``reference`` is the float model ``model`` was quantized from (same layer names). Weights-only
    plans work as they are; with quantized activations, call :func:`hawq.calibrate_` first (the
    ranges are then measured before the correction, so calibrating again afterwards is advised).
    ``data``: the first ``max_samples`` samples of any form :func:`hawq.feed.tasks.iter_batches`
    reads (labels not needed), fed to both models by ``task`` (default classification's feeding:
    a tensor itself, a pair's first item, a dict as keyword arguments). A Linear layer's channels
    are its output's last dim (so token models' layers are corrected per feature), a
    convolution's dim 1; quantized layers without a ``weight``/``bias`` pair (attention) are
    left alone.
    Returns {layer name: mean |shift| over its channels}. Cost: 1 + L forward passes over
    ``max_samples`` inputs for L quantized layers, each of the L cut off once its layer has run;
    no gradients. ``progress`` shows a bar over the layers.
    """
    task = as_task(task)
    x = read_batches(data, batch_size, "bias_correct_ data", limit=max_samples)
    mods = quantizable_layers(model)
    ref_mods = dict(reference.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, QuantMixin) and not is_float(m.w_bits)
             and isinstance(getattr(m, "weight", None), nn.Parameter) and hasattr(m, "bias")]
    missing = [n for n in names if n not in ref_mods]
    if missing:
        raise ConfigError(f"reference model has no layer {missing[0]!r}: pass the float model "
                          "that was quantized")
    for m in model.modules():
        if isinstance(m, ActQuantizer) and not is_float(m.bits) and m.state != "frozen":
            raise ConfigError("bias_correct_ needs calibrated activation quantizers: call "
                              "hawq.calibrate_(model, data) first, or quantize weights only")
    device = model_device(model)
    ref_device = model_device(reference)

    if not names:
        return {}
    ref = _means_each(reference, names, x, batch_size, ref_device, task=task)
    shifts: dict[str, float] = {}
    for n in tqdm(ref, desc="bias correction", disable=not progress, leave=False):
        # forward order, so each layer sees its inputs' corrected means
        q = _means_each(model, [n], x, batch_size, device, stop=True, task=task)[n]
        shift = (ref[n].to(q) - q).to(mods[n].weight.dtype)
        m = mods[n]
        if m.bias is None:
            m.bias = nn.Parameter(shift.to(device))
        else:
            m.bias.add_(shift.to(m.bias))
        shifts[n] = float(shift.abs().mean())
    return shifts


def _means_each(net: nn.Module, layer_names: list[str], x: Any, batch_size: int,
                dev: torch.device, stop: bool = False,
                task: Task | None = None) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each named layer over the batches ``x`` (one forward pass
    fed by ``task``; with ``stop``, each batch's pass ends at the single named layer)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    named = dict(net.named_modules())

    def hook(name: str):
        dim = _channel_dim(named[name])

        def fn(_m, _i, out):
            s = _channel_mean(out, dim)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[dim]
            if stop:
                raise StopForward
        return fn

    # attention_safe: the float MultiheadAttention calls out_proj as a module, so hooks fire
    with hooked([(named[n], hook(n)) for n in layer_names]), attention_safe(net):
        run_batches(net, x, batch_size, dev, task, who="bias_correct_ data")
    missing = [n for n in layer_names if n not in sums]
    if missing:
        raise ConfigError(f"layer {missing[0]!r} never ran in the forward pass, so its bias "
                          "cannot be corrected: quantize only layers the model uses")
    return {n: sums[n] / counts[n] for n in sums}  # in the order the layers first ran


def quantize_calibrate_(model: nn.Module, plan: Any, config: Any, calib: Any,
                        calib_samples: int | None = 512, bias_correct: bool = False,
                        progress: bool = False, task: Task | str | None = None) -> Any:
    """The post-training recipe shared by ``hawq compress``, ``hawq eval`` and export: quantize
    ``model`` in place with ``plan``, calibrate its activation ranges on ``calib``, and with
    ``bias_correct`` correct the biases against a float copy and calibrate again (the corrected
    layers feed the next layers' ranges). ``calib`` is any form :func:`hawq.feed.tasks.iter_batches`
    reads, fed by ``task`` (default classification's feeding). Returns :func:`hawq.quantize_`'s
    report. Cost: one calibration pass; with ``bias_correct`` another, plus
    :func:`bias_correct_`'s 1 + L passes."""
    import copy

    from hawq.modules.surgery import calibrate_, quantize_

    reference = copy.deepcopy(model).eval() if bias_correct else None
    report = quantize_(model, plan, config)
    calibrate_(model, calib, max_samples=calib_samples, task=task)
    if reference is not None:
        bias_correct_(model, reference, calib, max_samples=calib_samples or 512,
                      progress=progress, task=task)
        calibrate_(model, calib, max_samples=calib_samples, task=task)
    return report
