"""From per-layer sensitivities to per-(layer, bit width) costs Omega that allocators minimise.

* ``hawq-v2``: Omega_i(b) = Tr(H_i)/n_i * ||Q_b(W_i) - W_i||^2 (average Hessian trace).
* ``hawq-v1``: Omega_i(b) = lambda_i * ||Q_b(W_i) - W_i||^2 (top Hessian eigenvalue).
* any user score s_i: Omega_i(b) = s_i * ||Q_b(W_i) - W_i||^2.
* measured: Delta L_i(b), the loss increase of quantizing layer i alone (forward passes only).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base import dist
from hawq.base.errors import ConfigError, NumericalError
from hawq.modules.passes import hooked, mean_task_loss, model_device, read_batches, run_batches
from hawq.maths.plan import QuantConfig
from hawq.modules.qmodules import layer_weight
from hawq.maths.quantizers import check_bits, dequantize, is_float, quantize, weight_qparams
from hawq.modules.surgery import quantizable_layers
from hawq.feed.tasks import Task, as_task

__all__ = ["activation_errors", "activation_omega", "fake_quantized_weight", "layer_weights",
           "measured_loss_increase", "omega_matrix", "weight_errors"]


def layer_weights(model: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The weight tensors (parameters, shared with the model) of the quantizable layers
    ``names``; ConfigError listing the valid names when one is not a quantizable layer."""
    mods = quantizable_layers(model)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(f"layers {missing} are not quantizable layers of the model; valid: "
                          f"{sorted(mods)}")
    return [layer_weight(mods[n]) for n in names]  # MultiheadAttention: its in_proj_weight


def fake_quantized_weight(w: torch.Tensor, bits: int, config: QuantConfig) -> torch.Tensor:
    """``w`` (detached) quantized and dequantized at ``bits`` with ``config``'s weight quantizer
    (the one :func:`hawq.quantize_` uses); ``w`` itself for float bits."""
    qp = weight_qparams(w.detach(), bits, config.w_symmetric, config.w_per_channel, config.w_clip)
    return w.detach() if qp is None else dequantize(quantize(w.detach(), qp), qp)


def weight_errors(model: nn.Module, names: Sequence[str], bits: Sequence[int],
                  config: QuantConfig | None = None) -> np.ndarray:
    """||Q_b(W_i) - W_i||^2 for each layer i in ``names`` and bit width b: an (L, B) array.

    Uses the same weight quantizer as :func:`hawq.quantize_` with ``config``. No forward passes.
    """
    config = config or QuantConfig()
    bits = [check_bits(b, "bits", symmetric=config.w_symmetric) for b in bits]
    out = np.zeros((len(names), len(bits)))
    for i, w in enumerate(layer_weights(model, names)):
        for j, b in enumerate(bits):
            if not is_float(b):
                out[i, j] = float((fake_quantized_weight(w, b, config) - w.detach()).pow(2).sum())
    return out


def omega_matrix(scores: Sequence[float], errors: np.ndarray) -> np.ndarray:
    """Omega_i(b) = scores_i * errors[i, b] (scores: avg trace, eigenvalue or your own)."""
    scores = np.asarray(scores, dtype=float).reshape(-1, 1)
    if scores.shape[0] != errors.shape[0]:
        raise ConfigError(f"{scores.shape[0]} scores for {errors.shape[0]} layers: give one score "
                          "per layer")
    if not np.all(np.isfinite(scores)):
        raise NumericalError("a sensitivity score is NaN/inf; recompute it with more probes/data")
    return scores * errors


@torch.no_grad()
def measured_loss_increase(model: nn.Module, data: Any, names: Sequence[str],
                           bits: Sequence[int], config: QuantConfig | None = None,
                           batch_size: int = 256, progress: bool = False,
                           context: Sequence[int] | None = None,
                           bias_correct: bool = False,
                           task: Task | str | None = None) -> np.ndarray:
    """Delta L_i(b) = L(W with only layer i at b bits) - L(W): an (L, B) array.

    Measured on ``data`` (anything :func:`hawq.feed.tasks.iter_batches` reads: tensors, (inputs,
    targets), TensorDatasets, dicts of tensors, Datasets, DataLoaders) as ``task``'s mean loss
    (sum over batches of ``task.loss`` times the batch's samples, over the number of samples;
    default ``"classification"``: mean cross-entropy), model in eval mode, weights only
    (activations float). A task that compares with the float model (``"embedding"``) and is not
    bound yet is bound to ``model`` as it comes in. With ``context`` (bits per layer of a plan),
    every other layer is held at its context bits and the base is the context with layer i in float:
    the cost of layer i *around that plan*, which sees how layers' errors interact.
    With ``bias_correct`` each quantized layer's bias is shifted as :func:`hawq.bias_correct_`
    would shift it (its mean output per channel on ``data`` restored to the float one), so the
    cost is the one that remains after correction; one more forward pass gathers the layers'
    mean inputs. Cost: 1 + L*B' forward passes over ``data`` (L more with ``context``), where B' counts the
    integer bit widths. The model's weights are restored afterwards.

    Distributed (:mod:`hawq.base.dist`): the layers are independent jobs, so rank r measures
    layers r, r+N, ... on all of ``data`` (plus the base loss) and the (L, B) rows are summed
    over ranks once; every rank returns the single-process array, bit for bit on CPU. Cost per
    rank: 1 + ceil(L/N)*B' passes.
    """
    with dist.guard():
        return _measured_loss_increase(model, data, names, bits, config, batch_size, progress,
                                       context, bias_correct, task)


def _measured_loss_increase(model: nn.Module, data: Any, names: Sequence[str],
                            bits: Sequence[int], config: QuantConfig | None, batch_size: int,
                            progress: bool, context: Sequence[int] | None, bias_correct: bool,
                            task: Task | str | None) -> np.ndarray:
    config = config or QuantConfig()
    task = as_task(task)
    if task.reference is None:
        task = task.bind(model)   # a copy of the float model where the task needs one
    batches = read_batches(data, batch_size, "data")
    device = model_device(model)
    was_training = model.training
    model.eval()

    def loss() -> float:
        return mean_task_loss(model, batches, task, batch_size, device, "data")

    weights = layer_weights(model, names)
    originals = [w.detach().clone() for w in weights]
    if context is not None and len(context) != len(names):
        raise ConfigError(f"context has {len(context)} bit widths for {len(names)} layers")
    if bias_correct and context is not None:
        raise ConfigError("bias_correct=True measures each layer alone: drop context=")
    layer_mods = [quantizable_layers(model)[n] for n in names]
    means = (_mean_inputs(model, layer_mods, batches, batch_size, device, task)
             if bias_correct else None)
    out = np.zeros((len(names), len(bits)))
    try:
        if context is not None:
            for w, orig, b in zip(weights, originals, context):
                w.data.copy_(fake_quantized_weight(orig, int(b), config))
        base = loss()
        mine = dist.shard(range(len(names)))  # every layer in a single process
        bar = tqdm(total=len(mine) * len(bits), desc="single-layer losses",
                   disable=not progress or not dist.is_main(), leave=False)
        for i in mine:
            w = weights[i]
            held = w.detach().clone()
            try:
                if context is not None:
                    w.data.copy_(originals[i])
                    base = loss()
                for j, b in enumerate(bits):
                    if not is_float(b):
                        w.data.copy_(fake_quantized_weight(originals[i], b, config))
                        if means is None:
                            out[i, j] = loss() - base
                        else:
                            with _shifted_bias(layer_mods[i], means[i], originals[i] - w):
                                out[i, j] = loss() - base
                    bar.update()
            finally:
                w.data.copy_(held)
        bar.close()
    finally:
        for w, orig in zip(weights, originals):
            w.data.copy_(orig)
        model.train(was_training)
    if dist.is_distributed():  # each row was measured by one rank, zeros elsewhere
        out = dist.all_reduce_sum(torch.from_numpy(out)).numpy()
    return out


@torch.no_grad()
def _mean_inputs(model: nn.Module, mods: Sequence[nn.Module], data: Any, batch_size: int,
                 device: torch.device, task: Task | None = None) -> list[torch.Tensor]:
    """Each layer's input averaged over the samples (conv: per position; linear: per feature,
    over samples and any sequence positions), from one forward pass of the float model fed by
    ``task``."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(k: int, linear: bool):
        def fn(_m, inp):
            a = inp[0].detach().double()
            a = a.reshape(-1, a.shape[-1]) if linear else a
            sums[k] = a.sum(0) + sums.get(k, 0)
            counts[k] = counts.get(k, 0) + a.shape[0]
        return fn

    with hooked([(m, hook(k, isinstance(m, nn.Linear))) for k, m in enumerate(mods)], pre=True):
        run_batches(model, data, batch_size, device, task)
    return [(sums[k] / counts[k]).float() for k in range(len(mods))]


class _shifted_bias:
    """Context: add to ``m``'s bias the mean output shift that the weight change ``dw`` causes
    on mean input ``mean_x`` (the empirical bias correction of one layer), then restore it."""

    def __init__(self, m: nn.Module, mean_x: torch.Tensor, dw: torch.Tensor):
        self.m = m
        if isinstance(m, nn.Linear):
            self.shift = mean_x @ dw.t()
        else:  # conv is linear in its input: mean of conv(x) = conv(mean x), then spatial mean
            out = m._conv_forward(mean_x.unsqueeze(0), dw, None)
            self.shift = out.mean(dim=[d for d in range(out.dim()) if d != 1])

    def __enter__(self) -> None:
        b = self.m.bias
        self.saved = None if b is None else b.detach().clone()
        if b is None:
            self.m.bias = nn.Parameter(self.shift.to(self.m.weight))
        else:
            b.data.add_(self.shift.to(b))

    def __exit__(self, *exc: Any) -> None:
        if self.saved is None:
            self.m.bias = None
        else:
            self.m.bias.data.copy_(self.saved)


@torch.no_grad()
def activation_errors(model: nn.Module, data: Any, names: Sequence[str], bits: Sequence[int],
                      batch_size: int = 256, task: Task | str | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """||Q_b(a_i) - a_i||^2 of each layer's input activation, summed over ``data``: (L, B).

    The quantizer is the one :func:`hawq.calibrate_` freezes (per tensor, min/max range over
    the same data; unsigned when the input is never negative). Also returns the number of
    activation elements per layer (summed over samples), so Tr(H_a)/n_a can be formed.
    ``data``: any form :func:`hawq.feed.tasks.iter_batches` reads (labels not needed); the model is
    fed by ``task`` (default classification's feeding).
    Cost: two forward passes over ``data`` (one for the ranges, one for the errors).
    """
    from hawq.maths.quantizers import qparams_from_range

    batches = read_batches(data, batch_size, "data")
    mods = quantizable_layers(model)
    missing = [n for n in names if n not in mods]
    if missing:
        raise ConfigError(f"layers {missing} are not quantizable layers of the model")
    bits = [check_bits(b, "a_bits") for b in bits]
    lo = {n: float("inf") for n in names}
    hi = {n: float("-inf") for n in names}
    err = {n: np.zeros(len(bits)) for n in names}
    count = {n: 0 for n in names}
    device = model_device(model)

    def observe(name):
        def hook(_m, inputs):
            a = inputs[0]
            lo[name] = min(lo[name], float(a.min()))
            hi[name] = max(hi[name], float(a.max()))
        return hook

    def measure(name):
        def hook(_m, inputs):
            a = inputs[0].float()
            count[name] += a.numel()
            for j, b in enumerate(bits):
                if not is_float(b):
                    qp = qparams_from_range(torch.tensor(min(lo[name], 0.0)),
                                            torch.tensor(hi[name]), b, symmetric=False)
                    err[name][j] += float((dequantize(quantize(a, qp), qp) - a).pow(2).sum())
        return hook

    for make in (observe, measure):
        with hooked([(mods[n], make(n)) for n in names], pre=True):
            run_batches(model, batches, batch_size, device, task)
    return (np.stack([err[n] for n in names]), np.array([count[n] for n in names], dtype=float))


def activation_omega(model: nn.Module, data: Any, names: Sequence[str], bits: Sequence[int],
                     activation_traces: Sequence[float],
                     task: Task | str | None = None) -> np.ndarray:
    """HAWQ-V2 activation cost Omega_i(b) = Tr(H_a,i)/n_a,i * ||Q_b(a_i) - a_i||^2: (L, B).

    ``activation_traces`` come from ``hawq.analyze(..., metric="activation")`` on the same data
    (traces of the summed loss, so errors are summed over the same samples). Cost: see
    :func:`activation_errors`.
    """
    errors, counts = activation_errors(model, data, names, bits, task=task)
    return omega_matrix(np.asarray(activation_traces, dtype=float) / counts, errors)
