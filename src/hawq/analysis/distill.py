"""ZeroQ distilled data: inputs whose statistics match a model's BatchNorm running statistics.

ZeroQ (Cai et al., CVPR 2020) needs no training or validation data. It optimises a batch of
inputs so that, at every BatchNorm layer, the per-sample, per-channel mean and standard
deviation of the tensor the BN *receives* match the layer's ``running_mean`` and
``sqrt(running_var + eps)``:

    L(x) = sum_BN [ ||mu_BN - mu(a_BN(x))||^2 + ||sigma_BN - sigma(a_BN(x))||^2 ] / N
           (+ the same with mu = 0, sigma = 1 for the input itself, ``input_prior=True``)

where a_BN(x) is the BN's input on the batch x of N samples, mu/sigma are taken per sample and
channel over the spatial positions (unbiased variance, as the reference code), and ||.||^2 sums
over samples and channels. Each BN is paired with the tensor it actually receives by a forward
*pre-hook on the BN module itself*, so module registration order, shared BNs (one term per call)
and layers between a conv and its BN do not matter. A BN whose input has no spatial dimension
(BatchNorm1d on (N, C)) uses the statistics over the batch instead.

Defaults follow the reference implementation (``amirgholami/ZeroQ``, ``distill_data.py``): Adam,
lr 0.5, 500 iterations, ``ReduceLROnPlateau(patience=100, min_lr=1e-4)`` on the loss, one batch
of 32, inputs initialised as (U{0..254} - 127.5) / 5418.75 (the reference's ``UniformDataset``).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base.errors import ConfigError, DataError, NumericalError
from hawq.feed.tasks import as_task, logits_of

__all__ = ["BNCall", "DistillResult", "bn_layers", "bn_statistics_loss", "distill_data",
           "infer_input_shape", "record_bn_inputs"]


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm layer that tracks running statistics (registration
    order; the forward order is found by hooks in :func:`record_bn_inputs`)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            and m.running_var is not None]


def _require_bn(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    bns = bn_layers(model)
    if not bns:
        raise ConfigError(
            f"model {type(model).__name__} has no BatchNorm layer with running statistics, so "
            "ZeroQ cannot distil data from it (its loss matches BatchNorm running mean/var): "
            "calibrate on real data instead (hawq.calibrate_ / 'hawq compress'), or give a model "
            "with BatchNorm layers (track_running_stats=True)")
    return bns


@dataclass
class BNCall:
    """One call of a BatchNorm layer during a forward: its name and the input it received."""

    name: str
    module: nn.Module
    input: torch.Tensor


@contextmanager
def record_bn_inputs(model: nn.Module) -> Iterator[list[BNCall]]:
    """Context manager yielding a list that every forward fills with one :class:`BNCall` per
    BatchNorm call, in execution order, from forward pre-hooks on the BN modules themselves.
    Clear the list between forwards. Raises ConfigError when the model has no BatchNorm."""
    calls: list[BNCall] = []
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            calls.append(BNCall(name, module, args[0]))
        return fn

    for name, m in _require_bn(model):
        handles.append(m.register_forward_pre_hook(hook(name)))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _stats(a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel (mean, std) of ``a`` (N, C, ...) over its spatial dims: (N, C)
    each; for an (N, C) input (or one spatial position) the batch statistics, (1, C)."""
    if a.dim() < 2:
        raise ConfigError(f"BatchNorm input of shape {tuple(a.shape)}: expected (N, C, ...)")
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    if flat.shape[2] < 2:  # no spatial extent: statistics over the batch
        flat = flat.permute(2, 1, 0).reshape(1, a.shape[1], -1)
    var, mean = torch.var_mean(flat, dim=2)
    return mean, torch.sqrt(var + eps)


def _term(mean: torch.Tensor, std: torch.Tensor, target_mean: torch.Tensor,
          target_std: torch.Tensor) -> torch.Tensor:
    """ZeroQ's ``own_loss`` for mean and std: squared norms summed, divided by the rows."""
    n = mean.shape[0]
    return ((target_mean - mean).pow(2).sum() + (target_std - std).pow(2).sum()) / n


def _bn_loss(calls: Sequence[BNCall], x: torch.Tensor, eps: float, input_prior: bool
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    per: dict[str, torch.Tensor] = {}
    total = x.new_zeros(())
    for c in calls:
        m = c.module
        mean, std = _stats(c.input, eps)
        rm = m.running_mean.detach().to(mean.dtype).flatten()
        rs = torch.sqrt(m.running_var.detach().to(mean.dtype).flatten() + eps)
        if rm.numel() != mean.shape[1]:
            raise ConfigError(f"BatchNorm {c.name!r} has {rm.numel()} running statistics but "
                              f"receives {mean.shape[1]} channels")
        t = _term(mean, std, rm, rs)
        key = c.name
        k = 1
        while key in per:  # a BN called more than once: one term per call
            k += 1
            key = f"{c.name}#{k}"
        per[key] = t
        total = total + t
    if input_prior:
        mean, std = _stats(x, eps)
        t = _term(mean, std, torch.zeros_like(mean[0]), torch.ones_like(std[0]))
        per["<input>"] = t
        total = total + t
    return total, per


def bn_statistics_loss(model: nn.Module, x: torch.Tensor, eps: float = 1e-6,
                       input_prior: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """ZeroQ's BatchNorm-statistics loss of inputs ``x`` (differentiable in ``x``) and its terms.

    Returns (total loss tensor, {BN name: term}) with the terms in forward order, one per BN
    call (a second call of the same BN is ``name#2``), plus ``"<input>"`` for the input prior.
    The model runs in eval mode (restored after). Cost: one forward.
    """
    was_training = model.training
    model.eval()
    try:
        with record_bn_inputs(model) as calls:
            model(x)
            if not calls:
                raise ConfigError("no BatchNorm layer ran in the forward pass: ZeroQ needs the "
                                  "model's BatchNorm layers on the path from input to output")
            total, per = _bn_loss(calls, x, eps, input_prior)
    finally:
        model.train(was_training)
    return total, {k: float(v.detach()) for k, v in per.items()}


def infer_input_shape(model: nn.Module, image_size: int = 32) -> tuple[int, ...]:
    """Per-sample input shape: ``model.input_shape`` when the model has one, else from its first
    Conv/Linear layer (registration order): Linear -> (in_features,), ConvNd ->
    (in_channels, image_size, ...). Raises ConfigError when neither exists."""
    shape = getattr(model, "input_shape", None)
    if shape:
        return tuple(int(s) for s in shape)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (m.in_features,)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return (m.in_channels, *([image_size] * len(m.kernel_size)))
    raise ConfigError(f"cannot infer the input shape of {type(model).__name__}: give input_shape "
                      "(per sample, e.g. (3, 32, 32))")


def _label_logits(out: Any, n: int) -> torch.Tensor:
    """The (N, classes) logits in a model's output (a tensor, ``.logits``, a dict's
    ``"logits"`` or a tuple's first item); :class:`ConfigError` when there are none."""
    try:
        logits = logits_of(out, "label_weight")
    except DataError:
        raise ConfigError(f"label_weight needs (N, classes) logits; the model returns a "
                          f"{type(out).__name__}: use label_weight=0 (ZeroQ's loss)") from None
    if logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2 \
            or not logits.is_floating_point():
        raise ConfigError(f"label_weight needs (N={n}, classes >= 2) float logits; the model "
                          f"returns {tuple(logits.shape)} {logits.dtype}: use label_weight=0 "
                          "(ZeroQ's loss)")
    return logits


def _label_targets(out: Any, n: int) -> torch.Tensor:
    """Round-robin class labels 0, 1, ..., K-1, 0, ... for ``n`` samples of ``out``'s logits."""
    logits = _label_logits(out, n)
    return torch.arange(n, device=logits.device) % logits.shape[1]


def _initial(shape: tuple[int, ...], init: str, gen: torch.Generator) -> torch.Tensor:
    if init == "uniform":  # the reference's UniformDataset (it divides by the variance)
        return (torch.randint(0, 255, shape, generator=gen).float() - 127.5) / 5418.75
    if init == "gaussian":
        return torch.randn(shape, generator=gen)
    raise ConfigError(f"init={init!r}: use 'uniform' (the reference's) or 'gaussian'")


@dataclass
class DistillResult:
    """Distilled inputs and how the optimisation went.

    ``data``: (batch_size, *input_shape) tensor (not in :meth:`to_dict`); ``losses``: the BN loss
    at each iteration (before its step); ``initial_loss``/``final_loss``: before the first step and
    after the last; ``layer_losses``: final per-BN terms in forward order; ``bn_order``: BN names
    in the order they ran; ``seconds``: wall time.
    """

    data: torch.Tensor
    initial_loss: float
    final_loss: float
    losses: list[float]
    layer_losses: dict[str, float]
    bn_order: list[str]
    iterations: int
    batch_size: int
    input_shape: list[int]
    lr: float
    final_lr: float
    init: str
    seed: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reduction(self) -> float:
        """initial_loss / final_loss (inf when the final loss is 0)."""
        return self.initial_loss / self.final_loss if self.final_loss > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of everything but ``data``."""
        d = asdict(self)
        d.pop("data")
        d["reduction"] = self.reduction
        return d


def distill_data(model: nn.Module, input_shape: Sequence[int] | None = None,
                 batch_size: int = 32, iterations: int = 500, lr: float = 0.5, seed: int = 0,
                 init: str = "uniform", patience: int = 100, min_lr: float = 1e-4,
                 eps: float = 1e-6, input_prior: bool = True, image_size: int = 32,
                 label_weight: float = 0.0, progress: bool = False) -> DistillResult:
    """ZeroQ distilled data: ``batch_size`` inputs optimised so that every BatchNorm's input
    statistics match its running statistics (see the module docstring for the loss).

    ``input_shape`` per sample (default :func:`infer_input_shape`). Deterministic under ``seed``
    (a private generator; the global RNG is untouched). The model's parameters are frozen and
    it runs in eval mode; both are restored afterwards. Returns a :class:`DistillResult`.
    Cost: ``iterations`` forward + input-gradient backward passes on one batch, plus one forward.
    ``label_weight`` > 0 adds ``label_weight x cross-entropy(model(x), targets)`` with targets
    0, 1, ..., K-1, 0, 1, ... (K = the model's output width; the cross-entropy is the
    ``classification`` task's loss, on logits returned as a tensor, an output's ``.logits`` or
    a tuple's first item; a model without (N, K >= 2) logits raises ConfigError, and a NaN/inf
    label term NumericalError): class-conditional samples (as GDFQ / DSG-style generators
    do). ZeroQ's own loss is ``label_weight=0`` (the default here).
    Pure BN matching gives "average" images whose final pooled features are far smaller than
    real ones, so a range calibrated on them clips the classifier's input; the label term
    gives confident samples (ResNet-20 W8A8: 91.20% -> 91.62%, FP32 91.73%). ``losses`` and
    the reduction stay the BN-statistics loss alone.
    Raises ConfigError for a model without BatchNorm, NumericalError if the loss diverges.
    """
    if not (label_weight >= 0 and math.isfinite(label_weight)):
        raise ConfigError(f"label_weight={label_weight!r}: give a weight >= 0 (0 = ZeroQ's loss)")
    for name, value, lo in (("batch_size", batch_size, 1), ("iterations", iterations, 0),
                            ("patience", patience, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name}={value!r}: give an integer >= {lo}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr={lr!r}: give a positive learning rate (the reference uses 0.5)")
    _require_bn(model)
    shape = tuple(int(s) for s in (input_shape or infer_input_shape(model, image_size)))
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = _initial((batch_size, *shape), init, gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=min_lr, patience=patience)
    was_training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    losses: list[float] = []
    targets: torch.Tensor | None = None
    label_task = as_task("classification")
    last_ce = float("nan")
    t0 = time.perf_counter()
    model.eval()
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with record_bn_inputs(model) as calls:
            bar = tqdm(range(iterations), desc="distil data", disable=not progress, leave=False)
            for it in bar:
                calls.clear()
                opt.zero_grad(set_to_none=True)
                out = model(x)
                if not calls:
                    raise ConfigError("no BatchNorm layer ran in the forward pass: ZeroQ needs "
                                      "BatchNorm layers on the path from input to output")
                loss, _ = _bn_loss(calls, x, eps, input_prior)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NumericalError(f"distillation loss became {value} at iteration {it}; "
                                         "lower lr or use init='gaussian'")
                losses.append(value)
                total = loss
                if label_weight > 0:
                    if targets is None:
                        targets = _label_targets(out, batch_size)
                    # the classification task's loss on the logits (tensor, .logits or tuple)
                    ce = label_task.loss(_label_logits(out, batch_size), (x, targets))
                    last_ce = float(ce.detach())
                    if not math.isfinite(last_ce):
                        raise NumericalError(f"the label term (cross-entropy) became {last_ce} "
                                             f"at iteration {it}; lower label_weight or lr")
                    total = loss + label_weight * ce
                total.backward()
                opt.step()
                sched.step(float(total.detach()))
                if progress and it % 20 == 0:
                    bar.set_postfix(loss=f"{value:.4g}")
            calls.clear()
            with torch.no_grad():
                model(x)
                final, per = _bn_loss(calls, x, eps, input_prior)
            order = [c.name for c in calls]
    finally:
        for p, rg in grads:
            p.requires_grad_(rg)
        model.train(was_training)
    final_value = float(final)
    return DistillResult(
        data=x.detach().clone(), initial_loss=losses[0] if losses else final_value,
        final_loss=final_value, losses=losses, layer_losses={k: float(v) for k, v in per.items()},
        bn_order=order, iterations=iterations, batch_size=batch_size, input_shape=list(shape),
        lr=lr, final_lr=float(opt.param_groups[0]["lr"]), init=init, seed=seed,
        seconds=time.perf_counter() - t0,
        extra={"label_weight": label_weight} | ({"final_cross_entropy": last_ce}
                                                if label_weight > 0 else {}))
