"""Quantized twins of Conv1d/Conv2d/Linear/MultiheadAttention and the activation quantizer.

A twin subclasses its float type (so ``isinstance`` and state-dict keys are unchanged), shares
the float module's parameters, fake-quantizes its weight on every forward (straight-through
gradient, so it trains) and passes its input through an :class:`ActQuantizer`.
``nn.MultiheadAttention`` is one layer (its Q/K/V input projection, weight ``in_proj_weight``)
and its ``out_proj`` another; :func:`layer_weight` gives any layer's quantized weight.
Supporting a new layer type means one twin class and one :func:`register_twin` call here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from hawq.base.errors import ConfigError, UnsupportedLayerError
from hawq.maths.plan import LayerSpec, QuantConfig
from hawq.maths.quantizers import (QParams, check_bits, fake_quantize, is_float, lsq_fake_quantize,
                             mse_clip_ratios, qparams_from_range, weight_qparams)

__all__ = ["TWINS", "ActQuantizer", "QConv1d", "QConv2d", "QLinear", "QMultiheadAttention",
           "QOutProjLinear", "QuantMixin", "RoutedMultiheadAttention", "is_quantizable",
           "layer_bias", "layer_weight", "layer_weight_key", "register_twin", "to_float",
           "to_twin"]

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
        fixed = self.__dict__.get("fixed_qparams")  # set by hawq.post.export.load_quantized
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


class QOutProjLinear(QLinear, NonDynamicallyQuantizableLinear):
    """Twin of ``nn.MultiheadAttention.out_proj`` (a ``NonDynamicallyQuantizableLinear``). A
    float MultiheadAttention reads ``out_proj.weight`` directly and never calls this module;
    :class:`QMultiheadAttention` calls it, and :func:`hawq.quantize_` gives a quantized
    ``out_proj`` a float-bits attention twin when the plan leaves the attention float."""


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a quantizable layer quantizes, as the Hessian engine and the accounting see it.

    ``module.weight`` for Conv/Linear (and most layers); for ``nn.MultiheadAttention`` (float or
    twin) its input projection: the packed ``in_proj_weight`` Parameter (3E, E), or with
    separate projections (kdim/vdim != embed_dim) ``cat([q, k, v]_proj_weight, dim=1)``, an
    (E, E+kdim+vdim) tensor that is *not* a Parameter (row i holds output channel i of q, k and
    v), so Hessian analysis cannot target it. Returns None when the module has no weight.
    Cost: none (one concatenation for separate projections).
    """
    if isinstance(module, nn.MultiheadAttention):
        if module._qkv_same_embed_dim:
            return module.in_proj_weight
        return torch.cat([module.q_proj_weight, module.k_proj_weight, module.v_proj_weight], 1)
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def layer_weight_key(module: nn.Module) -> str | None:
    """The state-dict key (relative to the module) of :func:`layer_weight`: ``"weight"``,
    ``"in_proj_weight"`` for a packed MultiheadAttention, None when it is no single entry."""
    if isinstance(module, nn.MultiheadAttention):
        return "in_proj_weight" if module._qkv_same_embed_dim else None
    return "weight" if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias that goes with :func:`layer_weight` (``in_proj_bias`` for MultiheadAttention),
    or None."""
    b = getattr(module, "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias",
                None)
    return b if isinstance(b, torch.Tensor) else None


class RoutedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that calls its ``out_proj`` as a module.

    The float module reads ``out_proj.weight`` inside ``F.multi_head_attention_forward``, so
    hooks on ``out_proj`` never fire and a twin there would be bypassed. This forward runs
    ``F.multi_head_attention_forward`` (all masks, ``need_weights``, ``bias_k``/``bias_v``,
    ``add_zero_attn`` and dropout as in torch, never the fused fast path) with an identity
    output projection and then calls ``self.out_proj`` on the result, in the module's own
    layout (batch first when ``batch_first``). The same function as the float module (the
    identity matmul is exact for finite values); cost: one extra (E x E) matmul per token.
    :func:`hawq.modules.attention.attention_safe` switches float attention modules to this class for
    its block; :class:`QMultiheadAttention` builds on it.
    """

    def _in_act(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _in_weights(self) -> tuple[torch.Tensor, ...]:
        """(in_proj_weight,) packed, else (q, k, v) projection weights."""
        if self._qkv_same_embed_dim:
            return (self.in_proj_weight,)
        return (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise UnsupportedLayerError(
                f"{type(self).__name__} got a NestedTensor: pad the batch instead (hawq."
                "quantize_ turns the nested-tensor fast path of nn.TransformerEncoder off; for "
                "an encoder built afterwards call hawq.modules.attention.pin_slow_path_(model))")
        q = self._in_act(query)
        k = q if key is query else self._in_act(key)
        v = k if value is key else q if value is query else self._in_act(value)
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" relations, as nn.MultiheadAttention
            if k is v:
                if q is k:
                    q = k = v = q.transpose(1, 0)
                else:
                    q, k = q.transpose(1, 0), k.transpose(1, 0)
                    v = k
            else:
                q, k, v = (t.transpose(1, 0) for t in (q, k, v))
        ws = self._in_weights()
        E = self.embed_dim
        eye = torch.eye(E, dtype=ws[0].dtype, device=ws[0].device)
        w, extra = ws[0], {}
        if len(ws) == 3:
            extra = dict(use_separate_proj_weight=True, q_proj_weight=ws[0], k_proj_weight=ws[1],
                         v_proj_weight=ws[2])
            w = None
        out, weights = F.multi_head_attention_forward(
            q, k, v, E, self.num_heads, w, self.in_proj_bias, self.bias_k, self.bias_v,
            self.add_zero_attn, self.dropout, eye, None, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal, **extra)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return self.out_proj(out), weights


class QMultiheadAttention(QuantMixin, RoutedMultiheadAttention):
    """Twin of ``nn.MultiheadAttention``; the layer is the input (Q/K/V) projection.

    Its weight (the ``weight`` property, see :func:`layer_weight`) is the packed
    ``in_proj_weight``, or the q/k/v projection weights side by side (one quantizer; per
    channel, row i shares a scale across q, k and v). Its activation quantizer sees query, key
    and value (one range; a tensor passed as several of them is quantized once, so
    self-attention keeps torch's packed projection). The rest is
    :class:`RoutedMultiheadAttention`: ``out_proj`` (its own layer ``<name>.out_proj``, a
    :class:`QOutProjLinear` when quantized) is called as a module, and the fused fast path is
    never taken. Cost over the float module: the fake quantization and one identity matmul.
    """

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return layer_weight(self)

    def _in_act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def _in_weights(self) -> tuple[torch.Tensor, ...]:
        w = self.quantized_weight()
        if self._qkv_same_embed_dim:
            return (w,)
        return tuple(p.contiguous() for p in w.split([self.embed_dim, self.kdim, self.vdim], 1))


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
register_twin(NonDynamicallyQuantizableLinear, QOutProjLinear)
register_twin(nn.MultiheadAttention, QMultiheadAttention)


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
