"""The Hessian engine routed through hawq.feed.tasks, against exact answers on tiny seeded models.

Exact Hessians come from torch.autograd.functional.hessian on functional_call of the task's own
loss (not the engine's HVP code). Hutchinson estimates are compared within 3 of their standard
errors; results that must not change (criterion vs default task, DataLoader vs tensors) are
compared for exact equality.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from hawq.base.errors import ConfigError, DataError
from hawq.analysis.fisher import fisher_traces
from hawq.analysis.hessian import analyze, select_layers
from hawq.analysis.hessian_density import spectral_density
from hawq.feed.tasks import as_task, custom_task, split_batch

FAST = dict(probe_batch=200, vectorized=True)
V, D, T, N = 7, 3, 5, 8  # vocabulary, width, sequence length, samples


def same(a, b):
    da, db = a.to_dict(), b.to_dict()
    da.pop("seconds"), db.pop("seconds")
    return da == db


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()


def pairs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V)

    def forward(self, input_ids, attention_mask=None, **unused):
        return self.head(torch.tanh(self.emb(input_ids)))


def lm():
    torch.manual_seed(1)
    return TinyLM().eval()


def tokens(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 3:] = 0  # padded tails: ignored by the causal-lm loss
    mask[4, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def exact_hessian(model, key, loss_of):
    """Exact Hessian (flattened) of ``loss_of(model_with_weight)`` w.r.t. parameter ``key``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    class Functional(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, *args, **kwargs):
            return functional_call(model, {**params, key: self.w}, args, kwargs)

    w0 = params[key]
    H = torch.autograd.functional.hessian(lambda w: loss_of(Functional(w)), w0)
    return H.reshape(w0.numel(), w0.numel()).double()


def chunked_task_loss(task, batch, size):
    """The engine's loss: chunk mean losses weighted by their number of samples."""
    chunks = split_batch(batch, size)
    n = sum(c["input_ids"].shape[0] for c in chunks)
    return lambda m: sum(task.loss_on(m, c) * (c["input_ids"].shape[0] / n) for c in chunks)


# (a) ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(metric="trace", max_probes=12, tol=0, probe_mode="joint"),
                                dict(metric="channel", max_probes=6, tol=0, probe_mode="layer",
                                     batch_size=5),
                                dict(metric="eigen", max_iter=20),
                                dict(metric="activation", max_probes=6, tol=0, batch_size=5),
                                dict(metric="fisher", batch_size=5)])
def test_default_task_equals_criterion_path_exactly(kw):
    d = pairs()
    via_criterion = analyze(mlp(), d, criterion=nn.CrossEntropyLoss(), seed=3, **kw)
    default = analyze(mlp(), d, seed=3, **kw)
    named = analyze(mlp(), d, task="classification", seed=3, **kw)
    instance = analyze(mlp(), d, task=as_task("classification"), seed=3, **kw)
    assert same(via_criterion, default) and same(default, named) and same(named, instance)


def test_criterion_with_sum_reduction_is_rescaled():
    d = pairs()
    kw = dict(max_probes=8, tol=0, seed=2, batch_size=5, probe_mode="joint")
    for metric in ("trace", "activation"):
        a = analyze(mlp(), d, metric=metric, **kw)
        b = analyze(mlp(), d, metric=metric, criterion=nn.CrossEntropyLoss(reduction="sum"), **kw)
        for la, lb in zip(a.layers, b.layers):
            assert la.trace == pytest.approx(lb.trace, rel=1e-5, abs=1e-8)


# (b) ------------------------------------------------------------------------------------------

def test_causal_lm_trace_matches_exact_hessian_of_task_loss():
    model, batch = lm(), tokens()
    task = as_task("causal-lm")
    res = analyze(model, batch, task="causal-lm", layers=["emb", "head"], batch_size=3, tol=0,
                  max_probes=2000, seed=0, probe_mode="layer", **FAST)
    assert res.samples == N and res.passes == 3
    for lh in res.layers:
        H = exact_hessian(model, lh.name + ".weight", chunked_task_loss(task, batch, 3))
        exact = float(H.trace())
        assert lh.probes == 2000 and lh.params == H.shape[0]
        assert abs(lh.trace - exact) <= 3 * lh.stderr, (lh.name, lh.trace, exact, lh.stderr)
        assert abs(lh.trace - exact) <= 0.05 * abs(exact), (lh.name, lh.trace, exact)


def test_causal_lm_eigen_matches_exact_and_fisher_matches_per_sample_loop():
    model, batch = lm(), tokens()
    task = as_task("causal-lm")
    eig = analyze(model, batch, task="causal-lm", metric="eigen", layers=["head"], tol=1e-7,
                  max_iter=3000)
    H = exact_hessian(model, "head.weight", lambda m: task.loss_on(m, batch))
    ev = torch.linalg.eigvalsh(H)
    assert eig.layers[0].eigenvalue == pytest.approx(float(ev[ev.abs().argmax()]), rel=1e-2)

    fis = analyze(model, batch, task="causal-lm", metric="fisher", layers=["emb", "head"],
                  batch_size=3)
    assert fis.samples == N and fis.hvp_count == 0
    for lh in fis.layers:
        w = dict(model.named_modules())[lh.name].weight
        total = 0.0
        for i in range(N):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            (g,) = torch.autograd.grad(task.loss(model(**one), one), w)
            total += float(g.pow(2).sum())
        assert lh.trace == pytest.approx(total / N, rel=1e-5)
    # a batch vmap cannot map (a non-tensor entry) takes the per-sample loop: same numbers
    looped = analyze(model, [{**batch, "source": "a string"}], task="causal-lm",
                     metric="fisher", layers=["emb", "head"])
    for la, lb in zip(fis.layers, looped.layers):
        assert lb.trace == pytest.approx(la.trace, rel=1e-5)


def test_causal_lm_activation_trace_is_summed_loss_hessian():
    model, batch = lm(), tokens()
    task = as_task("causal-lm")
    res = analyze(model, batch, task=task, metric="activation", layers=["head"], tol=0,
                  max_probes=2000, seed=1, **FAST)
    shape = (N, T, D)

    def f(d):
        h = model.head.register_forward_pre_hook(lambda _m, i: (i[0] + d,))
        try:
            return N * task.loss_on(model, batch)  # the summed loss: N x the mean
        finally:
            h.remove()

    H = torch.autograd.functional.hessian(f, torch.zeros(shape)).reshape(N * T * D, -1)
    exact = float(H.trace())
    lh = res.layers[0]
    assert lh.params == N * T * D
    assert abs(lh.trace - exact) <= 3 * lh.stderr, (lh.trace, exact, lh.stderr)
    assert abs(lh.trace - exact) <= 0.05 * abs(exact)


def test_spectral_density_with_a_task_estimates_the_task_trace():
    model, batch = lm(), tokens()
    task = as_task("causal-lm")
    H = exact_hessian(model, "head.weight", lambda m: task.loss_on(m, batch))
    full = spectral_density(model, batch, task="causal-lm", layers=["head"], n_steps=H.shape[0])
    ev = torch.linalg.eigvalsh(H).numpy()
    nodes = np.array(full.nodes[0])
    assert abs(nodes.max() - ev.max()) <= 1e-3 * np.abs(ev).max()
    assert full.dim == H.shape[0]


# (c) ------------------------------------------------------------------------------------------

def test_embedding_task_hessian_is_gauss_newton_and_analyze_matches_it():
    model = mlp()
    x, _ = pairs(n=10)
    task = as_task("embedding").bind(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    res = analyze(model, x, task=task, tol=0, max_probes=2000, seed=0, probe_mode="layer",
                  **FAST)
    for lh in res.layers:
        key = lh.name + ".weight"
        w0 = params[key]
        H = exact_hessian(model, key, lambda m: task.loss_on(m, x))
        J = torch.autograd.functional.jacobian(
            lambda w, key=key: functional_call(model, {**params, key: w}, (x,)), w0)
        J = J.reshape(-1, w0.numel()).double()  # (N * out, params)
        gn = 2 * J.T @ J / len(x)
        assert torch.allclose(H, gn, rtol=1e-4, atol=1e-6)
        exact = float(gn.trace())
        assert abs(lh.trace - exact) <= 3 * lh.stderr, (lh.name, lh.trace, exact, lh.stderr)
        assert abs(lh.trace - exact) <= 0.05 * exact
    # an unbound "embedding" task is bound to the analysed (float) model: the same numbers
    unbound = analyze(model, x, task="embedding", tol=0, max_probes=2000, seed=0,
                      probe_mode="layer", **FAST)
    assert same(res, unbound)
    with pytest.raises(ConfigError, match="metric='trace'"):
        analyze(model, x, task="embedding", metric="fisher")
    with pytest.raises(ConfigError, match="metric='trace'"):
        fisher_traces(model, select_layers(model), [x], task=task)


# (d) ------------------------------------------------------------------------------------------

class TwoLosses(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.reg = nn.Linear(4, 2)
        self.cls = nn.Linear(4, 3)

    def forward(self, x, targets):
        h = torch.tanh(self.body(x))
        return {"a": F.mse_loss(self.reg(h), targets[:, :2]),
                "b": F.cross_entropy(self.cls(h), targets[:, 2].long())}


def test_loss_dict_trace_is_sum_of_losses_hessian_trace():
    torch.manual_seed(2)
    model = TwoLosses().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g)
    t = torch.cat([torch.randn(10, 2, generator=g),
                   torch.randint(0, 3, (10, 1), generator=g).float()], 1)
    res = analyze(model, (x, t), task="loss-dict", tol=0, max_probes=2000, seed=0,
                  probe_mode="layer", **FAST)
    assert [lh.name for lh in res.layers] == ["body", "reg", "cls"]
    for lh in res.layers:
        H = exact_hessian(model, lh.name + ".weight",
                          lambda m: sum(m(x, t).values()))
        exact = float(H.trace())
        assert abs(lh.trace - exact) <= 3 * lh.stderr, (lh.name, lh.trace, exact, lh.stderr)
        assert abs(lh.trace - exact) <= 0.05 * abs(exact)
    fis = analyze(model, (x, t), task="loss-dict", metric="fisher", layers=["body"])
    w = model.body.weight
    direct = np.mean([float(torch.autograd.grad(sum(model(x[i:i + 1], t[i:i + 1]).values()),
                                                w)[0].pow(2).sum()) for i in range(10)])
    assert fis.layers[0].trace == pytest.approx(direct, rel=1e-5)


# (e) ------------------------------------------------------------------------------------------

def test_dataloader_and_dataset_give_the_tensors_result():
    x, y = pairs(n=13)
    kw = dict(max_probes=6, tol=0, seed=5, probe_mode="joint")
    ref = analyze(mlp(), (x, y), batch_size=5, **kw)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    assert same(ref, analyze(mlp(), loader, **kw))
    assert same(ref, analyze(mlp(), loader, batch_size=5, **kw))  # loader batches kept
    assert same(ref, analyze(mlp(), torch.utils.data.TensorDataset(x, y), batch_size=5, **kw))
    assert ref.passes == 3 and ref.samples == 13

    class Dicts(torch.utils.data.Dataset):  # one dict per sample, collated by a DataLoader
        def __init__(self, b):
            self.b = b

        def __len__(self):
            return N

        def __getitem__(self, i):
            return {k: v[i] for k, v in self.b.items()}

    batch = tokens()
    kw = dict(task="causal-lm", layers=["emb", "head"], max_probes=6, tol=0, seed=5)
    a = analyze(lm(), batch, batch_size=3, **kw)
    assert same(a, analyze(lm(), Dicts(batch), batch_size=3, **kw))
    assert same(a, analyze(lm(), torch.utils.data.DataLoader(Dicts(batch), batch_size=3), **kw))
    assert a.passes == 3


# (f) ------------------------------------------------------------------------------------------

def test_data_that_does_not_fit_the_task_raises_naming_it():
    x, y = pairs()
    with pytest.raises(DataError, match="classification"):
        analyze(mlp(), x)  # no labels
    with pytest.raises(DataError, match="classification"):
        analyze(mlp(), x, metric="fisher")
    with pytest.raises(DataError, match="causal-lm"):
        analyze(lm(), {"ids": tokens()["input_ids"]}, task="causal-lm")
    with pytest.raises(DataError, match="causal-lm"):
        analyze(mlp(), x, task="causal-lm")  # float features are no token ids
    with pytest.raises(DataError, match="criterion"):
        analyze(mlp(), x, criterion=nn.CrossEntropyLoss())
    with pytest.raises(DataError, match="causal-lm"):
        spectral_density(lm(), {"ids": tokens()["input_ids"]}, task="causal-lm")


def test_task_and_criterion_together_and_custom_tasks():
    x, y = pairs()
    with pytest.raises(ConfigError, match="not both"):
        analyze(mlp(), (x, y), task="classification", criterion=nn.CrossEntropyLoss())
    with pytest.raises(ConfigError, match="task"):
        analyze(mlp(), (x, y), task="no-such-task")
    # a loss callable is a custom task; the same loss as the default task gives the same numbers
    kw = dict(max_probes=6, tol=0, seed=1, batch_size=5, probe_mode="joint")
    ce = custom_task(lambda out, b: F.cross_entropy(out, b[1]))
    assert same(analyze(mlp(), (x, y), task=ce, **kw), analyze(mlp(), (x, y), **kw))
    fn = analyze(mlp(), (x, y), task=lambda out, b: F.cross_entropy(out, b[1]), **kw)
    assert same(fn, analyze(mlp(), (x, y), **kw))
