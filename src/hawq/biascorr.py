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

from hawq.errors import ConfigError
from hawq.passes import StopForward, as_inputs, hooked, run_batches
from hawq.quantizers import is_float
from hawq.qmodules import ActQuantizer, QuantMixin
from hawq.surgery import quantizable_layers


def _channel_mean(out: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the channel dim (1), in float64."""
    dims = [d for d in range(out.dim()) if d != 1]
    return out.detach().double().sum(dim=dims)


@torch.no_grad()
def bias_correct_(model: nn.Module, reference: nn.Module, data: Any, max_samples: int = 512,
                  batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """Correct the biases of ``model``'s quantized layers (in place) against ``reference``.

    ``reference`` is the float model ``model`` was quantized from (same layer names). Weights-only
    plans work as they are; with quantized activations, call :func:`hawq.calibrate_` first (the
    ranges are then measured before the correction, so calibrating again afterwards is advised).
    Returns {layer name: mean |shift| over its channels}. Cost: 1 + L forward passes over
    ``max_samples`` inputs for L quantized layers, each of the L cut off once its layer has run;
    no gradients. ``progress`` shows a bar over the layers.
    """
    x = as_inputs(data, "bias_correct_ data")[:max_samples]
    mods = quantizable_layers(model)
    ref_mods = dict(reference.named_modules())
    names = [n for n, m in mods.items() if isinstance(m, QuantMixin) and not is_float(m.w_bits)]
    missing = [n for n in names if n not in ref_mods]
    if missing:
        raise ConfigError(f"reference model has no layer {missing[0]!r}: pass the float model "
                          "that was quantized")
    for m in model.modules():
        if isinstance(m, ActQuantizer) and not is_float(m.bits) and m.state != "frozen":
            raise ConfigError("bias_correct_ needs calibrated activation quantizers: call "
                              "hawq.calibrate_(model, data) first, or quantize weights only")
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device

    if not names:
        return {}
    ref = _means_each(reference, names, x, batch_size, ref_device)
    shifts: dict[str, float] = {}
    for n in tqdm(ref, desc="bias correction", disable=not progress, leave=False):
        # forward order, so each layer sees its inputs' corrected means
        q = _means_each(model, [n], x, batch_size, device, stop=True)[n]
        shift = (ref[n].to(q) - q).to(mods[n].weight.dtype)
        m = mods[n]
        if m.bias is None:
            m.bias = nn.Parameter(shift.to(device))
        else:
            m.bias.add_(shift.to(m.bias))
        shifts[n] = float(shift.abs().mean())
    return shifts


def _means_each(net: nn.Module, layer_names: list[str], x: torch.Tensor, batch_size: int,
                dev: torch.device, stop: bool = False) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each named layer over ``x`` (one forward pass; with
    ``stop``, each batch's pass ends at the single named layer)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    named = dict(net.named_modules())

    def hook(name: str):
        def fn(_m, _i, out):
            s = _channel_mean(out)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]
            if stop:
                raise StopForward
        return fn

    with hooked([(named[n], hook(n)) for n in layer_names]):
        run_batches(net, x, batch_size, dev)
    missing = [n for n in layer_names if n not in sums]
    if missing:
        raise ConfigError(f"layer {missing[0]!r} never ran in the forward pass, so its bias "
                          "cannot be corrected: quantize only layers the model uses")
    return {n: sums[n] / counts[n] for n in sums}  # in the order the layers first ran


def quantize_calibrate_(model: nn.Module, plan: Any, config: Any, calib: Any,
                        calib_samples: int | None = 512, bias_correct: bool = False,
                        progress: bool = False) -> Any:
    """The post-training recipe shared by ``hawq compress``, ``hawq eval`` and export: quantize
    ``model`` in place with ``plan``, calibrate its activation ranges on ``calib``, and with
    ``bias_correct`` correct the biases against a float copy and calibrate again (the corrected
    layers feed the next layers' ranges). Returns :func:`hawq.quantize_`'s report. Cost: one calibration pass; with
    ``bias_correct`` another, plus :func:`bias_correct_`'s 1 + L passes."""
    import copy

    from hawq.surgery import calibrate_, quantize_

    reference = copy.deepcopy(model).eval() if bias_correct else None
    report = quantize_(model, plan, config)
    calibrate_(model, calib, max_samples=calib_samples)
    if reference is not None:
        bias_correct_(model, reference, calib, max_samples=calib_samples or 512,
                      progress=progress)
        calibrate_(model, calib, max_samples=calib_samples)
    return report
