"""Hessian engine: per-layer Hutchinson traces, channel traces, top eigenvalues, activation
traces and the exact empirical-Fisher trace, all for the mean loss over a dataset.

Speed: the gradient graph is built once per data chunk (one forward + create_graph backward) and
reused for every Hessian-vector product (one double-backward each). A Hutchinson probe spans
*all* selected layers at once: v_i · (Hv)_i is an unbiased estimate of Tr(H_ii) for every layer
i from the same product, so a probe costs one HVP, not one per layer.

Stopping rule: Hutchinson stops when every layer's relative standard error
(stderr / |mean|) is below ``tol`` (after ``min_probes``), or at ``max_probes``. PyHessian instead
stops when the running mean of the *total* trace changes by less than ``tol`` relative between
consecutive probes: that is not an error bound and says nothing about individual layers.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.errors import ConfigError, NumericalError, UnsupportedLayerError

METRICS = ("trace", "eigen", "channel", "activation", "fisher")


@dataclass
class LayerHessian:
    """Second-order statistics of one layer (fields that do not apply are None)."""

    name: str
    params: int
    trace: float | None = None
    avg_trace: float | None = None
    stderr: float | None = None
    eigenvalue: float | list[float] | None = None
    channel_traces: list[float] | None = None
    probes: int | None = None


@dataclass
class HessianResult:
    """What :func:`analyze` measured; serialises to JSON (``version`` 1)."""

    metric: str
    layers: list[LayerHessian] = field(default_factory=list)
    hvp_count: int = 0
    seconds: float = 0.0
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HessianResult":
        d = dict(d)
        d["layers"] = [LayerHessian(**lh) for lh in d.get("layers", [])]
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> Path:
        from hawq.io import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "HessianResult":
        from hawq.io import read_json

        return cls.from_dict(read_json(path, "Hessian result"))


def select_layers(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers to analyse: ``layers`` or every Conv/Linear layer."""
    from hawq.surgery import quantizable_layers

    mods = quantizable_layers(model)
    if layers is None:
        return list(mods.items())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise ConfigError(f"layers {missing} are not Conv/Linear layers of the model; valid "
                          f"names: {sorted(mods)}")
    return [(n, mods[n]) for n in layers]


def _chunks(data: Any, batch_size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(data, "tensors"):
        data = data.tensors[:2]
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if batch_size is None:
            return [(x, y)]
        return list(zip(x.split(batch_size), y.split(batch_size)))
    return [(b[0], b[1]) for b in data]


class _HVP:
    """Hessian-vector products of the mean loss, graphs built once per chunk and reused."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor], data: Any,
                 criterion: Callable, batch_size: int | None, names: list[str]):
        self.params = params
        self.count = 0
        self.chunks = _chunks(data, batch_size)
        if not self.chunks:
            raise ConfigError("data is empty: give at least one batch")
        total = sum(len(y) for _, y in self.chunks)
        device = params[0].device
        self.grads: list[tuple[torch.Tensor, ...]] = []
        self.weights: list[float] = []
        for k, (x, y) in enumerate(self.chunks):
            loss = criterion(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise NumericalError(f"loss is {loss.item()} at batch {k}: check the model and "
                                     "data (NaN/inf inputs, a diverged model)")
            g = torch.autograd.grad(loss, params, create_graph=True)
            self.grads.append(g)
            self.weights.append(len(y) / total)
        self.names = names

    def __call__(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v for v given per parameter (one double-backward per chunk)."""
        out = [torch.zeros_like(p) for p in self.params]
        for g, wt in zip(self.grads, self.weights):
            try:
                hv = torch.autograd.grad(g, self.params, vs, retain_graph=True,
                                         allow_unused=True)
            except RuntimeError as exc:
                raise UnsupportedLayerError(
                    f"double backward failed ({exc}); an operation in the model does not support "
                    "second derivatives: exclude the layers around it with layers=[...]") from exc
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h, alpha=wt)
        self.count += 1
        return out

    def block(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """H_ii v for layer i alone (differentiates only g_i)."""
        out = torch.zeros_like(self.params[i])
        for g, wt in zip(self.grads, self.weights):
            (h,) = torch.autograd.grad(g[i], self.params[i], v, retain_graph=True)
            out.add_(h, alpha=wt)
        self.count += 1
        return out


def _rademacher(shape: torch.Size, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen).to(like) * 2 - 1)


def hutchinson(op: _HVP, gen: torch.Generator, tol: float, max_probes: int, min_probes: int,
               progress: bool, channel: bool) -> tuple[np.ndarray, np.ndarray, int, list]:
    """Per-layer Hutchinson samples; returns (mean, stderr, probes, channel means)."""
    L = len(op.params)
    samples = []
    ch_sum = [torch.zeros(p.shape[0], dtype=torch.float64) for p in op.params] if channel else []
    bar = tqdm(total=max_probes, desc="Hutchinson probes", disable=not progress, leave=False)
    for k in range(max_probes):
        vs = [_rademacher(p.shape, gen, p) for p in op.params]
        hv = op(vs)
        prods = [(v * h) for v, h in zip(vs, hv)]
        samples.append([float(pr.sum()) for pr in prods])
        if channel:
            for i, pr in enumerate(prods):
                ch_sum[i] += pr.reshape(pr.shape[0], -1).sum(1).double().cpu()
        bar.update()
        if k + 1 >= max(min_probes, 2) and tol > 0:
            arr = np.array(samples)
            mean = arr.mean(0)
            se = arr.std(0, ddof=1) / math.sqrt(len(arr))
            if np.all(se <= tol * np.abs(mean)):
                break
    bar.close()
    arr = np.array(samples).reshape(-1, L)
    n = len(arr)
    se = arr.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.full(L, np.nan)
    ch = [(c / n).tolist() for c in ch_sum] if channel else []
    return arr.mean(0), se, n, ch


def power_iteration(op: _HVP, i: int, gen: torch.Generator, k: int, tol: float,
                    max_iter: int) -> list[float]:
    """Top-k (largest magnitude) eigenvalues of H_ii with deflation."""
    p = op.params[i]
    vecs: list[torch.Tensor] = []
    vals: list[float] = []
    for _ in range(k):
        v = torch.randn(p.shape, generator=gen).to(p)
        v /= v.norm()
        lam = None
        for _ in range(max_iter):
            for u in vecs:
                v = v - (v * u).sum() * u
            v = v / v.norm()
            hv = op.block(i, v)
            for u, lu in zip(vecs, vals):
                hv = hv - lu * (u * v).sum() * u
            new = float((hv * v).sum())
            norm = hv.norm()
            if norm == 0:
                lam = 0.0
                break
            v = hv / norm
            if lam is not None and abs(new - lam) <= tol * (abs(lam) + 1e-30):
                lam = new
                break
            lam = new
        vecs.append(v.detach())
        vals.append(float(lam))
    return vals


def activation_traces(model: nn.Module, mods: list[tuple[str, nn.Module]], data: Any,
                      criterion_sum: Callable, gen: torch.Generator, tol: float,
                      max_probes: int, min_probes: int, batch_size: int | None,
                      progress: bool) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Hutchinson traces of the summed loss's Hessian w.r.t. each layer's input activation."""
    chunks = _chunks(data, batch_size)
    total_mean = np.zeros(len(mods))
    total_var = np.zeros(len(mods))
    probes_used = 0
    hvps = 0
    device = next(model.parameters()).device
    for ci, (x, y) in enumerate(chunks):
        acts: list[torch.Tensor] = []

        def pre(_m, inputs):
            a = inputs[0]
            if not a.requires_grad:
                a = a.detach().requires_grad_(True)
            acts.append(a)
            return (a, *inputs[1:])

        hooks = [m.register_forward_pre_hook(pre) for _, m in mods]
        try:
            loss = criterion_sum(model(x.to(device)), y.to(device))
        finally:
            for h in hooks:
                h.remove()
        if not torch.isfinite(loss):
            raise NumericalError(f"loss is {loss.item()} at batch {ci}")
        grads = torch.autograd.grad(loss, acts, create_graph=True)
        samples = []
        for k in range(max_probes):
            vs = [_rademacher(a.shape, gen, a) for a in acts]
            hv = torch.autograd.grad(grads, acts, vs, retain_graph=True, allow_unused=True)
            hvps += 1
            samples.append([0.0 if h is None else float((v * h).sum()) for v, h in zip(vs, hv)])
            if k + 1 >= max(min_probes, 2) and tol > 0:
                arr = np.array(samples)
                if np.all(arr.std(0, ddof=1) / math.sqrt(len(arr)) <= tol * np.abs(arr.mean(0))):
                    break
        arr = np.array(samples)
        total_mean += arr.mean(0)
        if len(arr) > 1:
            total_var += arr.var(0, ddof=1) / len(arr)
        probes_used = max(probes_used, len(arr))
    return total_mean, np.sqrt(total_var), probes_used, hvps


def fisher_traces(model: nn.Module, mods: list[tuple[str, nn.Module]], data: Any,
                  criterion: Callable, batch_size: int | None) -> np.ndarray:
    """Exact empirical-Fisher trace per layer: mean over samples of ||grad_i loss_s||^2."""
    from torch.func import functional_call, grad, vmap

    names = [n + ".weight" for n, _ in mods]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    sel = {k: params[k] for k in names}

    def loss_one(p, x, y):
        out = functional_call(model, ({**params, **p}, buffers), (x.unsqueeze(0),))
        return criterion(out, y.unsqueeze(0))

    per = vmap(grad(loss_one), in_dims=(None, 0, 0))
    sums = np.zeros(len(names))
    n = 0
    device = next(model.parameters()).device
    for x, y in _chunks(data, batch_size or 64):
        g = per(sel, x.to(device), y.to(device))
        sums += np.array([float(g[k].pow(2).sum()) for k in names])
        n += len(y)
    return sums / n


def analyze(model: nn.Module, data: Any, criterion: Callable | None = None,
            metric: str = "trace", layers: Sequence[str] | None = None, seed: int = 0,
            tol: float | None = None, max_probes: int = 200, min_probes: int = 4,
            top_k: int = 1, max_iter: int = 100, batch_size: int | None = None,
            progress: bool = False) -> HessianResult:
    """Per-layer second-order sensitivity of ``model`` on ``data``.

    ``data``: (inputs, targets), a TensorDataset or an iterable of (x, y) batches; the loss is
    the mean of ``criterion`` (default cross-entropy) over all samples; model in eval mode.
    Metrics and costs (C = number of data chunks, one graph-building pass first):

    * ``"trace"``: Hutchinson Tr(H_ii) per layer; one HVP (C double-backwards) per probe for all
      layers; stops when every layer's stderr/|trace| < tol (default 1e-2) or at max_probes.
    * ``"channel"``: the same plus per-output-channel traces (they sum to the layer trace).
    * ``"eigen"``: top-``top_k`` eigenvalues of each H_ii by power iteration (tol default
      1e-3, max_iter); one block HVP per layer per iteration.
    * ``"activation"``: trace of the Hessian of the *summed* loss w.r.t. each layer's input
      activation (block-diagonal over samples, so this is the sum over data points).
    * ``"fisher"``: exact empirical-Fisher trace from per-sample gradients (no probes, no HVP;
      one vmapped backward per chunk of 64).
    """
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r}: use one of {METRICS}")
    if max_probes < 1:
        raise ConfigError(f"max_probes={max_probes}: give at least 1")
    criterion = criterion or nn.CrossEntropyLoss()
    mods = select_layers(model, layers)
    names = [n for n, _ in mods]
    params = [m.weight for _, m in mods]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    result = HessianResult(metric=metric)
    try:
        if metric == "fisher":
            tr = fisher_traces(model, mods, data, criterion, batch_size)
            result.layers = [LayerHessian(n, p.numel(), float(t), float(t) / p.numel())
                             for n, p, t in zip(names, params, tr)]
        elif metric == "activation":
            summed = _sum_criterion(criterion)
            tr, se, probes, hvps = activation_traces(
                model, mods, data, summed, gen, 1e-2 if tol is None else tol, max_probes,
                min_probes, batch_size, progress)
            result.hvp_count = hvps
            result.layers = [LayerHessian(n, p.numel(), float(t), None, float(s), probes=probes)
                             for n, p, t, s in zip(names, params, tr, se)]
        else:
            with torch.enable_grad():
                op = _HVP(model, params, data, criterion, batch_size, names)
                if metric == "eigen":
                    vals = []
                    for i in tqdm(range(len(params)), desc="power iteration",
                                  disable=not progress, leave=False):
                        v = power_iteration(op, i, gen, top_k, 1e-3 if tol is None else tol,
                                            max_iter)
                        vals.append(v[0] if top_k == 1 else v)
                    result.layers = [LayerHessian(n, p.numel(), eigenvalue=v)
                                     for n, p, v in zip(names, params, vals)]
                else:
                    mean, se, probes, ch = hutchinson(op, gen, 1e-2 if tol is None else tol,
                                                      max_probes, min_probes, progress,
                                                      metric == "channel")
                    result.layers = [
                        LayerHessian(n, p.numel(), float(t), float(t) / p.numel(), float(s),
                                     channel_traces=ch[i] if ch else None, probes=probes)
                        for i, (n, p, t, s) in enumerate(zip(names, params, mean, se))]
                result.hvp_count = op.count
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


def _sum_criterion(criterion: Callable) -> Callable:
    reduction = getattr(criterion, "reduction", None)
    if reduction is None:
        raise ConfigError("metric='activation' needs a criterion with a 'reduction' attribute "
                          "(e.g. nn.CrossEntropyLoss()) so the per-sample losses can be summed")
    summed = type(criterion)(reduction="sum") if reduction != "sum" else criterion
    return summed
