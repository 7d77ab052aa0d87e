"""Uniform affine quantizers: pure tensor functions, no modules, no I/O.

Conventions (b = bits):

* **symmetric** (weights): signed integers in [-2^(b-1), 2^(b-1)-1], zero point 0,
  scale = clip / (2^(b-1)-1) where clip = max|x| (or a clipped fraction of it). Needs b >= 2.
* **asymmetric**: unsigned integers in [0, 2^b-1], scale = (max-min)/(2^b-1),
  zero point = round(-min/scale); the range always contains 0 so zero is exact.
* **unsigned** (activations after ReLU): asymmetric with min fixed at 0, so zero point 0.
* 16 and 32 bits mean "stay floating point": :func:`fake_quantize` passes x through.

Per-channel parameters run along ``axis`` (0 = output channels of a Conv/Linear weight).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hawq.base.errors import ConfigError
from hawq.base.registry import Registry

__all__ = ["FLOAT_BITS", "INT_BITS", "QParams", "W_CLIPS", "check_bits", "check_channel_bits",
           "dequantize", "fake_quantize", "int_range", "is_float", "lsq_fake_quantize",
           "minmax_qparams", "mse_clip_ratios", "qparams_from_range", "quantization_error",
           "quantize", "register_w_clip", "weight_qparams"]

FLOAT_BITS = (16, 32)
INT_BITS = tuple(range(1, 9))


def check_bits(bits: int, what: str = "bits", symmetric: bool = False) -> int:
    """Validate a bit width: 1..8 (2..8 when symmetric) or 16/32 (float). Returns it as int."""
    try:
        if isinstance(bits, bool):
            raise TypeError
        bits = operator.index(bits)
    except TypeError:
        raise ConfigError(f"{what}={bits!r}: give an integer bit width in 1..8, "
                          "or 16/32 for float") from None
    if bits in FLOAT_BITS:
        return bits
    low = 2 if symmetric else 1
    if not low <= bits <= 8:
        raise ConfigError(f"{what}={bits}: supported bit widths are {low}..8 "
                          f"{'(symmetric needs at least 2) ' if symmetric else ''}"
                          "and 16/32 for float pass-through")
    return bits


def check_channel_bits(bits, what: str = "w_bits", symmetric: bool = False) -> int | list[int]:
    """Validate an int bit width (see :func:`check_bits`) or a per-channel sequence of integer
    bit widths (list/tuple/1-d tensor, no float widths). Returns the int or a list of ints."""
    if isinstance(bits, torch.Tensor) and bits.dim() == 1:
        bits = bits.tolist()
    if not isinstance(bits, (list, tuple)):
        return check_bits(bits, what, symmetric)
    if not bits:
        raise ConfigError(f"{what}=[]: give one bit width per output channel")
    out = [check_bits(b, f"{what}[{i}]", symmetric) for i, b in enumerate(bits)]
    if any(is_float(b) for b in out):
        raise ConfigError(f"{what}: per-channel bit widths must be integers in 2..8; give an int "
                          "16/32 for a float layer")
    return out


def is_float(bits: int) -> bool:
    """True when ``bits`` means the tensor stays floating point (16 or 32)."""
    return bits in FLOAT_BITS


@dataclass
class QParams:
    """Quantization parameters: ``x ≈ (q - zero_point) * scale`` with q in [qmin, qmax].

    ``scale`` and ``zero_point`` are 0-d tensors (per tensor) or 1-d along ``axis``. With
    per-channel bit widths, ``bits``, ``qmin`` and ``qmax`` are 1-d int64 tensors along ``axis``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int | torch.Tensor
    qmin: int | torch.Tensor
    qmax: int | torch.Tensor
    axis: int | None = None

    def bounds(self, x: torch.Tensor) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        """qmin and qmax, reshaped to broadcast against ``x`` when they are per channel."""
        if not isinstance(self.qmin, torch.Tensor):
            return self.qmin, self.qmax
        shape = [1] * x.dim()
        shape[self.axis] = -1  # type: ignore[index]
        return self.qmin.view(shape).to(x.dtype), self.qmax.view(shape).to(x.dtype)

    def view(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point reshaped to broadcast against ``x``."""
        if self.axis is None:
            return self.scale, self.zero_point
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.scale.view(shape), self.zero_point.view(shape)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range [qmin, qmax] of a b-bit quantizer."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _reduce(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = True,
                       axis: int | None = None) -> QParams:
    """QParams covering [lo, hi] (tensors, per tensor or per channel). Cost: O(channels).

    ``bits`` may be a sequence with one bit width per channel (needs ``axis``)."""
    bits = check_channel_bits(bits, "bits", symmetric=symmetric)
    lo = torch.as_tensor(lo, dtype=torch.float32).detach()
    hi = torch.as_tensor(hi, dtype=torch.float32).detach()
    if isinstance(bits, list):
        if axis is None or lo.dim() != 1 or lo.numel() != len(bits):
            raise ConfigError(f"{len(bits)} per-channel bit widths for a range of shape "
                              f"{tuple(lo.shape)}: give one bit width per channel along an axis")
        bits = torch.tensor(bits, dtype=torch.int64, device=lo.device)
    elif is_float(bits):
        raise ConfigError(f"bits={bits} means float: there is nothing to quantize")
    qmin, qmax = int_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny * 2 ** 24
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = torch.clamp(amax / _as_float(qmax).clamp_min(1), min=tiny)
        zero = torch.zeros_like(scale, dtype=torch.int64)
    else:
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = torch.clamp((hi - lo) / _as_float(qmax - qmin), min=tiny)
        zero = torch.clamp(torch.round(-lo / scale), *_bounds(qmin, qmax)).to(torch.int64)
    return QParams(scale, zero, bits, qmin, qmax, axis)


def _as_float(v: int | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _bounds(qmin: int | torch.Tensor, qmax: int | torch.Tensor) -> tuple:
    if isinstance(qmin, torch.Tensor):
        return qmin.float(), qmax.float()  # type: ignore[union-attr]
    return qmin, qmax


def minmax_qparams(x: torch.Tensor, bits: int, symmetric: bool = True, axis: int | None = None,
                   unsigned: bool = False) -> QParams:
    """QParams from the min/max of ``x`` (per tensor, or per channel along ``axis``).

    ``unsigned=True`` fixes the lower end at 0 (activations after ReLU). One pass over x.
    """
    lo, hi = _reduce(x.detach(), axis)
    if unsigned:
        lo = torch.zeros_like(lo)
        symmetric = False
    return qparams_from_range(lo, hi, bits, symmetric, axis)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer tensor (int32) q = clamp(round(x/scale) + zero_point, qmin, qmax)."""
    scale, zero = qp.view(x)
    return torch.clamp(torch.round(x / scale) + zero, *qp.bounds(x)).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float tensor (q - zero_point) * scale."""
    scale, zero = qp.view(q)
    return (q.to(torch.float32) - zero) * scale


def fake_quantize(x: torch.Tensor, qp: QParams | None) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through gradient.

    The gradient is the identity where x lies inside the representable range
    [(qmin - zp)·scale, (qmax - zp)·scale] and zero outside it (clipped). ``qp=None`` returns x.
    Differentiable twice (the mask is constant), so Hessians can be taken through it.
    """
    if qp is None:
        return x
    scale, zero = qp.view(x)
    qmin, qmax = qp.bounds(x)
    lo = (qmin - zero) * scale
    hi = (qmax - zero) * scale
    xq = (torch.clamp(torch.round(x.detach() / scale) + zero, qmin, qmax) - zero) * scale
    if not x.requires_grad:
        return xq
    mask = ((x.detach() >= lo) & (x.detach() <= hi)).to(x.dtype)
    return xq.detach() + (x - x.detach()) * mask


class _LSQ(torch.autograd.Function):
    """round(clamp(x/s, lo, hi)) * s with LSQ's gradients, in one fused node (saves x and s)."""

    @staticmethod
    def forward(ctx, x, s, lo, hi, dims, grad_scale):  # type: ignore[override]
        ctx.save_for_backward(x, s, lo, hi)
        ctx.dims, ctx.grad_scale = dims, grad_scale
        return torch.round(torch.clamp(x / s, lo, hi)) * s

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, s, lo, hi = ctx.saved_tensors
        v = x / s
        inside = (v >= lo) & (v <= hi)
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            d = torch.where(inside, torch.round(v) - v, torch.clamp(v, lo, hi))
            gs = (g * d).sum(dim=ctx.dims, keepdim=True) if ctx.dims else (g * d).sum()
            gs = gs.reshape(s.shape) * ctx.grad_scale
        return gx, gs, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, step: torch.Tensor, qp: QParams,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """Fake quantization with a trainable step size (LSQ, Esser et al. 2020).

    The forward value equals ``fake_quantize(x, qp)`` with ``qp.scale`` replaced by ``step``
    (same rounding, so an exported model matches exactly). Gradients: straight-through for ``x``
    inside the range (zero outside); for ``step`` LSQ's round(x/s) - x/s inside and the clamp
    bound outside, multiplied by ``grad_scale`` (LSQ uses 1/sqrt(elements * qmax)).
    ``step`` is 0-d or one value per channel along ``qp.axis``. One fused autograd node: the
    forward is one pass over x, the backward two.
    """
    tiny = torch.finfo(torch.float32).tiny * 2 ** 24
    s = step.clamp_min(tiny).to(x.dtype)
    if qp.axis is not None:
        shape = [1] * x.dim()
        shape[qp.axis] = -1
        s = s.view(shape)
        zero = qp.zero_point.view(shape).to(x.dtype)
        dims = tuple(d for d in range(x.dim()) if d != qp.axis % x.dim())
    else:
        zero = qp.zero_point.to(x.dtype)
        dims = ()
    qmin, qmax = qp.bounds(x)
    lo = torch.as_tensor(qmin, dtype=x.dtype) - zero  # integer bounds: same as clamping q
    hi = torch.as_tensor(qmax, dtype=x.dtype) - zero
    return _LSQ.apply(x, s, lo, hi, dims, float(grad_scale))


def mse_clip_ratios(x: torch.Tensor, bits: int, symmetric: bool = True, axis: int | None = 0,
                    grid: int = 80, low: float = 0.2) -> torch.Tensor:
    """Per-channel clipping ratio alpha in [low, 1] minimising ||Q(x) - x||^2.

    The range [alpha·min, alpha·max] is searched on a grid of ``grid`` ratios, all channels and
    ratios at once (memory grid × numel). Returns a 1-d tensor (one ratio per channel), or a
    0-d tensor when ``axis`` is None. ``bits`` may be per channel (a sequence along ``axis``).
    Cost: ``grid`` quantize passes over x, vectorised.
    """
    bits = check_channel_bits(bits, "bits", symmetric=symmetric)
    x = x.detach()
    flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    if isinstance(bits, list):
        if len(bits) != flat.shape[0] or axis is None:
            raise ConfigError(f"{len(bits)} per-channel bit widths for {flat.shape[0]} channels")
        qmin, qmax = _bounds(*int_range(torch.tensor(bits, device=flat.device), symmetric))
    else:
        qmin, qmax = int_range(bits, symmetric)
    alphas = torch.linspace(low, 1.0, grid, dtype=flat.dtype, device=flat.device)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    best_err = torch.full((flat.shape[0],), float("inf"), dtype=flat.dtype, device=flat.device)
    best = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
    # Chunk the grid so memory stays at about 8M elements.
    step = max(1, int(8e6 // max(flat.numel(), 1)))
    for start in range(0, grid, step):
        a = alphas[start:start + step].view(-1, 1)  # (A, 1)
        if symmetric:
            amax = torch.maximum(lo.abs(), hi.abs()).view(1, -1) * a  # (A, C)
            scale = (amax / _as_float(qmax).clamp_min(1)).clamp_min(1e-30)
            zero = torch.zeros_like(scale)
        else:
            l_ = lo.clamp(max=0).view(1, -1) * a
            h_ = hi.clamp(min=0).view(1, -1) * a
            scale = ((h_ - l_) / (qmax - qmin)).clamp_min(1e-30)
            zero = torch.clamp(torch.round(-l_ / scale), qmin, qmax)
        s3, z3 = scale.unsqueeze(-1), zero.unsqueeze(-1)
        q3 = (qmin, qmax) if isinstance(qmin, int) else (qmin.view(1, -1, 1), qmax.view(1, -1, 1))
        xq = (torch.clamp(torch.round(flat.unsqueeze(0) / s3) + z3, *q3) - z3) * s3
        err = (xq - flat.unsqueeze(0)).pow(2).sum(-1)  # (A, C)
        e_min, idx = err.min(dim=0)
        better = e_min < best_err
        best_err = torch.where(better, e_min, best_err)
        best = torch.where(better, a.view(-1)[idx], best)
    return best if axis is not None else best[0]


#: Weight clipping methods: name -> fn(w, bits, symmetric, axis) -> per-channel clipping ratio
#: (a tensor, as :func:`mse_clip_ratios` returns) or None for the full range. ``QuantConfig(
#: w_clip=...)``, :func:`weight_qparams` and ``--w-clip`` accept its names.
W_CLIPS: Registry[Callable[..., Any]] = Registry("weight clipping method")


def register_w_clip(name: str) -> Callable:
    """Decorator registering ``fn(w, bits, symmetric, axis) -> ratio tensor | None`` as a
    weight clipping method ``name``."""
    return W_CLIPS.register(name)


@register_w_clip("minmax")
def _minmax_clip(w: torch.Tensor, bits: Any, symmetric: bool, axis: int | None) -> None:
    """The full range [min, max]: no clipping."""
    return None


@register_w_clip("mse")
def _mse_clip(w: torch.Tensor, bits: Any, symmetric: bool, axis: int | None) -> torch.Tensor:
    """The MSE-optimal clipping ratio per channel (:func:`mse_clip_ratios`)."""
    return mse_clip_ratios(w, bits, symmetric, axis)


def weight_qparams(w: torch.Tensor, bits: int, symmetric: bool = True, per_channel: bool = True,
                   clip: str = "minmax", clip_ratio: torch.Tensor | None = None) -> QParams | None:
    """QParams for a weight tensor; ``None`` for float bit widths.

    ``clip`` names a :data:`W_CLIPS` method: ``"minmax"`` covers the full range; ``"mse"``
    searches the MSE-optimal clipping ratio (see :func:`mse_clip_ratios`); ``clip_ratio``, when
    given, is used instead (reuse a cached search).
    ``bits`` may be a sequence with one bit width per output channel (needs ``per_channel``).
    """
    bits = check_channel_bits(bits, "w_bits", symmetric=symmetric)
    if isinstance(bits, list) and not per_channel:
        raise ConfigError("per-channel w_bits need per-channel weight quantization "
                          "(QuantConfig(w_per_channel=True))")
    if is_float(bits):
        return None
    clip_fn = W_CLIPS.get(W_CLIPS.check(clip, "clip"))
    axis = 0 if per_channel else None
    lo, hi = _reduce(w.detach(), axis)
    ratio = clip_ratio if clip_ratio is not None else clip_fn(w, bits, symmetric, axis)
    if ratio is not None:
        lo, hi = lo * ratio, hi * ratio
    return qparams_from_range(lo, hi, bits, symmetric, axis)


def quantization_error(w: torch.Tensor, bits: int, symmetric: bool = True,
                       per_channel: bool = True, clip: str = "minmax") -> float:
    """||Q_b(w) - w||_2^2 for one weight tensor (0.0 for float bit widths)."""
    qp = weight_qparams(w, bits, symmetric, per_channel, clip)
    if qp is None:
        return 0.0
    return float((dequantize(quantize(w.detach(), qp), qp) - w.detach()).pow(2).sum())
