"""Mixed-precision activations (HAWQ-V2): bits per layer input from activation-Hessian traces.

Omega^a_i(b) = Tr(H_a,i)/n_a,i * ||Q_b(a_i) - a_i||^2 (:func:`hawq.analysis.sensitivity.activation_omega`)
is minimised under an activation-memory budget, either on the *total* activation bits of one
sample (sum_i n_i * b_i, as a :class:`~hawq.maths.budgets.Budget`: ``Budget("avg_bits", 4)`` is 8x
activation compression) and/or on the *largest* activation tensor (max_i n_i * b_i <= limit, the
peak buffer an accelerator must hold), where n_i is the number of input elements of layer i per
sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch.nn as nn

from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.base.errors import BudgetError, ConfigError
from hawq.maths.plan import BitPlan, LayerSpec
from hawq.feed.tasks import Task, as_task

__all__ = ["ActivationAllocation", "activation_plan", "allocate_activation_bits"]


@dataclass
class ActivationAllocation:
    """Chosen activation bits per layer and what they cost (bits per sample)."""

    names: list[str]
    bits: list[int]
    elements: list[float]          # input elements per sample of each layer
    traces: list[float]            # Tr(H_a) of each layer's input, summed loss over the data
    omega: list[list[float]]       # (L, B) activation Omega
    choices: list[int]             # the candidate bit widths (columns of omega)
    total_bits: float              # sum_i n_i * b_i per sample
    largest_bits: float            # max_i n_i * b_i per sample
    avg_bits: float                # total_bits / sum_i n_i
    compression: float             # 32 / avg_bits

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def apply(self, plan: BitPlan) -> BitPlan:
        """``plan`` with these activation bits (weight bits unchanged; unnamed layers get
        their plan default, or float weights)."""
        layers = dict(plan.layers)
        for n, b in zip(self.names, self.bits):
            spec = layers.get(n) or plan.default or LayerSpec(32, 32)
            layers[n] = LayerSpec(spec.w_bits, int(b))
        return BitPlan(layers, plan.default)


def allocate_activation_bits(omega: np.ndarray, elements: Sequence[float], bits: Sequence[int],
                             total: Budget | None = None, largest_bits: float | None = None,
                             method: str = "ilp") -> np.ndarray:
    """Least-total-Omega activation bits (indices into ``bits``) under the budgets.

    ``largest_bits`` caps every layer's n_i * b_i (choices above it are removed before the
    exact allocation). Raises :class:`BudgetError` when no plan fits.
    """
    omega = np.asarray(omega, dtype=float)
    elements = np.asarray(elements, dtype=float)
    bits_arr = np.asarray(bits, dtype=float)
    if total is None and largest_bits is None:
        raise ConfigError("give an activation budget: total=Budget(...) and/or largest_bits=")
    allowed = np.ones_like(omega, dtype=bool)
    if largest_bits is not None:
        allowed = elements[:, None] * bits_arr[None, :] <= largest_bits * (1 + 1e-9)
        bad = np.flatnonzero(~allowed.any(1))
        if bad.size:
            need = float((elements * bits_arr.min()).max())
            raise BudgetError(f"largest_bits={largest_bits:g} is below what layer {bad[0]} needs "
                              f"at {int(bits_arr.min())} bits; the smallest feasible value is "
                              f"{need:g} bits")
    if total is None:
        masked = np.where(allowed, omega, np.inf)
        return masked.argmin(1)
    if allowed.all():
        return np.asarray(allocate(omega, elements, bits, total, method=method).choices)
    # disallowed choices get a penalty larger than any feasible plan's total Omega
    penalty = (np.abs(omega).max() + 1.0) * (len(omega) + 1) * 1e3
    alloc = allocate(np.where(allowed, omega, penalty), elements, bits, total, method=method)
    choices = np.asarray(alloc.choices)
    if not allowed[np.arange(len(choices)), choices].all():
        raise BudgetError(f"no activation plan meets both {total} and largest_bits="
                          f"{largest_bits:g}: relax one of them")
    return choices


def activation_plan(model: nn.Module, data: Any, names: Sequence[str] | None = None,
                    bits: Sequence[int] = (2, 4, 8), total: Budget | None = None,
                    largest_bits: float | None = None, samples: int = 256, seed: int = 0,
                    method: str = "ilp", max_probes: int = 50, progress: bool = False,
                    task: Task | str | None = None) -> ActivationAllocation:
    """Activation bits for ``names`` (default: every quantizable layer) under the budgets.

    ``data``: any form :func:`hawq.feed.tasks.iter_batches` reads (a TensorDataset, an (inputs,
    labels) pair, dicts of tensors, a DataLoader...); the first ``samples`` are used (in-memory
    data as one chunk). ``task`` (default ``"classification"``) feeds the model and gives the
    loss whose activation Hessian is traced.
    Cost: a Hutchinson run on activation traces (:func:`hawq.analysis.hessian.analyze`,
    ``metric="activation"``, at most ``max_probes`` HVPs) plus two forward passes over the
    samples.
    """
    from hawq.analysis.hessian import analyze
    from hawq.modules.passes import read_batches
    from hawq.analysis.sensitivity import activation_omega
    from hawq.modules.surgery import quantizable_layers

    task = as_task(task)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples={samples!r}: give a positive number of samples")
    chunks = read_batches(data, samples, "data", limit=samples)
    names = list(names) if names is not None else list(quantizable_layers(model))
    res = analyze(model, chunks, metric="activation", layers=names, seed=seed,
                  max_probes=max_probes, progress=progress, task=task)
    traces = [float(lh.trace) for lh in res.layers]
    omega = activation_omega(model, chunks, names, bits, traces, task=task)
    elements = np.array([float(lh.params) for lh in res.layers]) / chunks.samples
    choices = allocate_activation_bits(omega, elements, bits, total, largest_bits, method)
    chosen = np.asarray(bits)[choices].astype(int)
    total_bits = float((elements * chosen).sum())
    avg = total_bits / float(elements.sum())
    return ActivationAllocation(names=names, bits=[int(b) for b in chosen],
                                elements=elements.tolist(), traces=traces,
                                omega=omega.tolist(), choices=[int(b) for b in bits],
                                total_bits=total_bits,
                                largest_bits=float((elements * chosen).max()), avg_bits=avg,
                                compression=32.0 / avg)
