"""Issue 11: on a model where the quadratic (Hessian) model of the loss fails at 2 bits, the
default ``hybrid`` sensitivity avoids the bad choice that plain HAWQ-V2 Omega makes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from hawq import BitPlan, LayerSpec, QuantConfig, quantize_
from hawq.maths.allocation import allocate
from hawq.maths.budgets import Budget
from hawq.analysis.sensitivities import sensitivity_costs


class TwoBranch(nn.Module):
    """logits = A(x) + B(x). A classifies half the data with huge, saturated margins (its loss
    curvature is ~0 there) and carries a large weight on an input that is always zero, so at 2
    bits its informative weights round to zero; B classifies the other half with moderate
    margins (real curvature) and quantizes gracefully."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4, bias=False)       # reads x[:, :5] (x[:, 0] is always 0)
        self.b = nn.Linear(5, 4, bias=False)       # reads x[:, 5:]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.a.weight.zero_()
            self.a.weight[:, 0] = 1000.0          # outlier on the dead input feature
            self.a.weight[torch.arange(4), 1 + torch.arange(4)] = 100.0
            self.b.weight.copy_(0.3 * torch.randn(4, 5, generator=g))
            self.b.weight[torch.arange(4), 1 + torch.arange(4)] = 3.0

    def forward(self, x):
        return self.a(x[:, :5]) + self.b(x[:, 5:])


def _data(n=256):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.zeros(n, 10)
    half = torch.arange(n) < n // 2
    x[half, 1 + y[half]] = 1.0                    # group A: only A's features, one-hot label
    x[~half, 6:] = 0.3 * torch.randn(int((~half).sum()), 4, generator=g)
    x[~half, 6 + y[~half]] += 1.0                 # group B: B's noisy features carry the label
    return TensorDataset(x, y)


def _loss(plan: BitPlan, data) -> float:
    m = TwoBranch()
    quantize_(m, plan, QuantConfig())
    x, y = data.tensors
    with torch.no_grad():
        return float(nn.functional.cross_entropy(m(x), y))


def test_hybrid_avoids_the_two_bit_choice_the_quadratic_model_gets_wrong():
    data = _data()
    names, bits = ["a", "b"], (2, 8)
    params = np.array([20.0, 20.0])
    budget = Budget("avg_bits", 5.0)        # exactly one of the two layers must go to 2 bits
    chosen = {}
    for sens in ("hawq-v2", "hybrid"):
        omega, stats = sensitivity_costs(TwoBranch(), data, names, bits, sens, QuantConfig(),
                                         hessian_samples=256, max_probes=50, seed=0)
        alloc = allocate(omega, params, bits, budget, method="ilp")
        chosen[sens] = [int(b) for b in alloc.bits]
    # the quadratic model sees ~zero curvature on A (saturated softmax) and sends it to 2 bits
    assert chosen["hawq-v2"] == [2, 8]
    assert chosen["hybrid"] == [8, 2]
    loss = {k: _loss(BitPlan({n: LayerSpec(b, 32) for n, b in zip(names, v)}), data)
            for k, v in chosen.items()}
    base = _loss(BitPlan.uniform(32, 32), data)
    # and that choice is really bad: A at 2 bits loses half the data, B at 2 bits costs little
    assert loss["hawq-v2"] > 10 * max(loss["hybrid"] - base, 1e-3)
    assert loss["hawq-v2"] > 0.5
