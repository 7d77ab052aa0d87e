"""Hessian engine: per-layer Hutchinson traces, channel traces, top eigenvalues and activation
traces of the loss over a dataset (HAWQ, HAWQ-V2, channel-wise HAWQ); the exact empirical-Fisher
trace lives in :mod:`hawq.analysis.fisher` and stochastic Lanczos quadrature in :mod:`hawq.analysis.hessian_density`.

Loss. Each chunk's loss is the task's (:mod:`hawq.feed.tasks`; default ``classification``, i.e.
cross-entropy on (x, y) pairs): ``task.loss(task.forward(model, batch), batch)``, a mean over the
chunk's samples; chunks are weighted by their number of samples, so the Hessian is that of the
mean loss over the data. A ``criterion`` (output, target) -> loss is a classifier-fed custom task.

Cost model. ``data`` is split into C chunks (one per DataLoader batch, or ``batch_size`` pieces of
in-memory tensors, pairs or dicts; one chunk by default). For each chunk the gradient is computed once with ``create_graph=True`` (one forward plus
one graph-building backward: a *pass*) and that graph is reused for every Hessian-vector product
(HVP), each one double-backward. With one chunk that is the floor: 1 pass + 1 double-backward per
product. With several chunks the graphs are kept while their measured size (saved tensors) fits in
``max_graph_bytes`` (default: half the free memory); chunks that do not fit are rebuilt for every
product (1 pass + 1 double-backward each). ``HessianResult.passes`` counts graph builds.

Hutchinson. A joint probe (``probe_mode="joint"``, the default) is one Rademacher vector v over
*all* selected layers and one HVP: v_i . (Hv)_i is an unbiased estimate of Tr(H_ii) for every
layer i from the same product, since E[v_i . H_ij v_j] = 0 for j != i. Its variance is
2 sum_{a!=b} (H_ii)_ab^2 (Hutchinson's own) plus sum_{j!=i} ||H_ij||_F^2 (the other layers' probe
entries); the reported standard errors include both. ``probe_mode="layer"`` probes each diagonal
block alone (one block product H_ii v_i per layer per probe, on the same shared graph), which
removes the second term at the price of L block products per probe; on small CNNs and ResNet-20
the cross-layer term is often the larger one (see ``benchmarks/hessian_speed.py``).

Gauss-Newton route (``probe_mode="gn"``; what the default ``"auto"`` picks for ``metric="trace"``
on classifiers with the built-in cross-entropy): Tr(H_ii) = Tr(GN_ii) + Tr(R_ii) with the
Gauss-Newton part computed exactly from per-sample gradients and only the remainder R_ii probed
per layer (:mod:`hawq.analysis.gauss_newton`); R_ii = 0 exactly on ReLU/BN/residual networks, so
there the trace is exact after ``min_probes`` remainder probes.

Stopping rule: every layer's relative standard error stderr/|mean| <= ``tol`` after
``min_probes``, or ``max_probes``. PyHessian instead stops when the running mean of the *total*
trace changes by less than ``tol`` (relative) between consecutive probes: that is no statistical
error bound (a slowly drifting mean stops it early, and with a negative running trace its
``/(trace + 1e-6)`` test is always true) and says nothing about single layers.

Distributed (a ``torch.distributed`` process group, e.g. under ``torchrun``; see
:mod:`hawq.base.dist`): rank r of N owns chunks r, r+N, ...; all ranks draw the same probes and
each probe's per-layer scalars are summed over ranks (O(layers) numbers), so the result is the
single-process one; :meth:`HessianOperator.hvp` / ``block_hvp`` sum whole vectors (O(params)),
which power iteration and Lanczos need. Without a process group nothing changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base import dist
from hawq.modules.attention import attention_safe
from hawq.base.errors import ConfigError, DataError, NumericalError, UnsupportedLayerError
from hawq.modules.qmodules import layer_weight
from hawq.feed.tasks import (Task, as_task, batch_len, batch_to, materialize,
                        resolve_task)

__all__ = ["DEFAULT_TYPES", "HessianOperator", "HessianResult", "LayerHessian", "METRICS",
           "PROBE_MODES", "TraceEstimate", "analyze", "as_batches", "check_int",
           "check_probe_mode", "data_chunks", "grad_setup", "hutchinson", "power_iteration",
           "select_layers", "trace_route"]

METRICS = ("trace", "eigen", "channel", "activation", "fisher")
DEFAULT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
Batch = Any  # any batch structure hawq.feed.tasks reads: tensors, (x, y) pairs, dicts of tensors
_WHOLE = 2**62  # batch_size that keeps a whole in-memory dataset as one chunk


@dataclass
class LayerHessian:
    """Second-order statistics of one layer; fields that do not apply are None.

    ``params`` is the weight's element count, except for ``metric="activation"`` where it is
    the number of input-activation elements summed over all data points (so ``avg_trace`` is
    the per-element average in both cases). ``stderr`` is the Monte-Carlo standard error of
    ``trace``; ``probes`` the number of Rademacher probes used. ``route`` says how a trace was
    estimated: ``"joint"`` / ``"layer"`` Hutchinson, or ``"gn-exact"`` / ``"gn-sampled"``
    (Gauss-Newton part ``gn_trace`` exact or sampled, plus a per-layer Hutchinson estimate of
    the remainder with ``probes`` probes; see :mod:`hawq.analysis.gauss_newton`).
    """

    name: str
    params: int
    trace: float | None = None
    avg_trace: float | None = None
    stderr: float | None = None
    eigenvalue: float | list[float] | None = None
    channel_traces: list[float] | None = None
    probes: int | None = None
    route: str | None = None
    gn_trace: float | None = None


@dataclass
class HessianResult:
    """What :func:`analyze` measured. ``hvp_count`` counts Hessian-vector products over the whole
    data (block products for ``eigen``), ``passes`` graph-building passes over chunks."""

    metric: str
    layers: list[LayerHessian] = field(default_factory=list)
    hvp_count: int = 0
    seconds: float = 0.0
    samples: int = 0
    passes: int = 0
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HessianResult":
        if not isinstance(d, dict) or d.get("version", 1) != 1 or "metric" not in d:
            raise DataError("not a version-1 Hessian result (need a dict with 'metric' and "
                            f"'version': 1); got {str(d)[:80]!r}")
        known = {f.name for f in fields(cls)}
        lf = {f.name for f in fields(LayerHessian)}
        try:
            layers = [LayerHessian(**{k: v for k, v in lh.items() if k in lf})
                      for lh in d.get("layers", [])]
        except TypeError as exc:
            raise DataError(f"malformed layer entry in Hessian result: {exc}") from exc
        return cls(**{k: v for k, v in d.items() if k in known and k != "layers"}, layers=layers)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write as JSON atomically (temporary file + rename); returns the path. In a
        distributed run only rank 0 writes (every rank holds the same result)."""
        from hawq.base.io import write_json

        if not dist.is_main():
            return Path(path)
        return write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "HessianResult":
        from hawq.base.io import read_json

        return cls.from_dict(read_json(path, "Hessian result"))


def select_layers(model: nn.Module, layers: Sequence[str] | None = None
                  ) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers to analyse, in ``named_modules`` order.

    Default: every Conv1d/Conv2d/Linear (and registered quantizable type); ``layers`` may name
    any submodule with a ``weight`` parameter. Raises ConfigError listing the valid names.
    """
    from hawq.modules.qmodules import is_quantizable

    weighted = {n: m for n, m in model.named_modules()
                if n and isinstance(layer_weight(m), nn.Parameter)}
    if layers is None:
        out = [(n, m) for n, m in weighted.items()
               if isinstance(m, DEFAULT_TYPES) or is_quantizable(m)]
        if not out:
            raise ConfigError("the model has no Conv1d/Conv2d/Linear submodule: pass layers=[...] "
                              f"naming modules with a weight; valid names: {sorted(weighted)}")
        return out
    if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
        raise ConfigError(f"layers={layers!r}: give a list of module names, e.g. [{layers!r}]")
    missing = [n for n in layers if n not in weighted]
    if missing or not layers or len(set(layers)) != len(layers):
        why = f"{missing} are not modules with a weight" if missing else "empty or has duplicates"
        raise ConfigError(f"layers={list(layers)}: {why}; valid names: {sorted(weighted)}")
    return [(n, weighted[n]) for n in layers]


def data_chunks(data: Any, batch_size: int | None = None, task: Task | None = None,
                who: str = "data") -> list[Batch]:
    """``data`` as a list of chunks (batches) in memory, read by :func:`hawq.feed.tasks.materialize`
    (tensors, ``(x, y)`` pairs, TensorDatasets, dicts of tensors, Datasets, DataLoaders).

    ``batch_size`` splits in-memory data (tensors, pairs, dicts, TensorDatasets) into pieces and
    sets a Dataset's loader batch; a DataLoader's (or other iterable's) batches are kept as they
    come. ``None``: in-memory data is one chunk, a map-style Dataset is read in batches of the
    task's ``batch_size``. Returns the batches; raises :class:`DataError` when there are no
    samples. Cost: holds every batch (slices of tensors are views)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r}: give a positive integer or None")
    if batch_size is None:
        dataset = (isinstance(data, torch.utils.data.Dataset)
                   and not isinstance(data, (torch.utils.data.TensorDataset,
                                             torch.utils.data.IterableDataset)))
        batch_size = (task or as_task(None)).batch_size if dataset else _WHOLE
    return materialize(data, batch_size, who)


def as_batches(data: Any, batch_size: int | None = None) -> list[Batch]:
    """Compatibility name of :func:`data_chunks` (default task): the chunks of ``data``, e.g.
    ``(inputs, targets)`` pairs for tensor pairs."""
    return data_chunks(data, batch_size)


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4.0 * 2**30


class _SavedBytes:
    """Counts the distinct storages autograd saves while a graph is built (its memory)."""

    def __init__(self) -> None:
        self.total, self.seen = 0, set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            s = t.untyped_storage()
            key, size = (s.data_ptr(), str(t.device)), s.nbytes()
        except (RuntimeError, NotImplementedError):  # storage-less tensor subclasses
            key, size = (id(t), "?"), t.numel() * t.element_size()
        if key not in self.seen:
            self.seen.add(key)
            self.total += size
        return t


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


class _Inspector:
    """Maps autograd nodes to the module whose forward made them ("in or just before") and
    checks that custom autograd Functions return differentiable gradients: torch silently drops
    their second-order terms otherwise (``@once_differentiable`` included), giving wrong HVPs."""

    def __init__(self, model: nn.Module):
        self.owner: dict[Any, str] = {}
        self.order: dict[str, int] = {}
        self.bad: list[tuple[str, str]] = []
        self.handles = [m.register_forward_hook(self._on_forward(n))
                        for n, m in model.named_modules() if n]

    def _on_forward(self, name: str) -> Callable:
        def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
            self.order.setdefault(name, len(self.order))
            for t in _tensors(out):
                self._claim(t.grad_fn, name)
        return hook

    def _claim(self, root: Any, name: str) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            if node is None or node in self.owner:
                continue
            self.owner[node] = name
            stack.extend(n for n, _ in node.next_functions)

    def watch(self, loss: torch.Tensor) -> None:
        """Stop recording modules; hook every custom Function node of the loss's graph."""
        self.remove()
        self._claim(loss.grad_fn, "<loss>")
        for node, where in self.owner.items():
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                op = type(node).__name__.removesuffix("Backward")
                self.handles.append(node.register_hook(self._check(op, where)))

    def _check(self, op: str, where: str) -> Callable:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs):
                return
            for g in grad_inputs:
                if not isinstance(g, torch.Tensor):
                    continue
                if (type(g.grad_fn).__name__ in ("Error", "DelayedError")
                        or (not g.requires_grad and bool(g.detach().ne(0).any()))):
                    self.bad.append((op, where))
                    return
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def custom_ops(self) -> list[tuple[str, str]]:
        return [(type(n).__name__.removesuffix("Backward"), w) for n, w in self.owner.items()
                if isinstance(n, torch.autograd.function.BackwardCFunction)]


class _Graph(NamedTuple):
    grads: tuple  # d loss / d wrt, built with create_graph=True (None where unused)
    wrt: list[torch.Tensor]  # the layer weights, or per-chunk activation perturbations
    owner: list[int]  # layer index of each wrt tensor


class HessianOperator:
    """Hessian-vector products of the loss over ``batches`` w.r.t. the weights of ``mods``
    (``target="weights"``: Hessian of the mean loss over all samples) or w.r.t. each layer's
    input activation (``"activations"``: Hessian of the summed loss; block-diagonal over
    samples). Each chunk's loss is ``task.loss(task.forward(model, batch), batch)`` on the batch
    moved to the weights' device (``criterion`` instead: ``criterion(output, targets)``; a
    :class:`~hawq.feed.tasks.Task` given as ``criterion`` is used as the task); chunks are weighted
    by their number of samples. Builds chunk 0 on construction; see the module docstring for
    the caching rule."""

    def __init__(self, model: nn.Module, mods: list[tuple[str, nn.Module]], batches: list[Batch],
                 criterion: Callable | Task | None = None, target: str = "weights",
                 max_graph_bytes: float | None = None, task: Task | str | None = None):
        if isinstance(criterion, Task):
            task, criterion = (criterion, None) if task is None else (task, criterion)
        self.task, summed = resolve_task(task, criterion, model)
        self.model, self.mods, self.batches, self.criterion = model, mods, batches, criterion
        self.names = [n for n, _ in mods]
        self.params = [layer_weight(m) for _, m in mods]
        self.activations = target == "activations"
        self.device = self.params[0].device
        n = [batch_len(b) for b in batches]
        self.samples = sum(n)
        if self.activations:  # the summed loss: scale a batch mean back to a sum
            self.scale = [1.0 if summed else float(k) for k in n]
        else:  # the mean loss over all samples
            self.scale = [1.0 / self.samples if summed else k / self.samples for k in n]
        self.act_elems = np.zeros(len(mods), dtype=np.int64)
        self._counted: set[int] = set()
        self._numel: dict[int, int] = {}  # activations: probe-vector length of each chunk
        self.hvp_count = 0
        self.passes = 0
        self.custom: list[tuple[str, str]] = []
        self.order: dict[str, int] = {}
        self.cache: dict[int, _Graph] = {}
        # this rank's chunks (all of them in a single process): see hawq.base.dist
        self.own = dist.shard(range(len(batches)))
        own = self.own
        counter = _SavedBytes() if len(own) > 1 else None
        first = self._build(own[0], inspect=True, counter=counter) if own else None
        keep = list(own)
        if counter is not None:
            budget = 0.5 * _free_bytes(self.device) if max_graph_bytes is None else max_graph_bytes
            est = [counter.total * n[k] / n[own[0]] for k in own]
            keep, used = [], 0.0
            for pos, k in enumerate(own):  # keep a prefix; room for one rebuilt graph at a time
                if used + est[pos] + max(est[pos + 1:], default=0.0) > budget:
                    break
                used += est[pos]
                keep.append(k)
        self.n_cached, self._keep = len(keep), set(keep)
        if first is not None and own[0] in self._keep:
            self.cache[own[0]] = first
        if self.activations and dist.is_distributed():
            self._share_activation_sizes()

    def _share_activation_sizes(self) -> None:
        """Distributed activation target: learn every chunk's probe-vector length (so each
        rank can advance the shared probe generator past the other ranks' chunks exactly as a
        single process would) and the per-layer activation element counts over all the data.
        Cost: one pass per own chunk not already built (once), one all-reduce of C + L
        integers."""
        for k in self.own:
            self.graph(k)
        C = len(self.batches)
        local = torch.zeros(C + len(self.mods), dtype=torch.int64)
        for k in self.own:
            local[k] = self._numel[k]
        local[C:] = torch.from_numpy(self.act_elems)
        total = dist.all_reduce_sum(local)
        self._numel = {k: int(total[k]) for k in range(C)}
        self.act_elems = total[C:].numpy().astype(np.int64)

    def _build(self, k: int, inspect: bool = False, counter: _SavedBytes | None = None) -> _Graph:
        batch = batch_to(self.batches[k], self.device)
        deltas: list[torch.Tensor] = []
        owner: list[int] = []
        handles = []
        if self.activations:
            for i, (name, m) in enumerate(self.mods):
                handles.append(m.register_forward_pre_hook(self._perturb(i, name, deltas, owner)))
        insp = _Inspector(self.model) if inspect else None
        saving = (torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)
                  if counter is not None else contextlib.nullcontext())
        try:
            with torch.enable_grad(), saving, attention_safe(self.model):  # math SDPA
                loss = self.task.loss(self.task.forward(self.model, batch), batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    what = ("criterion" if self.criterion is not None
                            else f"task {self.task.name!r}")
                    got = (f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                           else type(loss).__name__)
                    raise ConfigError(f"{what} returned {got}: it must return a scalar loss "
                                      "(reduction='mean' or 'sum')")
                if not bool(torch.isfinite(loss)):
                    raise NumericalError(f"loss is {loss.item()} at batch {k}: check that batch "
                                         "for NaN/inf inputs and the model for diverged weights")
                if insp is not None:
                    insp.watch(loss)
                wrt = deltas if self.activations else self.params
                grads = torch.autograd.grad(loss, wrt, create_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            if insp is not None:
                insp.remove()
        self.passes += 1
        if insp is not None:
            self.custom, self.order = insp.custom_ops(), insp.order
            if insp.bad:
                op, where = insp.bad[0]
                self._unsupported(f"custom autograd Function '{op}' (in or just before module "
                                  f"'{where}') returns a gradient that cannot be differentiated "
                                  "again (once_differentiable or a detached backward), so its "
                                  "second-order terms would be silently dropped", where)
        if self.activations and k not in self._counted:
            self._counted.add(k)
            self._numel[k] = sum(d.numel() for d in deltas)
            np.add.at(self.act_elems, owner, [d.numel() for d in deltas])
            if set(owner) != set(range(len(self.mods))):
                lost = [self.names[i] for i in range(len(self.mods)) if i not in set(owner)]
                raise ConfigError(f"layers {lost} were not called in the forward pass; "
                                  "exclude them with layers=[...]")
        return _Graph(grads, list(wrt), owner if self.activations else list(range(len(wrt))))

    @staticmethod
    def _perturb(i: int, name: str, deltas: list, owner: list) -> Callable:
        def hook(_m: nn.Module, inputs: tuple) -> tuple:
            a = inputs[0]
            if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                raise UnsupportedLayerError(f"layer {name!r}: input is not a float tensor, so it "
                                            "has no activation Hessian; exclude it with layers=")
            d = torch.zeros_like(a, requires_grad=True)  # H w.r.t. d at 0 == H w.r.t. a
            deltas.append(d)
            owner.append(i)
            b = a + d  # a tensor given twice (self-attention q, k, v) is perturbed once
            return (b, *(b if t is a else t for t in inputs[1:]))
        return hook

    def _unsupported(self, what: str, where: str | None = None) -> None:
        pos = self.order.get(where, None) if where else None
        safe = [n for n in self.names if pos is not None and self.order.get(n, -1) > pos]
        hint = (f"analyse only the layers after it, layers={safe}, or" if safe else "")
        raise UnsupportedLayerError(f"{what}. Fix: {hint} give the operation a twice-"
                                    "differentiable backward, or exclude the affected layers "
                                    f"with layers=[...] (selected: {self.names})")

    def graph(self, k: int) -> _Graph:
        """Chunk k's gradient graph: cached, or rebuilt (one pass) when it does not fit."""
        if k in self.cache:
            return self.cache[k]
        g = self._build(k)
        if k in self._keep:
            self.cache[k] = g
        return g

    def chunk_hvp(self, g: _Graph, vs: Sequence[torch.Tensor], idx: Sequence[int] | None = None,
                  batched: bool = False) -> list[torch.Tensor]:
        """H_k v for one chunk's graph, one double-backward. ``idx`` restricts v and the result
        to those wrt tensors (v zero elsewhere, only that block of Hv read: H_II v_I)."""
        idx = range(len(g.wrt)) if idx is None else idx
        pairs = [(g.grads[j], v) for j, v in zip(idx, vs)
                 if g.grads[j] is not None and g.grads[j].requires_grad]
        inputs = [g.wrt[j] for j in idx]
        out: Sequence[torch.Tensor | None] = [None] * len(inputs)
        if pairs:
            try:
                out = torch.autograd.grad([p for p, _ in pairs], inputs, [v for _, v in pairs],
                                          retain_graph=True, allow_unused=True,
                                          is_grads_batched=batched)
            except RuntimeError as exc:
                if batched:
                    raise
                ops = ", ".join(f"{o} in '{w}'" for o, w in self.custom) or "none found"
                self._unsupported(f"double backward failed ({exc}); custom autograd Functions "
                                  f"in the graph: {ops}")
        return [torch.zeros_like(v) if h is None else h for h, v in zip(out, vs)]

    def hvp(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """H v of the mean loss w.r.t. the weights, summed over chunks (C double-backwards).
        Distributed: each rank sums its chunks and the vectors are all-reduced (O(params)
        numbers per product: the price of methods that need the whole vector, e.g. Lanczos)."""
        out = [torch.zeros_like(v) for v in vs]
        for k in self.own:
            for o, h in zip(out, self.chunk_hvp(self.graph(k), vs)):
                o.add_(h, alpha=self.scale[k])
        self.hvp_count += 1
        if dist.is_distributed():
            flat = dist.all_reduce_sum(torch.cat([o.reshape(-1) for o in out]))
            out = [f.view_as(o) for f, o in zip(flat.split([o.numel() for o in out]), out)]
        return out

    def block_hvp(self, i: int, v: torch.Tensor) -> torch.Tensor:
        """H_ii v for weight layer i alone (differentiates only g_i, so the double-backward
        runs from layer i to the loss: cheaper for later layers). One block product.
        Distributed: the rank sums are all-reduced (layer i's weight count of numbers)."""
        out = torch.zeros_like(v)
        for k in self.own:
            out.add_(self.chunk_hvp(self.graph(k), [v], [i])[0], alpha=self.scale[k])
        self.hvp_count += 1
        return dist.all_reduce_sum(out)

    def probe(self, gen: torch.Generator, n: int, channel: bool = False,
              vectorized: bool = False, mode: str = "joint",
              active: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """``n`` Hutchinson probes: per layer a float64 (n, C) tensor of sum v*(Hv) over each
        output channel (C = dim 0 of the weight; C = 1 unless ``channel``). Rows summed over C
        are unbiased samples of Tr(H_ii). ``mode="joint"``: one HVP per probe for all layers
        (n HVPs; ``vectorized`` does them in one batched double-backward); ``"layer"``: one
        block product H_ii v_i per layer per probe (n block products per ``active`` layer,
        lower variance); inactive layers get zeros."""
        L = len(self.mods)
        acc: list[torch.Tensor | None] = [None] * L
        vs: list[torch.Tensor] = []

        def draw(wrt: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            sizes = [w.numel() for w in wrt]
            flat = torch.randint(0, 2, (n, sum(sizes)), generator=gen, dtype=torch.int8)
            flat = flat.to(device=self.device, dtype=wrt[0].dtype).mul_(2).sub_(1)
            return [f.view(n, *w.shape) for f, w in zip(flat.split(sizes, 1), wrt)]

        if not self.activations:  # one vector per probe for all chunks (and all ranks)
            vs = draw(self.params)
        mine = set(self.own)
        for k in range(len(self.batches)):
            if k not in mine:  # another rank's chunk: advance the shared stream as it does
                if self.activations:
                    torch.randint(0, 2, (n, self._numel[k]), generator=gen, dtype=torch.int8)
                continue
            g = self.graph(k)
            if self.activations:  # each chunk has its own vectors
                vs = draw(g.wrt)
            groups = ([list(range(len(g.wrt)))] if mode == "joint" else
                      [[j for j, o in enumerate(g.owner) if o == i] for i in range(L)
                       if active is None or active[i]])
            for idx in groups:
                hv = None
                if vectorized and n > 1:
                    try:
                        hv = self.chunk_hvp(g, [vs[j] for j in idx], idx, batched=True)
                    except RuntimeError as exc:
                        warnings.warn(f"batched probes unsupported here ({str(exc)[:120]}); "
                                      "falling back to one probe at a time", stacklevel=2)
                        vectorized = False
                if hv is None:
                    rows = [self.chunk_hvp(g, [vs[j][p] for j in idx], idx) for p in range(n)]
                    hv = [torch.stack(r) for r in zip(*rows)]
                for j, h in zip(idx, hv):
                    v = vs[j]
                    prod = (v * h).reshape(n, v.shape[1] if channel else 1, -1)
                    prod = prod.sum(-1, dtype=torch.float64) * self.scale[k]
                    i = g.owner[j]
                    acc[i] = prod if acc[i] is None else acc[i] + prod
        self.hvp_count += n if mode == "joint" else n * (L if active is None else int(sum(active)))
        if dist.is_distributed():  # the same shapes on every rank, then one sum of scalars
            width = [p.shape[0] if channel and not self.activations and p.dim() else 1
                     for p in self.params]
            if self.activations and channel:
                raise ConfigError("channel sums of activation probes are not supported "
                                  "distributed: run metric='activation' without channel=True")
            full = [torch.zeros(n, w, dtype=torch.float64) if a is None else a.cpu()
                    for a, w in zip(acc, width)]
            flat = dist.all_reduce_sum(torch.cat([a.reshape(-1) for a in full]))
            return [f.view(n, w) for f, w in zip(flat.split([n * w for w in width]), width)]
        return [a.cpu() if a is not None else torch.zeros(n, 1, dtype=torch.float64) for a in acc]


@dataclass
class TraceEstimate:
    """Hutchinson result per layer: mean, standard error, probes used, channel means, and the
    raw samples (one array per layer)."""

    mean: np.ndarray
    stderr: np.ndarray
    probes: np.ndarray
    channels: list[np.ndarray] | None
    samples: list[np.ndarray]


def hutchinson(op: HessianOperator, gen: torch.Generator, tol: float = 1e-2,
               max_probes: int = 200, min_probes: int = 4, channel: bool = False,
               probe_batch: int = 1, vectorized: bool = False, mode: str = "joint",
               progress: bool = False, offset: np.ndarray | None = None,
               offset_var: np.ndarray | None = None) -> TraceEstimate:
    """Per-layer Hutchinson traces (see :meth:`HessianOperator.probe` for the two modes).

    ``mode="joint"``: every probe is one HVP that samples all layers; runs until every layer's
    stderr <= tol * |mean| (after ``min_probes``; never if tol == 0) or ``max_probes``. Cost:
    probes HVPs. ``mode="layer"``: each layer is probed with its own block product and stops on
    its own by the same rule, so converged layers cost nothing more. Cost: sum over layers of
    probes_i block products. The rule is checked every ``probe_batch`` probes.

    Distributed (see :mod:`hawq.base.dist`): every rank draws the same probes from ``gen``, the
    operator sums each probe's per-layer scalars over the ranks' chunks, so every rank sees the
    same samples and takes the same stopping decisions as a single process would.

    ``offset`` / ``offset_var`` (per layer; the Gauss-Newton route): the probes estimate only a
    remainder, and layer i stops when sqrt(stderr_i^2 + offset_var_i) <= tol * |mean_i +
    offset_i|, i.e. on the relative error of the whole trace. The returned mean excludes the
    offset.
    """
    L = len(op.mods)
    rows: list[list[np.ndarray]] = [[] for _ in range(L)]
    ch_sum: list[np.ndarray | None] = [None] * L
    active = np.ones(L, dtype=bool)
    bar = tqdm(total=max_probes, desc="Hutchinson probes",
               disable=not progress or not dist.is_main(), leave=False)
    done = 0
    while done < max_probes and active.any():
        n = min(probe_batch, max_probes - done)
        per = op.probe(gen, n, channel, vectorized, mode, active if mode == "layer" else None)
        for i in np.flatnonzero(active) if mode == "layer" else range(L):
            s = per[i].sum(1).numpy()
            if not np.all(np.isfinite(s)):
                raise NumericalError(
                    f"Hessian-vector product is not finite for layer {op.names[i]!r} at probe "
                    f"{done + int(np.argmin(np.isfinite(s)))}: check for overflowing activations "
                    "or exclude the layer with layers=[...]")
            rows[i].append(s)
            t = per[i].sum(0).numpy()
            ch_sum[i] = t if ch_sum[i] is None else ch_sum[i] + t
        done += n
        bar.update(n)
        if tol > 0 and done >= max(min_probes, 2):
            arr = [np.concatenate(r) for r in rows]
            if offset is None:
                conv = np.array([a.std(ddof=1) / math.sqrt(len(a)) <= tol * abs(a.mean())
                                 for a in arr])
            else:
                ov = np.zeros(L) if offset_var is None else np.asarray(offset_var)
                conv = np.array([math.sqrt(a.var(ddof=1) / len(a) + ov[i])
                                 <= tol * abs(a.mean() + offset[i]) for i, a in enumerate(arr)])
            bar.set_postfix(converged=f"{int(conv.sum())}/{L}")
            if mode == "layer":
                active &= ~conv
            elif conv.all():
                break
    bar.close()
    arr = [np.concatenate(r) for r in rows]
    counts = np.array([len(a) for a in arr])
    se = np.array([a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else np.nan for a in arr])
    chans = [c / k for c, k in zip(ch_sum, counts)] if channel else None
    mean = np.array([c.sum() for c in chans]) if chans is not None else np.array(
        [a.mean() for a in arr])
    return TraceEstimate(mean, se, counts, chans, arr)


def power_iteration(op: HessianOperator, i: int, gen: torch.Generator, k: int = 1,
                    tol: float = 1e-3, max_iter: int = 100) -> list[float]:
    """Top-k largest-magnitude eigenvalues of the diagonal block H_ii (power iteration, each
    later one on the block with earlier eigenvectors projected out). Stops an eigenvalue when
    its Rayleigh quotient changes by <= tol relative. Cost: <= k * max_iter block HVPs."""
    p = op.params[i]
    vecs: list[torch.Tensor] = []
    vals: list[float] = []

    def project(t: torch.Tensor) -> torch.Tensor:
        for u in vecs:
            t = t - (t * u).sum() * u
        return t

    for _ in range(k):
        v = project(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
        v = v / v.norm()
        lam: float | None = None
        for _ in range(max_iter):
            hv = project(op.block_hvp(i, v))
            new = float((hv.double() * v.double()).sum())
            if not math.isfinite(new):
                raise NumericalError(f"power iteration for layer {op.names[i]!r} produced {new}")
            norm = hv.norm()
            if norm == 0:
                lam = 0.0
                break
            v = hv / norm
            converged = lam is not None and abs(new - lam) <= tol * abs(new)
            lam = new
            if converged:
                break
        vecs.append(v.detach())
        vals.append(float(lam))
    return vals


@contextlib.contextmanager
def grad_setup(model: nn.Module, need: list[torch.Tensor], freeze_rest: bool) -> Iterator[None]:
    """Eval mode and requires_grad on ``need`` (others off if ``freeze_rest``); restored after."""
    was_training = model.training
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        if freeze_rest:
            for p, _ in saved:
                p.requires_grad_(False)
        for p in need:
            p.requires_grad_(True)
        yield
    finally:
        for p, rg in saved:
            p.requires_grad_(rg)
        model.train(was_training)


def check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}={value!r}: give an integer >= {lo}")
    return value


PROBE_MODES = ("joint", "layer", "gn", "auto")


def check_probe_mode(probe_mode: str) -> None:
    """Raise :class:`ConfigError` unless ``probe_mode`` is one of :data:`PROBE_MODES`."""
    if probe_mode not in PROBE_MODES:
        raise ConfigError(f"probe_mode={probe_mode!r}: use 'auto' (the cheapest route: 'gn' "
                          "where it applies, else 'joint'), 'joint' (one HVP per probe for all "
                          "layers), 'layer' (one block product per layer per probe) or 'gn' "
                          "(exact Gauss-Newton trace plus Hutchinson on the remainder)")


def trace_route(probe_mode: str, metric: str, task: Task, criterion: Callable | None) -> str:
    """The Hutchinson mode :func:`analyze` uses: ``probe_mode`` itself, or for ``"auto"``
    ``"gn"`` when ``metric == "trace"`` and the task's loss is the built-in cross-entropy
    (:func:`hawq.analysis.gauss_newton.supports_gn`), else ``"joint"``. Raises
    :class:`ConfigError` for ``"gn"`` where it does not apply."""
    from hawq.analysis.gauss_newton import supports_gn

    check_probe_mode(probe_mode)
    ok = metric == "trace" and criterion is None and supports_gn(task)
    if probe_mode == "auto":
        return "gn" if ok else "joint"
    if probe_mode == "gn" and not ok:
        why = (f"metric={metric!r} (it gives whole-layer weight traces only: use "
               "metric='trace')" if metric != "trace" else
               f"task {task.name!r} with its own loss (it needs the built-in cross-entropy of "
               "the 'classification' task, no criterion/loss_fn)")
        raise ConfigError(f"probe_mode='gn' does not apply to {why}; use probe_mode='layer' "
                          "or 'joint' (or 'auto', which picks)")
    return probe_mode


def _check_ranks_agree(params: Sequence[torch.Tensor], batches: Sequence[Batch],
                       seed: int) -> None:
    """Distributed runs: :class:`ConfigError` on every rank unless all ranks hold the same
    seed, chunk sizes and layer weights (each layer's weight sum). Warns on rank 0 when some
    ranks get no chunk. Cost: one read of the weights, three small all-reduces."""
    sizes = [float(batch_len(b)) for b in batches]
    sums = [float(p.detach().double().sum()) for p in params]
    dist.check_same([float(seed), float(len(batches)), *sizes[:4096], *sums],
                    "the seed, the data's chunk sizes or the layer weights")
    if len(batches) < dist.world() and dist.is_main():
        warnings.warn(f"{len(batches)} data chunk(s) for {dist.world()} ranks: ranks "
                      f"{list(range(len(batches), dist.world()))} have no data and only wait; "
                      "give batch_size <= samples / ranks", stacklevel=3)


def analyze(model: nn.Module, data: Any, criterion: Callable | None = None,
            metric: str = "trace", layers: Sequence[str] | None = None, seed: int = 0,
            tol: float | None = None, max_probes: int = 200, min_probes: int = 4,
            top_k: int = 1, max_iter: int = 100, batch_size: int | None = None,
            probe_batch: int = 1, vectorized: bool = False, probe_mode: str = "auto",
            max_graph_bytes: float | None = None, progress: bool = False,
            task: Task | str | Callable | None = None) -> HessianResult:
    """Per-layer second-order sensitivity of ``model`` on ``data``; returns a HessianResult.

    ``data``: anything :func:`hawq.feed.tasks.materialize` reads (tensors, (inputs, targets) pairs, a
    TensorDataset, dicts of tensors, a Dataset, a DataLoader); ``batch_size`` splits in-memory
    data into chunks (default: one chunk) and keeps a DataLoader's batches. ``task`` (a
    :class:`hawq.feed.tasks.Task`, a registered name or a loss callable; default
    ``"classification"``) says how a batch is fed and gives its mean loss, whose Hessian is
    measured; an unbound ``embedding`` task is bound to ``model`` (its Hessian at the float
    weights is the Gauss-Newton matrix 2 J^T J / N of the output). ``criterion`` (output,
    target) -> loss, reduction 'mean' or 'sum', is the older way to give a classifier's loss;
    giving both raises :class:`ConfigError`. Data the task cannot use raises :class:`DataError`
    naming the task (checked on two samples first). The model runs in eval mode (restored
    after). ``layers``: module names (default every Conv/Linear weight). Same ``seed`` gives
    identical results (a private torch.Generator; the global RNG is untouched).
    Metrics and costs (P probes, C chunks; "pass" = forward + graph-building backward of a chunk):

    * ``"trace"``: Hutchinson Tr(H_ii) of the mean loss per layer, with stderr and avg_trace =
      trace / params. One HVP (C double-backwards) per probe for all layers; C passes when the
      graphs fit in ``max_graph_bytes``. Stops when every layer's stderr/|trace| <= ``tol``
      (default 1e-2) after ``min_probes``, or at ``max_probes``; tol=0 runs all max_probes.
      Negative estimates are reported as they are.
    * ``"channel"``: the same plus channel_traces per output channel (dim 0), whose sum is the
      layer trace; no extra HVPs.
    * ``"eigen"``: top-``top_k`` eigenvalues (largest magnitude) of each H_ii by power iteration
      (``tol`` default 1e-3 relative, ``max_iter``); one block HVP per layer per iteration.
    * ``"activation"``: Hutchinson trace of the Hessian of the *summed* per-sample loss w.r.t.
      each layer's input (block-diagonal over samples, so it is the sum over data points; with a
      task, a chunk's summed loss is its mean loss times its number of samples); params =
      activation elements; same probe rule and cost as ``"trace"``.
    * ``"fisher"``: exact empirical-Fisher trace mean_s ||grad_W_i loss_s||^2 from per-sample
      gradients (:mod:`hawq.analysis.fisher`): no probes or HVPs, one vmapped pass over the data. Not
      for the ``embedding`` task (its per-sample gradients at the float weights are zero;
      :class:`ConfigError` says to use ``"trace"``).

    ``probe_mode`` (trace/channel/activation). ``"auto"`` (default) takes the cheapest route to
    a per-layer relative error ``tol``, by this rule: ``"gn"`` when ``metric="trace"`` and the
    loss is the built-in classification cross-entropy (no ``criterion``/``loss_fn``), else
    ``"joint"`` (see :func:`trace_route`). ``"gn"`` (:mod:`hawq.analysis.gauss_newton`) splits
    H_ii = GN_ii + R_ii: the Gauss-Newton trace exactly from per-sample gradients (one forward
    and C backwards per sample for C <= 64 classes and one prediction per sample; else sampled
    labels from the model's softmax, rounds until its stderr <= 0.7 tol |trace|), plus
    per-layer block Hutchinson on the remainder R_ii only, each layer stopping when its whole
    trace's relative stderr (GN and remainder errors combined) <= ``tol`` after ``min_probes``
    remainder probes (one block product each). On ReLU/BN/residual networks R_ii = 0 exactly
    (the output is piecewise linear in one layer's weights), so the trace is exact and costs
    the GN pass plus ``min_probes`` rounds of block products; on ResNet-20 it reaches 5% (and
    2%) on every layer >= 5x faster than PyHessian per layer (benchmarks/hessian_speed.py,
    hessian_speed_precision.json). Layers report ``route`` and ``gn_trace``. ``"joint"`` probes
    all layers with one HVP; layer i's sample v_i.(Hv)_i then has variance 2 sum_{a!=b} (H_ii)_ab^2 (Hutchinson's
    own) plus sum_{j!=i} ||H_ij||_F^2 from the other layers' probe entries. ``"layer"`` probes
    each block alone (one block product H_ii v_i per layer per probe on the shared graph, a
    double-backward from layer i to the loss only, so late layers are cheap) and stops each
    layer on its own: the variance of per-layer probing (PyHessian per layer). Measured on
    ResNet-20 (benchmarks/hessian_speed.py): a joint probe costs about the floor and 1/5 of a
    round of block products, but its per-layer variance is a median ~12x (classifier ~150x)
    larger, so for a target relative error per layer ``"layer"`` is the cheaper mode there.

    ``probe_batch`` probes are drawn per round (the stopping rule is checked per round; with
    rebuilt chunks a round costs one pass per chunk); ``vectorized=True`` computes a round in
    one batched double-backward (``is_grads_batched``) — measured slower on CPU, so off by
    default; it falls back to one probe at a time where an op has no batching rule.

    Distributed (under ``torchrun``, a process group initialised, see :mod:`hawq.base.dist`):
    every rank passes the same model, data and seed; rank r takes chunks r, r+N, ... (so give
    ``batch_size`` for at least N chunks), all ranks draw the same probes, and only per-layer
    scalars are all-reduced per probe (traces, channel sums, activation traces); power
    iteration all-reduces the block product H_ii v (layer i's weight count per iteration);
    Fisher sums are all-reduced once. Every rank returns the same result as one process on the
    same data and seed, to floating-point summation order; a rank that fails stops the others
    with :class:`hawq.base.dist.RankFailedError` naming it. ``passes`` counts all ranks' builds.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r}: use one of {METRICS}")
    for name, value, lo in (("max_probes", max_probes, 1), ("min_probes", min_probes, 1),
                            ("top_k", top_k, 1), ("max_iter", max_iter, 1),
                            ("probe_batch", probe_batch, 1), ("seed", seed, 0)):
        check_int(name, value, lo)
    check_probe_mode(probe_mode)
    if tol is not None and not (isinstance(tol, (int, float)) and tol >= 0):
        raise ConfigError(f"tol={tol!r}: give a number >= 0 (0 disables early stopping)")
    tol = (1e-3 if metric == "eigen" else 1e-2) if tol is None else float(tol)
    task, _ = resolve_task(task, criterion, model)
    mode = trace_route(probe_mode, metric, task, criterion) if metric != "fisher" else "joint"
    if metric == "fisher":
        from hawq.analysis.fisher import check_fisher_task

        check_fisher_task(task)
    with dist.guard():  # a rank that fails stops the others (hawq.base.dist)
        mods = select_layers(model, layers)
        names = [n for n, _ in mods]
        params = [layer_weight(m) for _, m in mods]
        batches = data_chunks(data, batch_size, task)
        task.check(model, iter(batches))
        if dist.is_distributed():
            _check_ranks_agree(params, batches, seed)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        result = HessianResult(metric=metric)
        if metric == "fisher":
            from hawq.analysis.fisher import fisher_traces

            with grad_setup(model, params, False), attention_safe(model):
                tr = fisher_traces(model, mods, batches, task=task)
            result.layers = [LayerHessian(n, p.numel(), float(t), float(t) / p.numel())
                             for n, p, t in zip(names, params, tr)]
            result.samples, result.passes = sum(batch_len(b) for b in batches), 1
            result.seconds = time.perf_counter() - t0
            return result
        if metric == "trace" and mode == "gn":
            return _analyze_gn(model, mods, batches, task, gen, tol, max_probes, min_probes,
                               probe_batch, vectorized, max_graph_bytes, progress, result, t0)
        target = "activations" if metric == "activation" else "weights"
        act = target == "activations"
        with grad_setup(model, [] if act else params, act):
            op = HessianOperator(model, mods, batches, criterion, target, max_graph_bytes,
                                 task=None if criterion is not None else task)
            if metric == "eigen":
                vals = []
                for i in tqdm(range(len(mods)), desc="power iteration",
                              disable=not progress or not dist.is_main(), leave=False):
                    if top_k > params[i].numel():
                        raise ConfigError(f"top_k={top_k} exceeds the {params[i].numel()} "
                                          f"weights of layer {names[i]!r}")
                    v = power_iteration(op, i, gen, top_k, tol, max_iter)
                    vals.append(v[0] if top_k == 1 else v)
                result.layers = [LayerHessian(n, p.numel(), eigenvalue=v)
                                 for n, p, v in zip(names, params, vals)]
            else:
                est = hutchinson(op, gen, tol, max_probes, min(min_probes, max_probes),
                                 metric == "channel", probe_batch, vectorized, mode,
                                 progress)
                sizes = (op.act_elems.tolist() if target == "activations"
                         else [p.numel() for p in params])
                chans = est.channels
                result.layers = [
                    LayerHessian(n, int(sz), float(t), float(t) / max(int(sz), 1),
                                 None if math.isnan(s) else float(s),
                                 channel_traces=None if chans is None else chans[i].tolist(),
                                 probes=int(est.probes[i]), route=mode)
                    for i, (n, sz, t, s) in enumerate(zip(names, sizes, est.mean, est.stderr))]
        passes = op.passes
        if dist.is_distributed():  # graph builds of all ranks
            passes = int(dist.all_reduce_sum(torch.tensor([passes], dtype=torch.int64))[0])
        result.hvp_count, result.samples, result.passes = op.hvp_count, op.samples, passes
        result.seconds = time.perf_counter() - t0
        return result


def _analyze_gn(model: nn.Module, mods: list[tuple[str, nn.Module]], batches: list[Batch],
                task: Task, gen: torch.Generator, tol: float, max_probes: int, min_probes: int,
                probe_batch: int, vectorized: bool, max_graph_bytes: float | None,
                progress: bool, result: HessianResult, t0: float) -> HessianResult:
    """``analyze(metric="trace", probe_mode="gn")``: Gauss-Newton trace per layer plus a
    per-layer Hutchinson estimate of the remainder (see :mod:`hawq.analysis.gauss_newton`)."""
    from hawq.analysis.gauss_newton import gn_traces, remainder_task

    names = [n for n, _ in mods]
    params = [layer_weight(m) for _, m in mods]
    with grad_setup(model, params, False), attention_safe(model):
        gn = gn_traces(model, mods, batches, task, gen, tol,
                       max_rounds=max(1, max_probes // 2))
    with grad_setup(model, params, False):
        op = HessianOperator(model, mods, batches, None, "weights", max_graph_bytes,
                             task=remainder_task(task))
        est = hutchinson(op, gen, tol, max_probes, min(min_probes, max_probes), False,
                         probe_batch, vectorized, "layer", progress, offset=gn.trace,
                         offset_var=gn.stderr ** 2)
    route = "gn-exact" if gn.exact else "gn-sampled"
    layers = []
    for i, (n, p) in enumerate(zip(names, params)):
        se = est.stderr[i]
        tr = float(gn.trace[i] + est.mean[i])
        total_se = math.sqrt(float(gn.stderr[i]) ** 2 + (0.0 if math.isnan(se) else se ** 2))
        layers.append(LayerHessian(n, p.numel(), tr, tr / p.numel(),
                                   None if math.isnan(se) else total_se,
                                   probes=int(est.probes[i]), route=route,
                                   gn_trace=float(gn.trace[i])))
    result.layers = layers
    passes = op.passes + gn.passes
    if dist.is_distributed():  # graph builds of all ranks
        passes = int(dist.all_reduce_sum(torch.tensor([passes], dtype=torch.int64))[0])
    result.hvp_count, result.samples, result.passes = op.hvp_count, op.samples, passes
    result.seconds = time.perf_counter() - t0
    return result
