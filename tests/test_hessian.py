"""The Hessian engine against exact answers on tiny seeded models.

Exact Hessians are built independently with torch.autograd.functional.hessian on
functional_call (not with the engine's HVP code), so every comparison can fail. Probe budgets are
chosen so that 5% of each exact trace is >= 3 standard errors of the estimator being tested: on
the CNN, joint probes (one HVP for all layers) have 3-13x the per-probe standard deviation of
per-layer probes (cross-layer terms), so its 5% checks use probe_mode="layer" and joint probes
are checked against their own (honest, wider) error bars.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from hawq.base.errors import ConfigError, DataError, NumericalError, UnsupportedLayerError
from hawq.analysis.hessian import HessianResult, analyze
from hawq.analysis.hessian_density import spectral_density


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def cnn():
    torch.manual_seed(3)
    m = SmallCNN()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def data(shape, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def exact_blocks(model, names, x, y):
    """Exact diagonal Hessian blocks (mean cross-entropy) of each named layer's weight."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    blocks = []
    for n in names:
        key = n + ".weight"

        def f(w, key=key):
            return F.cross_entropy(functional_call(model, ({**params, key: w}, buffers), (x,)), y)

        w = params[key]
        blocks.append(torch.autograd.functional.hessian(f, w).reshape(w.numel(), w.numel()))
    return blocks


def exact_activation_trace(model, name, x, y):
    """Exact trace of the Hessian of the summed loss w.r.t. module ``name``'s input."""
    mod = dict(model.named_modules())[name]
    shape = []
    h = mod.register_forward_pre_hook(lambda _m, i: shape.append(i[0].shape))
    model(x)
    h.remove()

    def f(d):
        hk = mod.register_forward_pre_hook(lambda _m, i: (i[0] + d,))
        try:
            return F.cross_entropy(model(x), y, reduction="sum")
        finally:
            hk.remove()

    d0 = torch.zeros(shape[0])
    return float(torch.autograd.functional.hessian(f, d0).reshape(d0.numel(), -1).trace())


CASES = [(mlp, (5,), ["0", "2"]), (cnn, (2, 5, 5), ["conv1", "conv2", "fc"])]


FAST = dict(probe_batch=250, vectorized=True)  # batched probes: same estimates, less overhead


@pytest.mark.parametrize("make,shape,names,mode", [CASES[0] + ("joint",), CASES[1] + ("layer",)])
def test_traces_match_exact_within_error_bars(make, shape, names, mode):
    model = make()
    x, y = data(shape)
    exact = [float(b.trace()) for b in exact_blocks(model, names, x, y)]
    res = analyze(model, (x, y), metric="trace", tol=0.0125, max_probes=10000, seed=3,
                  probe_mode=mode, **FAST)
    assert [lh.name for lh in res.layers] == names
    for lh, ex in zip(res.layers, exact):
        assert abs(lh.trace - ex) <= 3 * lh.stderr, (lh.name, lh.trace, ex, lh.stderr)
        assert abs(lh.trace - ex) <= 0.05 * abs(ex), (lh.name, lh.trace, ex)
        assert lh.stderr <= 0.0125 * abs(lh.trace) or lh.probes == 10000
        assert lh.avg_trace == pytest.approx(lh.trace / lh.params)
    # joint: one HVP per probe for all layers; layer: one block product per layer per probe
    probes = [lh.probes for lh in res.layers]
    assert res.hvp_count == (probes[0] if mode == "joint" else sum(probes))
    assert res.passes == 1


def test_joint_probes_unbiased_within_their_error_bars_on_cnn():
    model = cnn()
    x, y = data((2, 5, 5))
    names = ["conv1", "conv2", "fc"]
    exact = [float(b.trace()) for b in exact_blocks(model, names, x, y)]
    joint = analyze(model, (x, y), tol=0, max_probes=2000, seed=4, probe_mode="joint", **FAST)
    layer = analyze(model, (x, y), tol=0, max_probes=2000, seed=4, probe_mode="layer", **FAST)
    for lj, ll, ex in zip(joint.layers, layer.layers, exact):
        assert abs(lj.trace - ex) <= 3 * lj.stderr, (lj.name, lj.trace, ex, lj.stderr)
        assert lj.stderr > 2 * ll.stderr  # the cross-layer variance, made visible


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
    (b0,) = exact_blocks(model, ["0"], x, y)
    res = analyze(model, (x, y), metric="eigen", layers=["0"], top_k=2, tol=1e-7, max_iter=5000)
    ev = torch.linalg.eigvalsh(b0.double())
    top2 = sorted(ev.tolist(), key=abs, reverse=True)[:2]
    assert res.layers[0].eigenvalue == pytest.approx(top2, rel=2e-2)


def test_channel_traces_sum_to_layer_trace_and_match_exact():
    model = cnn()
    x, y = data((2, 5, 5))
    names = ["conv1", "conv2", "fc"]
    blocks = exact_blocks(model, names, x, y)
    res = analyze(model, (x, y), metric="channel", max_probes=4000, tol=0.005, seed=2,
                  probe_mode="layer", **FAST)
    for lh, b in zip(res.layers, blocks):
        w = dict(model.named_modules())[lh.name].weight
        assert len(lh.channel_traces) == w.shape[0]
        assert sum(lh.channel_traces) == pytest.approx(lh.trace, rel=1e-12, abs=1e-12)
        exact = b.diagonal().reshape(w.shape[0], -1).sum(1).double().numpy()
        err = np.abs(np.array(lh.channel_traces) - exact)
        assert err.max() <= 0.1 * np.abs(exact).max(), (lh.name, lh.channel_traces, exact)


@pytest.mark.parametrize("make,shape,names,mode", [CASES[0] + ("joint",), CASES[1] + ("layer",)])
def test_activation_traces_match_exact(make, shape, names, mode):
    model = make()
    x, y = data(shape, n=4)
    res = analyze(model, (x, y), metric="activation", tol=0.0125, max_probes=10000, seed=1,
                  probe_mode=mode, **FAST)
    for lh in res.layers:
        exact = exact_activation_trace(model, lh.name, x, y)
        assert abs(lh.trace - exact) <= max(3 * lh.stderr, 1e-9), (lh.name, lh.trace, exact)
        assert abs(lh.trace - exact) <= 0.05 * abs(exact) + 1e-9, (lh.name, lh.trace, exact)
    mods = dict(model.named_modules())
    sizes = []
    hooks = [mods[n].register_forward_pre_hook(lambda _m, i: sizes.append(i[0].numel()))
             for n in names]
    model(x)
    for h in hooks:
        h.remove()
    assert [lh.params for lh in res.layers] == sizes


def test_fisher_trace_equals_per_sample_loop():
    model = cnn()
    x, y = data((2, 5, 5), n=8)
    res = analyze(model, (x, y), metric="fisher", batch_size=3)
    assert res.hvp_count == 0 and res.layers[0].stderr is None
    for lh in res.layers:
        w = dict(model.named_modules())[lh.name].weight
        total = 0.0
        for i in range(len(y)):
            (g,) = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), w)
            total += float(g.pow(2).sum())
        assert lh.trace == pytest.approx(total / len(y), rel=1e-4)
        assert lh.avg_trace == pytest.approx(lh.trace / w.numel())


def test_chunked_cached_recomputed_and_loader_data_agree():
    model = cnn()
    x, y = data((2, 5, 5))
    kw = dict(max_probes=5, tol=0, seed=7, probe_mode="joint")
    one = analyze(model, (x, y), **kw)
    cached = analyze(model, (x, y), batch_size=7, **kw)
    rebuilt = analyze(model, (x, y), batch_size=7, max_graph_bytes=0, **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    via_loader = analyze(model, loader, **kw)
    summed = analyze(model, (x, y), criterion=nn.CrossEntropyLoss(reduction="sum"),
                     batch_size=5, **kw)
    for other in (cached, rebuilt, via_loader, summed):
        for la, lb in zip(one.layers, other.layers):
            assert la.trace == pytest.approx(lb.trace, rel=1e-5, abs=1e-7)
    assert (one.passes, cached.passes, via_loader.passes) == (1, 4, 3)
    assert rebuilt.passes == 1 + 5 * 4  # every probe rebuilds every chunk
    e1 = analyze(model, (x, y), metric="eigen", max_iter=30, seed=0)
    e2 = analyze(model, (x, y), metric="eigen", max_iter=30, seed=0, batch_size=7)
    for la, lb in zip(e1.layers, e2.layers):
        assert la.eigenvalue == pytest.approx(lb.eigenvalue, rel=1e-4)


@pytest.mark.parametrize("metric,mode", [("trace", "joint"), ("channel", "layer"),
                                         ("activation", "joint"), ("activation", "layer")])
def test_vectorized_probes_equal_sequential(metric, mode):
    model = cnn()
    d = data((2, 5, 5), n=8)
    kw = dict(metric=metric, max_probes=8, tol=0, probe_batch=4, seed=5, probe_mode=mode)
    a = analyze(model, d, **kw)
    b = analyze(model, d, vectorized=True, **kw)
    for la, lb in zip(a.layers, b.layers):
        assert la.trace == pytest.approx(lb.trace, rel=1e-5, abs=1e-7)
        assert la.stderr == pytest.approx(lb.stderr, rel=1e-4, abs=1e-7)


def test_operator_products_equal_exact_hessian_times_vector():
    from hawq.analysis.hessian import HessianOperator, as_batches, select_layers

    model = cnn()
    x, y = data((2, 5, 5))
    names = ["conv1", "conv2", "fc"]
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys = [n + ".weight" for n in names]
    shapes = [params[k].shape for k in keys]
    sizes = [s.numel() for s in shapes]

    def f(flat):
        ws = {k: t.view(s) for k, t, s in zip(keys, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**params, **ws}, (x,)), y)

    H = torch.autograd.functional.hessian(f, torch.cat([params[k].reshape(-1) for k in keys]))
    v = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    vs = [t.view(s) for t, s in zip(v.split(sizes), shapes)]
    for bs in (None, 7):
        op = HessianOperator(model, select_layers(model, names), as_batches((x, y), bs),
                             nn.CrossEntropyLoss())
        hv = torch.cat([h.reshape(-1) for h in op.hvp(vs)])
        assert torch.allclose(hv, H @ v, rtol=1e-4, atol=1e-6)
        off = np.cumsum([0] + sizes)
        for i in range(3):
            blk = H[off[i]:off[i + 1], off[i]:off[i + 1]] @ v[off[i]:off[i + 1]]
            assert torch.allclose(op.block_hvp(i, vs[i]).reshape(-1), blk, rtol=1e-4, atol=1e-6)


def test_seeds_deterministic_and_consistent_and_state_restored():
    model = cnn().train()
    model.conv1.weight.requires_grad_(False)
    d = data((2, 5, 5))
    rng = torch.random.get_rng_state()
    kw = dict(max_probes=200, tol=0.02, probe_mode="joint")
    a = analyze(model, d, seed=0, **kw)
    b = analyze(model, d, seed=0, **kw)
    c = analyze(model, d, seed=1, **kw)
    assert torch.equal(rng, torch.random.get_rng_state())  # global RNG untouched
    assert model.training and not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
    assert a.to_dict()["layers"] == b.to_dict()["layers"]
    for la, lc in zip(a.layers, c.layers):
        assert la.trace != lc.trace
        assert abs(la.trace - lc.trace) <= 4 * np.hypot(la.stderr, lc.stderr)


class OnceDiffTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class NumpyTanh(OnceDiffTanh):
    @staticmethod
    def backward(ctx, g):  # detached: goes through numpy
        (y,) = ctx.saved_tensors
        return torch.from_numpy((g * (1 - y * y)).detach().numpy())


class GoodTanh(OnceDiffTanh):
    @staticmethod
    def backward(ctx, g):  # differentiable torch ops: second derivatives are fine
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def custom_mlp(fn):
    m = mlp()
    m[1] = Act(fn)
    return m


@pytest.mark.parametrize("fn", [OnceDiffTanh, NumpyTanh])
def test_op_without_double_backward_raises_naming_op_and_layer(fn):
    x, y = data((5,))
    for metric in ("trace", "eigen", "activation"):
        with pytest.raises(UnsupportedLayerError, match=r"Tanh.*module '1'.*layers=\['2'\]"):
            analyze(custom_mlp(fn), (x, y), metric=metric, max_probes=3, max_iter=3)
    # the suggested fix works: layer '2' runs after the op, so its block is exact
    (b2,) = exact_blocks(mlp(), ["2"], x, y)
    res = analyze(custom_mlp(fn), (x, y), layers=["2"], metric="eigen", tol=1e-7, max_iter=2000)
    ev = torch.linalg.eigvalsh(b2.double())
    assert res.layers[0].eigenvalue == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-2)


def test_differentiable_custom_function_is_accepted_and_exact():
    x, y = data((5,))
    a = analyze(mlp(), (x, y), max_probes=6, tol=0, seed=4)
    b = analyze(custom_mlp(GoodTanh), (x, y), max_probes=6, tol=0, seed=4)
    for la, lb in zip(a.layers, b.layers):
        assert la.trace == pytest.approx(lb.trace, rel=1e-5)


def test_errors_name_the_argument():
    model = mlp()
    x, y = data((5,))
    x[3, 0] = float("nan")
    with pytest.raises(NumericalError, match="batch 0"):
        analyze(model, (x, y), batch_size=100)
    with pytest.raises(NumericalError, match="batch 1"):
        analyze(model, (x, y), batch_size=3)
    with pytest.raises(NumericalError, match="batch 1"):
        analyze(model, (x, y), batch_size=3, metric="fisher")
    with pytest.raises(ConfigError, match=r"valid names: \['0', '2'\]"):
        analyze(mlp(), data((5,)), layers=["nope"])
    with pytest.raises(ConfigError, match="layers"):
        analyze(mlp(), data((5,)), layers="0")
    with pytest.raises(ConfigError, match="metric"):
        analyze(mlp(), data((5,)), metric="hessian")
    with pytest.raises(ConfigError, match="max_probes"):
        analyze(mlp(), data((5,)), max_probes=0)
    with pytest.raises(ConfigError, match="reduction"):
        analyze(mlp(), data((5,)), criterion=nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(DataError, match="no samples"):
        analyze(mlp(), [])


def test_json_roundtrip(tmp_path):
    res = analyze(mlp(), data((5,)), metric="channel", max_probes=3, tol=0)
    path = res.to_json(tmp_path / "h.json")
    back = HessianResult.from_json(path)
    assert back == res and back.version == 1
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file
    eig = analyze(mlp(), data((5,)), metric="eigen", top_k=2, max_iter=5)
    assert HessianResult.from_dict(eig.to_dict()) == eig
    with pytest.raises(DataError, match="version"):
        HessianResult.from_dict({"metric": "trace", "version": 2})


def test_spectral_density_brackets_spectrum_and_estimates_trace():
    model = mlp()
    x, y = data((5,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    keys, shapes = ["0.weight", "2.weight"], [params["0.weight"].shape, params["2.weight"].shape]
    sizes = [s.numel() for s in shapes]

    def f(flat):
        ws = {k: t.view(s) for k, t, s in zip(keys, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, {**params, **ws}, (x,)), y)

    H = torch.autograd.functional.hessian(f, torch.cat([params[k].reshape(-1) for k in keys]))
    ev = torch.linalg.eigvalsh(H.double()).numpy()
    full = spectral_density(model, (x, y), n_steps=sum(sizes), n_vectors=1, seed=0)
    nodes = np.array(full.nodes[0])
    assert abs(nodes.max() - ev.max()) <= 1e-3 * np.abs(ev).max()
    assert abs(nodes.min() - ev.min()) <= 1e-3 * np.abs(ev).max()
    assert sum(full.weights[0]) == pytest.approx(1.0)
    grid = np.linspace(ev.min() - 1, ev.max() + 1, 4001)
    assert np.trapezoid(full.density(grid), grid) == pytest.approx(1.0, rel=1e-2)
    many = spectral_density(model, (x, y), n_steps=8, n_vectors=60, seed=1)
    Hd = H.double()
    se = np.sqrt(2 * float((Hd**2).sum() - (Hd.diagonal()**2).sum()) / 60)
    assert abs(many.trace_estimate() - float(Hd.trace())) <= 4 * se
    assert many.hvp_count <= 8 * 60


def test_activation_omega_matches_hand_computation():
    from hawq.maths.quantizers import dequantize, minmax_qparams, quantize
    from hawq.analysis.sensitivity import activation_errors, activation_omega

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


def test_data_chunks_and_operator_accept_tasks_and_old_calls():
    from hawq.analysis.hessian import HessianOperator, as_batches, data_chunks, select_layers
    from hawq.feed.tasks import as_task

    x, y = data((5,), n=10)
    assert [b[0].shape[0] for b in as_batches((x, y), 4)] == [4, 4, 2]  # (x, y) pairs as before
    assert len(as_batches(torch.utils.data.TensorDataset(x, y))) == 1  # whole data: one chunk
    with pytest.raises(ConfigError, match="batch_size"):
        data_chunks((x, y), 0)

    class Pairs(torch.utils.data.Dataset):  # a map-style Dataset: the task's batch size
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[i], y[i]

    assert [len(b[1]) for b in data_chunks(Pairs(), None, as_task("classification"))] == [10]
    assert [len(b[1]) for b in data_chunks(Pairs(), 3)] == [3, 3, 3, 1]
    model = mlp()
    mods = select_layers(model)
    v = [torch.ones_like(m.weight) for _, m in mods]
    chunks = as_batches((x, y), 4)
    old = HessianOperator(model, mods, chunks, nn.CrossEntropyLoss()).hvp(v)
    for op in (HessianOperator(model, mods, chunks),
               HessianOperator(model, mods, chunks, task="classification"),
               HessianOperator(model, mods, chunks, as_task("classification"))):
        assert all(torch.equal(a, b) for a, b in zip(old, op.hvp(v)))
    with pytest.raises(ConfigError, match="not both"):
        HessianOperator(model, mods, chunks, nn.CrossEntropyLoss(), task="classification")
