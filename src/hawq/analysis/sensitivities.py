"""Sensitivity metrics as a registry: name -> function giving Omega (L x B) and its statistics.

Each registered function has the signature ``fn(ctx: SensitivityContext) -> (omega, stats)``;
``omega[i, j]`` is the cost of giving layer ``names[i]`` ``bits[j]`` bits, ``stats`` the per-layer
numbers behind it (JSON-ready). Adding a metric is one decorated function here (or in your own
file): ``@register_sensitivity("mine")``; ``hawq compress --sensitivity mine`` then accepts it.

Built in: ``hawq-v2`` (average Hessian trace x weight error), ``hawq-v1`` (top eigenvalue x weight
error), ``fisher`` (exact empirical-Fisher trace x weight error, no probes), ``measured`` (loss
increase of quantizing each layer alone) and ``hybrid`` (the larger of ``hawq-v2`` and
``measured``: the quadratic model underestimates what 2-bit quantization costs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from hawq.analysis.hessian import analyze
from hawq.maths.plan import QuantConfig
from hawq.base import dist
from hawq.base.registry import Registry
from hawq.analysis.sensitivity import measured_loss_increase, omega_matrix, weight_errors
from hawq.feed.tasks import Task, as_task

__all__ = ["SENSITIVITIES", "SensitivityContext", "clamp_curvature", "hessian_warnings",
           "negative_curvature", "register_sensitivity", "sensitivity_costs"]

log = logging.getLogger(__name__)


@dataclass
class SensitivityContext:
    """What a sensitivity metric may use: the float model, the task, calibration data (any form
    :func:`hawq.feed.tasks.iter_batches` reads), the Hessian data (its first ``hessian_samples``),
    layer names, bit widths and the weight quantizer, and the Hutchinson settings."""

    model: nn.Module
    calib: Any
    names: list[str]
    bits: tuple[int, ...]
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: Task | None = None
    hessian_samples: int = 256
    max_probes: int = 50
    tol: float = 1e-2
    seed: int = 0
    probe_mode: str = "joint"
    progress: bool = False
    bias_correct: bool = False
    _errors: np.ndarray | None = field(default=None, repr=False)

    def errors(self) -> np.ndarray:
        """||Q_b(W_i) - W_i||^2, (L, B); computed once."""
        if self._errors is None:
            self._errors = weight_errors(self.model, self.names, self.bits, self.quant)
        return self._errors

    def hessian_data(self) -> Any:
        """The first ``hessian_samples`` samples of ``calib`` as a list of batches: one batch,
        or under ``torchrun`` one per rank (each rank takes its own; :mod:`hawq.base.dist`)."""
        from hawq.feed.tasks import materialize

        per_rank = -(-self.hessian_samples // dist.world())
        return materialize(self.calib, batch_size=per_rank, who="calibration data",
                           limit=self.hessian_samples)

    def analyze(self, metric: str):
        """:func:`hawq.analysis.hessian.analyze` with this context's settings on the Hessian data."""
        return analyze(self.model, self.hessian_data(), metric=metric, layers=self.names,
                       seed=self.seed, tol=None if metric == "eigen" else self.tol,
                       max_probes=self.max_probes, probe_mode=self.probe_mode,
                       progress=self.progress, task=self.task)


#: name -> fn(SensitivityContext) -> (omega (L, B), stats dict)
SENSITIVITIES: Registry[Callable[[SensitivityContext], tuple[np.ndarray, dict[str, Any]]]] = \
    Registry("sensitivity")


def register_sensitivity(name: str) -> Callable:
    """Decorator registering ``fn(ctx: SensitivityContext) -> (omega, stats)`` as ``name``."""
    return SENSITIVITIES.register(name)


def clamp_curvature(scores: Sequence[float]) -> np.ndarray:
    """Per-layer curvature scores (average traces, top eigenvalues) with negative estimates
    clamped at 0: a negative Hutchinson trace is noise around a small curvature (few probes),
    and a negative cost would make the allocator *prefer* quantizing that layer harder. At 0 the
    layer is treated as having zero curvature (quantizing it costs nothing in the quadratic
    model), which :func:`hessian_warnings` tells the user. NaN/inf stay (``omega_matrix`` rejects
    them). Cost: O(L)."""
    return np.maximum(np.asarray(scores, dtype=float), 0.0)


def _top_eigen(layers: Sequence[Any]) -> list[float]:
    return [lh.eigenvalue if np.isscalar(lh.eigenvalue) else lh.eigenvalue[0] for lh in layers]


@register_sensitivity("hawq-v2")
def _hawq_v2(ctx: SensitivityContext) -> tuple[np.ndarray, dict[str, Any]]:
    """HAWQ-V2: Tr(H_i)/n_i x ||Q_b(W_i) - W_i||^2. Cost: one Hutchinson run."""
    res = ctx.analyze("trace")
    stats = {"hessian": res.to_dict(), "probe_mode": ctx.probe_mode}
    return omega_matrix(clamp_curvature([lh.avg_trace for lh in res.layers]), ctx.errors()), stats


@register_sensitivity("hawq-v1")
def _hawq_v1(ctx: SensitivityContext) -> tuple[np.ndarray, dict[str, Any]]:
    """HAWQ-V1: lambda_max(H_i) x ||Q_b(W_i) - W_i||^2. Cost: power iteration per layer."""
    res = ctx.analyze("eigen")
    return (omega_matrix(clamp_curvature(_top_eigen(res.layers)), ctx.errors()),
            {"hessian": res.to_dict()})


@register_sensitivity("fisher")
def _fisher(ctx: SensitivityContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Empirical-Fisher trace / n_i x ||Q_b(W_i) - W_i||^2. Cost: one pass of per-sample
    gradients over the Hessian data (no probes)."""
    res = ctx.analyze("fisher")
    return (omega_matrix(clamp_curvature([lh.avg_trace for lh in res.layers]), ctx.errors()),
            {"hessian": res.to_dict()})


def _measured(ctx: SensitivityContext) -> np.ndarray:
    return measured_loss_increase(ctx.model, ctx.calib, ctx.names, ctx.bits, ctx.quant,
                                  progress=ctx.progress, bias_correct=ctx.bias_correct,
                                  task=ctx.task)


@register_sensitivity("measured")
def _measured_only(ctx: SensitivityContext) -> tuple[np.ndarray, dict[str, Any]]:
    """Loss increase of quantizing layer i alone. Cost: 1 + L x B forward passes over calib."""
    measured = _measured(ctx)
    # measured losses below zero are noise around 0 at high bits: a cost is never negative
    return np.maximum(measured, 0.0), {"measured": measured.tolist()}


@register_sensitivity("hybrid")
def _hybrid(ctx: SensitivityContext) -> tuple[np.ndarray, dict[str, Any]]:
    """max(HAWQ-V2 Omega, measured loss): both costs."""
    omega, stats = _hawq_v2(ctx)
    measured = _measured(ctx)
    stats["measured"] = measured.tolist()
    return np.maximum(omega, measured), stats


def sensitivity_costs(model: nn.Module, calib: Any, names: list[str], bits: tuple[int, ...],
                      sensitivity: str, quant: QuantConfig, *, hessian_samples: int = 256,
                      max_probes: int = 50, tol: float = 1e-2, seed: int = 0,
                      probe_mode: str = "joint", progress: bool = False,
                      bias_correct: bool = False, task: Any = None
                      ) -> tuple[np.ndarray, dict[str, Any]]:
    """Omega (L x B) for the registered ``sensitivity`` and the per-layer statistics behind it
    (``names``, ``weight_errors``, ``omega`` and the metric's own, e.g. ``hessian``, ``measured``).

    Cost: the metric's (see each in :data:`SENSITIVITIES`): ``hawq-v2`` <= max_probes HVPs
    (x L block products with ``probe_mode="layer"``) on ``hessian_samples`` samples, ``hawq-v1``
    power iteration per layer, ``fisher`` one per-sample-gradient pass, ``measured`` 1 + L x B
    forward passes over ``calib``, ``hybrid`` both. With ``bias_correct`` measured losses are
    those left after bias correction.
    """
    fn = SENSITIVITIES.get(SENSITIVITIES.check(sensitivity, "sensitivity"))
    ctx = SensitivityContext(model, calib, list(names), tuple(bits), quant,
                             as_task(task), hessian_samples, max_probes, tol, seed, probe_mode,
                             progress, bias_correct)
    omega, extra = fn(ctx)
    stats: dict[str, Any] = {"names": list(names), "weight_errors": ctx.errors().tolist()}
    stats.update(extra)
    stats["omega"] = np.asarray(omega).tolist()
    stats["warnings"] = hessian_warnings(stats)
    for w in stats["warnings"]:
        log.warning(w)
    return np.asarray(omega, dtype=float), stats


def negative_curvature(stats: dict[str, Any]) -> list[str]:
    """Names of the layers in ``stats["hessian"]`` whose trace, average trace or top eigenvalue
    estimate is negative (their cost is clamped at 0, see :func:`clamp_curvature`)."""
    out = []
    for lh in (stats.get("hessian") or {}).get("layers") or []:
        eig = lh.get("eigenvalue")
        if isinstance(eig, list):
            eig = eig[0] if eig else None
        vals = [lh.get("trace"), lh.get("avg_trace"), eig]
        if any(isinstance(v, (int, float)) and v < 0 for v in vals):
            out.append(lh.get("name"))
    return out


def hessian_warnings(stats: dict[str, Any], tol: float | None = None) -> list[str]:
    """Warnings a user should read about the Hessian estimates in ``stats``: negative traces or
    eigenvalues (clamped at 0 by :func:`clamp_curvature`: zero curvature) and layers whose relative
    standard error is above ``tol`` (default 0.1) — each says what to do."""
    out = []
    layers = (stats.get("hessian") or {}).get("layers") or []
    neg = negative_curvature(stats)
    if neg:
        out.append(f"negative Hessian estimate (average trace or top eigenvalue) for "
                   f"{neg[:8]}{'...' if len(neg) > 8 else ''}: too few probes for the noise; it "
                   "is treated as zero curvature (clamped at 0, so the allocator sees no cost in "
                   "quantizing the layer and gives it the fewest bits the budget allows); raise "
                   "--max-probes or set a smaller --tol (or use --probe-mode layer, or "
                   "--sensitivity hybrid, which also measures the loss)")
    lim = 0.1 if tol is None else tol
    loose = [lh["name"] for lh in layers
             if lh.get("stderr") is not None and lh.get("trace")
             and abs(lh["stderr"]) > lim * abs(lh["trace"])]
    if loose:
        out.append(f"Hessian traces did not converge for {len(loose)} layer(s) ({loose[:5]}"
                   f"{'...' if len(loose) > 5 else ''}: relative standard error > {lim:.0%}); "
                   "raise --max-probes or use --probe-mode layer")
    return out
