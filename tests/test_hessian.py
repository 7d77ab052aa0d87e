"""The Hessian engine against exact answers on tiny models (Hessians built by autograd)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from hawq.errors import ConfigError, NumericalError
from hawq.hessian import HessianResult, analyze


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 3, stride=2, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = torch.tanh(self.bn(self.conv1(x)))
        x = torch.tanh(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def cnn():
    torch.manual_seed(1)
    m = SmallCNN()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def data(shape, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def exact_blocks(model, names, x, y, reduction="mean"):
    """Exact diagonal Hessian blocks of each named layer's weight, by autograd."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    blocks = []
    for n in names:
        key = n + ".weight"

        def f(w, key=key):
            out = functional_call(model, ({**params, key: w}, buffers), (x,))
            return F.cross_entropy(out, y, reduction=reduction)

        w = params[key].detach()
        blocks.append(torch.autograd.functional.hessian(f, w).reshape(w.numel(), w.numel()))
    return blocks


CASES = [(mlp, (5,), ["0", "2"]), (cnn, (2, 5, 5), ["conv1", "conv2", "fc"])]


@pytest.mark.parametrize("make,shape,names", CASES)
def test_traces_match_exact_within_error_bars(make, shape, names):
    model = make()
    x, y = data(shape)
    exact = [float(b.trace()) for b in exact_blocks(model, names, x, y)]
    res = analyze(model, (x, y), metric="trace", tol=0.004, max_probes=4000, seed=3)
    for lh, ex in zip(res.layers, exact):
        assert abs(lh.trace - ex) <= 3 * lh.stderr + 1e-9, (lh.name, lh.trace, ex, lh.stderr)
        assert abs(lh.trace - ex) <= 0.05 * abs(ex), (lh.name, lh.trace, ex)
        assert lh.avg_trace == pytest.approx(lh.trace / lh.params)
    assert res.hvp_count == res.layers[0].probes  # one HVP per probe for all layers


@pytest.mark.parametrize("make,shape,names", CASES)
def test_top_eigenvalue_matches_exact(make, shape, names):
    model = make()
    x, y = data(shape)
    blocks = exact_blocks(model, names, x, y)
    res = analyze(model, (x, y), metric="eigen", tol=1e-6, max_iter=2000, seed=0)
    for lh, b in zip(res.layers, blocks):
        ev = torch.linalg.eigvalsh(b.double())
        top = float(ev[ev.abs().argmax()])
        assert lh.eigenvalue == pytest.approx(top, rel=1e-2), lh.name


def test_top_k_eigenvalues_with_deflation():
    model = mlp()
    x, y = data((5,))
    (b0, _) = exact_blocks(model, ["0", "2"], x, y)
    res = analyze(model, (x, y), metric="eigen", layers=["0"], top_k=2, tol=1e-7, max_iter=5000)
    ev = torch.linalg.eigvalsh(b0.double())
    top2 = sorted(ev.tolist(), key=abs, reverse=True)[:2]
    assert res.layers[0].eigenvalue == pytest.approx(top2, rel=2e-2)


def test_channel_traces_sum_to_layer_trace():
    model = cnn()
    res = analyze(model, data((2, 5, 5)), metric="channel", max_probes=20, tol=0)
    for lh in res.layers:
        assert len(lh.channel_traces) == dict(model.named_modules())[lh.name].weight.shape[0]
        assert sum(lh.channel_traces) == pytest.approx(lh.trace, rel=1e-6, abs=1e-9)


def test_activation_traces_match_exact():
    model = mlp()
    x, y = data((5,), n=6)
    # exact: Hessian of the summed loss w.r.t. each layer's input (block-diagonal over samples)
    out_fn = {"0": lambda a: model[2](torch.tanh(model[0](a))), "2": lambda a: model[2](a)}
    inputs = {"0": x, "2": torch.tanh(model[0](x)).detach()}
    res = analyze(model, (x, y), metric="activation", tol=0.003, max_probes=5000, seed=1)
    for lh in res.layers:
        f = lambda a, n=lh.name: F.cross_entropy(out_fn[n](a), y, reduction="sum")
        a = inputs[lh.name]
        exact = float(torch.autograd.functional.hessian(f, a).reshape(a.numel(), -1).trace())
        assert abs(lh.trace - exact) <= max(3 * lh.stderr, 0.05 * abs(exact)), (lh.name, exact)


def test_fisher_trace_equals_per_sample_loop():
    model = cnn()
    x, y = data((2, 5, 5), n=8)
    res = analyze(model, (x, y), metric="fisher")
    for lh in res.layers:
        w = dict(model.named_modules())[lh.name].weight
        total = 0.0
        for i in range(len(y)):
            (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)
            total += float(g.pow(2).sum())
        assert lh.trace == pytest.approx(total / len(y), rel=1e-4)


def test_batched_data_equals_single_batch():
    model = mlp()
    x, y = data((5,))
    a = analyze(model, (x, y), max_probes=5, tol=0, seed=7)
    b = analyze(model, (x, y), max_probes=5, tol=0, seed=7, batch_size=7)
    for la, lb in zip(a.layers, b.layers):
        assert la.trace == pytest.approx(lb.trace, rel=1e-5)


def test_seeds_deterministic_and_consistent():
    model = cnn()
    d = data((2, 5, 5))
    a = analyze(model, d, max_probes=200, tol=0.02, seed=0)
    b = analyze(model, d, max_probes=200, tol=0.02, seed=0)
    c = analyze(model, d, max_probes=200, tol=0.02, seed=1)
    assert [l.trace for l in a.layers] == [l.trace for l in b.layers]
    for la, lc in zip(a.layers, c.layers):
        assert la.trace != lc.trace
        assert abs(la.trace - lc.trace) <= 4 * np.hypot(la.stderr, lc.stderr)


def test_errors_nan_loss_and_unknown_layer():
    model = mlp()
    x, y = data((5,))
    x[3, 0] = float("nan")
    with pytest.raises(NumericalError, match="batch 0"):
        analyze(model, (x, y), batch_size=100)
    with pytest.raises(NumericalError, match="batch 1"):
        analyze(model, (x, y), batch_size=3)
    with pytest.raises(ConfigError, match="valid names"):
        analyze(mlp(), data((5,)), layers=["nope"])
    with pytest.raises(ConfigError, match="metric"):
        analyze(mlp(), data((5,)), metric="hessian")


def test_json_roundtrip(tmp_path):
    res = analyze(mlp(), data((5,)), metric="channel", max_probes=3, tol=0)
    path = res.to_json(tmp_path / "h.json")
    assert HessianResult.from_json(path) == res


def test_activation_omega_matches_hand_computation():
    from hawq.quantizers import dequantize, minmax_qparams, quantize
    from hawq.sensitivity import activation_errors, activation_omega

    model = mlp()
    x, y = data((5,), n=16)
    errs, counts = activation_errors(model, (x, y), ["0", "2"], [2, 4, 8, 32], batch_size=5)
    a2 = torch.tanh(model[0](x)).detach()
    for row, a in zip(errs, (x, a2)):
        for j, b in enumerate([2, 4, 8]):
            qp = minmax_qparams(a, b, symmetric=False)
            assert row[j] == pytest.approx(float((dequantize(quantize(a, qp), qp) - a).pow(2).sum()),
                                           rel=1e-5)
        assert row[3] == 0.0 and row[0] > row[1] > row[2]
    assert counts.tolist() == [16 * 5, 16 * 4]
    om = activation_omega(model, (x, y), ["0", "2"], [2, 4], [2.0, 4.0])
    assert om == pytest.approx(np.array([2.0 / 80, 4.0 / 64])[:, None] * errs[:, :2])
