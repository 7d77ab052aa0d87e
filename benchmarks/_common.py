"""Helpers shared by the benchmark scripts (they run as ``python benchmarks/<script>.py`` from the
repository root, so this folder is on ``sys.path``).

:func:`library_sensitivity` runs one of the library's registered sensitivities
(:data:`hawq.analysis.sensitivities.SENSITIVITIES`, e.g. ``"hybrid"``) on a Hessian analysis the script
already has, instead of the one :func:`hawq.analysis.sensitivities.sensitivity_costs` would compute on the
first calibration images: the channel traces of ``cw_hawq.py`` (same Hutchinson run, their
``avg_trace``), or traces on other images than the losses are measured on
(``calibration_variants.py``). The Omega is then the library's own (for ``"hybrid"``:
max(HAWQ-V2 Omega, measured single-layer loss increase)), not a copy of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from hawq.analysis.hessian import HessianResult
from hawq.analysis.sensitivities import SENSITIVITIES, SensitivityContext
from hawq.analysis.sensitivity import omega_matrix
from hawq.base.errors import ConfigError
from hawq.maths.plan import QuantConfig


@dataclass
class GivenHessian(SensitivityContext):
    """A :class:`hawq.analysis.sensitivities.SensitivityContext` whose Hessian analysis is ``result``
    (computed beforehand) whatever metric is asked for."""

    result: HessianResult | None = None

    def analyze(self, metric: str) -> HessianResult:
        if self.result is None:
            raise ConfigError("GivenHessian needs result= (a HessianResult)")
        return self.result


def library_sensitivity(name: str, model: nn.Module, calib: Any, names: Sequence[str],
                        bits: Sequence[int], quant: QuantConfig, hessian: HessianResult,
                        **context: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Omega (L, B) of the registered sensitivity ``name`` and its stats, with measured losses
    on ``calib`` and the Hessian analysis ``hessian`` (its ``avg_trace`` per layer for
    ``hawq-v2``/``hybrid``). ``context``: further :class:`SensitivityContext` fields (``task``,
    ``bias_correct``...). Adds ``weight_errors`` and ``omega_v2`` (HAWQ-V2's Omega from the same
    traces) to the stats. Cost: the metric's, less its Hessian analysis."""
    ctx = GivenHessian(model, calib, list(names), tuple(int(b) for b in bits), quant,
                       result=hessian, **context)
    omega, stats = SENSITIVITIES.get(SENSITIVITIES.check(name, "sensitivity"))(ctx)
    stats["weight_errors"] = ctx.errors().tolist()
    if hessian.metric in ("trace", "channel"):
        stats["omega_v2"] = omega_matrix([lh.avg_trace for lh in hessian.layers],
                                         ctx.errors()).tolist()
    return np.asarray(omega, dtype=float), stats
