"""Quantized twins of Conv1d/Conv2d/Linear and the activation quantizer.

A twin subclasses its float type (so ``isinstance`` and state-dict keys are unchanged), shares
the float module's parameters, fake-quantizes its weight on every forward (straight-through
gradient, so it trains) and passes its input through an :class:`ActQuantizer`.
Supporting a new layer type means one twin class and one :func:`register_twin` call here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.errors import ConfigError
from hawq.plan import LayerSpec, QuantConfig
from hawq.quantizers import (QParams, check_bits, fake_quantize, is_float, lsq_fake_quantize,
                             mse_clip_ratios, qparams_from_range, weight_qparams)

_TINY = torch.finfo(torch.float32).tiny * 2 ** 24


class ActQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with a calibrate-then-freeze life cycle.

    States: ``"calibrating"`` observes inputs (returns them unchanged) and accumulates the
    range; ``"frozen"`` fake-quantizes with the fixed range. Inputs whose observed minimum is
    >= 0 (after ReLU) get an unsigned quantizer with zero point 0; others an asymmetric one.
    """

    def __init__(self, bits: int = 32, method: str = "minmax", percentile: float = 99.99,
                 learn: bool = False):
        super().__init__()
        self.bits = check_bits(bits, "a_bits")
        self.method = method
        self.percentile = percentile
        self.state = "calibrating"
        self.learn = bool(learn) and not is_float(self.bits)
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("batches", torch.tensor(0))
        self._sample: torch.Tensor | None = None
        if self.learn:  # LSQ: trainable step, zero point fixed at calibration
            self.step = nn.Parameter(torch.tensor(1.0))
            self.register_buffer("zp", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        learn = ", learned step" if self.learn else ""
        return f"bits={self.bits}, method={self.method}, state={self.state}{learn}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Fold one batch into the calibrated range (running min/max, or averaged percentiles)."""
        x = x.detach().float()
        if self.learn and self._sample is None:  # values for the MSE-clipped initial step
            flat = x.reshape(-1)
            self._sample = flat[:: flat.numel() // 200_000 + 1].clone()
        if self.method == "minmax":
            self.lo = torch.minimum(self.lo, x.min())
            self.hi = torch.maximum(self.hi, x.max())
        else:
            flat = x.reshape(-1)
            if flat.numel() > 2_000_000:  # deterministic subsample keeps kthvalue cheap
                flat = flat[:: flat.numel() // 1_000_000 + 1]
            q = self.percentile / 100.0
            k_hi = max(1, min(flat.numel(), int(round(q * flat.numel()))))
            k_lo = max(1, min(flat.numel(), int(round((1 - q) * flat.numel())) + 1))
            hi, lo = flat.kthvalue(k_hi).values, flat.kthvalue(k_lo).values
            n = self.batches.float()
            if self.batches == 0:
                self.lo, self.hi = lo, hi
            else:
                self.lo, self.hi = (self.lo * n + lo) / (n + 1), (self.hi * n + hi) / (n + 1)
        self.batches += 1

    def freeze(self) -> None:
        """Stop observing; later forwards quantize with the calibrated range."""
        if not is_float(self.bits) and self.batches == 0:
            raise ConfigError("activation quantizer was never calibrated: run "
                              "hawq.calibrate_(model, data) before evaluating with a_bits < 16")
        self.state = "frozen"
        if self.learn and self.batches > 0:
            qp = self._range_qparams()
            if self._sample is not None and self._sample.numel() > 1:  # MSE-optimal clip
                x = self._sample
                alpha = mse_clip_ratios(x, self.bits, symmetric=False, axis=None)
                lo = x.min().clamp(max=0.0) if self.lo < 0 else x.new_zeros(())
                qp = qparams_from_range(lo * alpha, x.max() * alpha, self.bits, False)
            with torch.no_grad():
                self.step.copy_(qp.scale)
                self.zp.copy_(qp.zero_point)
            self._sample = None

    def _range_qparams(self) -> QParams:
        lo = self.lo.clamp(max=0.0) if self.lo < 0 else torch.zeros_like(self.lo)
        return qparams_from_range(lo, self.hi, self.bits, symmetric=False)

    def qparams(self):
        """The frozen QParams (None for float bits); with a learned step, its current value."""
        if is_float(self.bits):
            return None
        fixed = self.__dict__.get("fixed_qparams")  # set by hawq.export.load_quantized
        if fixed is not None:
            return fixed
        qp = self._range_qparams()
        if self.learn:
            qp.scale = self.step.detach().clamp_min(_TINY).clone()
            qp.zero_point = self.zp.clone()
        return qp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_float(self.bits):
            return x
        if self.state == "calibrating":
            self.observe(x)
            return x
        if self.learn:
            qp = self.qparams()
            g = 1.0 / math.sqrt(max(1, x[0].numel()) * float(qp.qmax))
            return lsq_fake_quantize(x, self.step, qp, g)
        return fake_quantize(x, self.qparams())


class QuantMixin:
    """Shared state of quantized twins: bits, weight quantizer form, input quantizer."""

    w_bits: int
    config: QuantConfig

    def setup(self, spec: LayerSpec, config: QuantConfig) -> None:
        """(Re)configure bits; computes the MSE clipping ratios when ``config.w_clip='mse'``.

        ``spec.w_bits`` may be a list with one bit width per output channel."""
        spec.check_channels(type(self).__name__, self.weight.shape[0])
        self.w_bits = spec.w_bits
        self.config = config
        learn = getattr(config, "learn_steps", False)
        self.act = ActQuantizer(spec.a_bits, config.a_calibration, config.a_percentile,
                                learn).to(self.weight.device)  # beside the layer (CPU or GPU)
        ratio = None
        if (config.w_clip == "mse" or learn) and not is_float(spec.w_bits):
            ratio = mse_clip_ratios(self.weight, spec.w_bits, config.w_symmetric,
                                    0 if config.w_per_channel else None)
        self.clip_ratio = ratio
        self._parameters.pop("w_step", None)
        self.__dict__.pop("_w_static", None)
        if learn and not is_float(spec.w_bits):  # LSQ: the step is trained from the MSE clip
            qp = weight_qparams(self.weight, self.w_bits, config.w_symmetric,
                                config.w_per_channel, clip_ratio=ratio)
            self.__dict__["_w_static"] = qp
            self.register_parameter("w_step", nn.Parameter(qp.scale.detach().clone()))

    @property
    def a_bits(self) -> int:
        return self.act.bits

    def weight_qparams(self):
        """QParams of the current weight (None at float bits): recomputed from the weight so QAT
        sees updates, or with ``learn_steps`` the learned step ``w_step``."""
        static = self.__dict__.get("_w_static")
        if static is not None and "w_step" in self._parameters:
            return QParams(self.w_step.detach().clamp_min(_TINY).clone(), static.zero_point,
                           static.bits, static.qmin, static.qmax, static.axis)
        return weight_qparams(self.weight, self.w_bits, self.config.w_symmetric,
                              self.config.w_per_channel, clip_ratio=self.clip_ratio)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight (straight-through gradient; LSQ gradient for ``w_step``)."""
        qp = self.weight_qparams()
        if qp is not None and "w_step" in self._parameters:
            per = self.weight[0].numel() if qp.axis is not None else self.weight.numel()
            qmax = float(qp.qmax.max()) if isinstance(qp.qmax, torch.Tensor) else float(qp.qmax)
            return lsq_fake_quantize(self.weight, self.w_step, qp,
                                     1.0 / math.sqrt(per * max(qmax, 1.0)))
        return fake_quantize(self.weight, qp)


class QConv1d(QuantMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), self.quantized_weight(), self.bias)


class QConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act(x), self.quantized_weight(), self.bias)


class QLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), self.quantized_weight(), self.bias)


#: float module type -> quantized twin type (exact type match; subclasses are not swapped).
TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def register_twin(float_type: type[nn.Module], twin: type[nn.Module]) -> None:
    """Register ``twin`` (a QuantMixin subclass of ``float_type``) as its quantized version."""
    if not (issubclass(twin, QuantMixin) and issubclass(twin, float_type)):
        raise ConfigError(f"{twin.__name__} must subclass QuantMixin and {float_type.__name__}")
    TWINS[float_type] = twin


register_twin(nn.Conv1d, QConv1d)
register_twin(nn.Conv2d, QConv2d)
register_twin(nn.Linear, QLinear)


def is_quantizable(module: nn.Module) -> bool:
    """True for registered float types and for twins already swapped in."""
    return type(module) in TWINS or isinstance(module, QuantMixin)


def to_twin(module: nn.Module, spec: LayerSpec, config: QuantConfig) -> nn.Module:
    """The quantized twin of ``module`` sharing its parameters (or ``module`` re-set up)."""
    if isinstance(module, QuantMixin):
        module.setup(spec, config)
        return module
    twin_type = TWINS[type(module)]
    twin = twin_type.__new__(twin_type)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks"):
        if key in state:
            state[key] = state[key].copy()
    twin.__dict__.update(state)
    twin.setup(spec, config)
    return twin


def to_float(module: nn.Module) -> nn.Module:
    """The float module of a twin (sharing parameters); other modules are returned as is."""
    if not isinstance(module, QuantMixin):
        return module
    float_type = next(t for t, q in TWINS.items() if q is type(module))
    plain = float_type.__new__(float_type)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        state[key] = state[key].copy()
    state["_modules"].pop("act", None)
    state["_parameters"].pop("w_step", None)
    for key in ("w_bits", "config", "clip_ratio", "_w_static"):
        state.pop(key, None)
    plain.__dict__.update(state)
    return plain
