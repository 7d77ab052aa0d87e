"""The Gauss-Newton trace route (probe_mode="gn" / "auto") against exact Hessians on tiny models.

Exact diagonal blocks come from torch.func.hessian on functional_call, independent of the
engine. On a ReLU/BN CNN the output is piecewise linear in each single layer's weights, so the
remainder H_ii - GN_ii is zero: the GN part must equal the exact trace to float precision and
every remainder probe must be exactly 0. On a GELU MLP the remainder is not zero: the total must
sit within the stated error of the exact trace, and the GN part must equal an independently
built Gauss-Newton matrix J^T (diag p - p p^T) J / N.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev

from hawq.analysis.gauss_newton import gn_traces, remainder_task
from hawq.analysis.hessian import analyze, select_layers, trace_route
from hawq.base.errors import ConfigError
from hawq.feed.tasks import as_task


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, bias=False)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(h) + 0.5 * F.avg_pool2d(h, 3, stride=2)[:, :1])  # residual-like add
        return self.fc(h.mean((2, 3)))


def cnn():
    torch.manual_seed(3)
    m = SmallCNN()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def gelu_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(),
                         nn.Linear(8, 4)).eval()


def data(shape, n=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def exact(model, x, y):
    """Exact Tr(H_ii) and Tr(GN_ii) of the mean cross-entropy for every Conv/Linear weight."""
    names = [n for n, _ in select_layers(model)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    tr_h, tr_gn = [], []
    for n in names:
        key = n + ".weight"
        w = params[key]

        def logits(wi):
            return functional_call(model, {**params, **buffers, key: wi}, (x,))

        def loss(wi):
            return F.cross_entropy(logits(wi), y)

        h = hessian(loss)(w).reshape(w.numel(), w.numel())
        tr_h.append(float(torch.diagonal(h).sum()))
        J = jacrev(logits)(w).reshape(len(x), -1, w.numel())  # (N, C, P)
        p = F.softmax(logits(w), -1).detach()
        hl = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        gn = torch.einsum("ncp,ncd,ndq->pq", J, hl, J) / len(x)
        tr_gn.append(float(torch.diagonal(gn).sum()))
    return np.array(tr_h), np.array(tr_gn)


def test_relu_cnn_gn_route_is_exact_and_remainder_is_zero():
    model = cnn()
    x, y = data((2, 6, 6))
    tr_h, tr_gn = exact(model, x, y)
    np.testing.assert_allclose(tr_gn, tr_h, rtol=1e-4)  # piecewise linear: H_ii == GN_ii
    res = analyze(model, (x, y), metric="trace", probe_mode="gn", tol=0.01, seed=0)
    got = np.array([lh.trace for lh in res.layers])
    np.testing.assert_allclose(got, tr_h, rtol=1e-4)
    for lh in res.layers:
        assert lh.route == "gn-exact" and lh.gn_trace == pytest.approx(lh.trace, abs=1e-12)
        assert lh.stderr == 0.0 and lh.probes == 4  # remainder exactly 0: stops at min_probes
    # the default (auto) takes this route for a plain classifier
    auto = analyze(model, (x, y), metric="trace", tol=0.01, seed=0)
    assert [lh.trace for lh in auto.layers] == [lh.trace for lh in res.layers]


def test_gelu_mlp_gn_part_exact_and_total_within_error():
    model = gelu_mlp()
    x, y = data((6,), n=30)
    tr_h, tr_gn = exact(model, x, y)
    mods = select_layers(model)
    gn = gn_traces(model, mods, [(x, y)], as_task("classification"), torch.Generator())
    assert gn.exact and np.all(gn.stderr == 0)
    np.testing.assert_allclose(gn.trace, tr_gn, rtol=1e-4)
    assert np.abs(tr_h - tr_gn).max() > 1e-3 * np.abs(tr_h).max()  # GELU: remainder != 0
    res = analyze(model, (x, y), metric="trace", probe_mode="gn", tol=0.02, max_probes=300,
                  seed=2)
    for lh, h, g in zip(res.layers, tr_h, tr_gn):
        assert lh.gn_trace == pytest.approx(g, rel=1e-4) and lh.route == "gn-exact"
        if lh.name == "4":  # the logits are linear in the last layer's weights: R = 0
            assert lh.stderr == 0.0 and lh.probes == 4 and lh.trace == pytest.approx(h, rel=1e-4)
        else:
            assert lh.stderr is not None and lh.stderr > 0 and lh.probes > 4
        assert abs(lh.trace - h) <= 4 * lh.stderr + 1e-6 * abs(h), (lh.name, lh.trace, h)


def test_remainder_task_hessian_is_h_minus_gn():
    """The remainder task's exact block Hessian trace equals Tr(H_ii) - Tr(GN_ii): the
    remainder Hutchinson has the right expectation (checked without probes)."""
    model = gelu_mlp()
    x, y = data((6,), n=12)
    tr_h, tr_gn = exact(model, x, y)
    rem = remainder_task(as_task("classification"))
    params = {k: v.detach() for k, v in model.named_parameters()}
    for i, (n, _) in enumerate(select_layers(model)):
        key = n + ".weight"

        def s(wi):
            return rem.loss(functional_call(model, {**params, key: wi}, (x,)), (x, y))

        h = hessian(s)(params[key]).reshape(params[key].numel(), -1)
        assert float(torch.diagonal(h).sum()) == pytest.approx(tr_h[i] - tr_gn[i], abs=1e-5)


def test_sampled_gn_is_unbiased_within_its_stderr():
    """Token-level logits (N, T, C) take the sampled route; its estimate agrees with the exact
    trace within its own standard error."""

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 6), nn.Linear(6, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Tok().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 3, generator=g), torch.randint(0, 4, (8, 3), generator=g)
    params = {k: v.detach() for k, v in model.named_parameters()}
    mods = select_layers(model)
    est = gn_traces(model, mods, [(x, y)], as_task("classification"),
                    torch.Generator().manual_seed(1), tol=0.03, max_rounds=200)
    assert not est.exact and est.draws >= 2
    for i, (n, _) in enumerate(mods):
        key = n + ".weight"
        w = params[key]
        J = jacrev(lambda wi: functional_call(model, {**params, key: wi}, (x,)))(w)
        J = J.reshape(-1, 4, w.numel())
        p = F.softmax(model(x), -1).detach().reshape(-1, 4)
        hl = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        want = float(torch.einsum("ncp,ncd,ndp->", J, hl, J)) / len(p)
        assert abs(est.trace[i] - want) <= 4 * est.stderr[i], (n, est.trace[i], want)
        assert est.stderr[i] <= 0.03 * abs(est.trace[i])


def test_gn_equals_old_hutchinson_in_expectation():
    """The old per-layer Hutchinson (a different estimator) and the GN route agree on the same
    model within the Hutchinson error bars."""
    model = cnn()
    x, y = data((2, 6, 6))
    gn = analyze(model, (x, y), probe_mode="gn", tol=0.01, seed=0)
    layer = analyze(model, (x, y), probe_mode="layer", tol=0, max_probes=100, seed=1)
    for a, b in zip(gn.layers, layer.layers):
        assert b.route == "layer"
        assert abs(a.trace - b.trace) <= 4 * b.stderr, (a.name, a.trace, b.trace, b.stderr)


def test_route_rule_and_errors():
    model = cnn()
    x, y = data((2, 6, 6))
    cls = as_task("classification")
    assert trace_route("auto", "trace", cls, None) == "gn"
    assert trace_route("auto", "channel", cls, None) == "joint"
    assert trace_route("auto", "trace", cls, nn.CrossEntropyLoss()) == "joint"
    assert trace_route("layer", "trace", cls, None) == "layer"
    with pytest.raises(ConfigError, match="probe_mode='gn'.*metric"):
        analyze(model, (x, y), metric="channel", probe_mode="gn")
    with pytest.raises(ConfigError, match="probe_mode='gn'.*own loss"):
        analyze(model, (x, y), criterion=nn.CrossEntropyLoss(), probe_mode="gn")
    with pytest.raises(ConfigError, match="probe_mode"):
        analyze(model, (x, y), probe_mode="hutch++")
    # channel traces under auto keep the joint numbers
    a = analyze(model, (x, y), metric="channel", tol=0, max_probes=3, seed=0)
    b = analyze(model, (x, y), metric="channel", tol=0, max_probes=3, seed=0, probe_mode="joint")
    assert [lh.channel_traces for lh in a.layers] == [lh.channel_traces for lh in b.layers]


def test_chunks_weighting_matches_one_chunk():
    model = gelu_mlp()
    x, y = data((6,), n=22)
    one = analyze(model, (x, y), probe_mode="gn", tol=0.05, seed=3)
    many = analyze(model, (x, y), probe_mode="gn", tol=0.05, seed=3, batch_size=5)
    for a, b in zip(one.layers, many.layers):
        assert a.gn_trace == pytest.approx(b.gn_trace, rel=1e-5)
        assert math.isclose(a.trace, b.trace, rel_tol=0.2, abs_tol=4 * (a.stderr + b.stderr))
