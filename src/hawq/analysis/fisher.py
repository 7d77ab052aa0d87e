"""Exact, probe-free empirical-Fisher trace per layer from per-sample gradients.

Tr(F_ii) = (1/N) sum_s ||grad_{W_i} loss_s||^2, with loss_s the task's loss on sample s alone
(for a classifier: under its true label, the *empirical* Fisher; the true Fisher/Gauss-Newton
matrix would sample labels from the model instead). It has the scale of the Hessian of the mean
loss and is positive semi-definite, so its trace is a cheap, noise-free stand-in for the Hessian
trace (the two agree only near a minimum and only in expectation; measure their rank agreement
before substituting one for the other; ``benchmarks/hessian_speed.py`` does so on ResNet-20).

Any :class:`hawq.feed.tasks.Task` works: loss_s is ``task.loss(task.forward(model, b_s), b_s)`` on the
batch b_s of sample s alone (:func:`hawq.feed.tasks.split_batch` with size 1). The ``embedding`` task
is refused: its loss is the distortion against the float model, whose per-sample gradient at the
float weights is zero, so its empirical Fisher is zero there (use ``metric="trace"``: the
Hessian there is the Gauss-Newton matrix of the output).

Cost: one forward + backward over the data, vectorised over samples with
``torch.func.vmap(grad(...))`` on ``functional_call`` when a batch is a tensor, or a tuple/list/
dict of tensors (tensors whose leading size is not the batch's, e.g. a shared mask, are passed
whole); BatchNorm in eval mode works (buffers are read, not updated). Memory: the per-sample
gradients of one chunk, chunk * n_params floats (chunks are sized to about 256 MiB). Other batch
structures, and ops without a vmap rule (e.g. a custom autograd Function without
``setup_context``/``vmap``), use a per-sample loop (the latter with a warning): same result,
slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from hawq.base import dist
from hawq.modules.attention import attention_safe
from hawq.base.errors import ConfigError, DataError, NumericalError
from hawq.modules.qmodules import layer_weight
from hawq.feed.tasks import Task, batch_len, batch_to, resolve_task, split_batch

__all__ = ["CHUNK_BYTES", "WithParams", "check_fisher_task", "fisher_traces", "one_sample",
           "vmap_dims"]

CHUNK_BYTES = 256 * 2**20


def check_fisher_task(task: Task) -> None:
    """Raise :class:`ConfigError` for tasks whose empirical Fisher is zero by construction (the
    built-in ``embedding`` task: the per-sample distortion against the float model has zero
    gradient at the float weights)."""
    if task.name == "embedding" and task.loss_fn is None:
        raise ConfigError("metric='fisher' with task 'embedding': the per-sample loss is the "
                          "distortion against the float model, whose gradient at the float "
                          "weights is zero, so the empirical Fisher is zero; use metric='trace' "
                          "(the Hessian there is the Gauss-Newton matrix 2 J^T J / N)")


class _WithParams:
    """Stands in for ``model`` called with ``params`` (``functional_call``); other attributes
    are the model's, so a task's ``forward_fn`` can read e.g. ``model.config``."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]):
        self._model, self._params = model, params

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from torch.func import functional_call

        return functional_call(self._model, self._params, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _vmap_dims(batch: Any) -> Any:
    """vmap ``in_dims`` for ``batch`` (0 for tensors carrying the batch dimension, None for the
    others), or None when the batch is not a tensor or a flat tuple/list/dict of tensors."""
    n = batch_len(batch)

    def dim(t: torch.Tensor) -> int | None:
        return 0 if t.dim() > 0 and t.shape[0] == n else None

    if torch.is_tensor(batch):
        return 0
    if type(batch) is dict and batch and all(torch.is_tensor(v) for v in batch.values()):
        return {k: dim(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and type(batch) in (tuple, list) and batch \
            and all(torch.is_tensor(v) for v in batch):
        return type(batch)(dim(v) for v in batch)
    return None


def _unsqueeze(sample: Any, dims: Any) -> Any:
    """A batch of one sample from vmap's per-sample view (``dims`` as from :func:`_vmap_dims`)."""
    if torch.is_tensor(sample):
        return sample.unsqueeze(0) if dims == 0 else sample
    if isinstance(sample, Mapping):
        return {k: _unsqueeze(v, dims[k]) for k, v in sample.items()}
    return type(sample)(_unsqueeze(v, d) for v, d in zip(sample, dims))


#: public names of the per-sample helpers (used by :mod:`hawq.analysis.gauss_newton`)
WithParams, vmap_dims, one_sample = _WithParams, _vmap_dims, _unsqueeze


def _scalar(loss: Any, task: Task) -> torch.Tensor:
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ConfigError(f"task {task.name!r}: the loss must be a scalar tensor, got "
                          f"{getattr(loss, 'shape', type(loss).__name__)}")
    return loss


def fisher_traces(model: nn.Module, mods: Sequence[tuple[str, nn.Module]],
                  batches: Sequence[Any], criterion: Callable | None = None,
                  chunk: int | None = None, task: Task | str | Callable | None = None
                  ) -> np.ndarray:
    """Per-layer Tr(F_ii) = mean over samples of ||grad_{W_i} loss_s||^2 (float64, one entry per
    module in ``mods``). ``batches``: a list of batches in any structure the task reads;
    ``task`` (default ``classification``) or ``criterion`` (output, targets) -> loss gives the
    per-sample loss (both: :class:`ConfigError`). ``model`` should be in eval mode. Cost: one
    vmapped forward+backward per chunk of ``chunk`` samples (default: about 256 MiB of
    per-sample gradients), or one per sample where vmap does not apply; no HVPs. Raises
    :class:`NumericalError` naming the sample and batch on a NaN/inf loss.

    Distributed (:mod:`hawq.base.dist`): rank r takes batches r, r+N, ...; the per-layer sums
    are all-reduced once (L numbers), so every rank returns the
    single-process result (to summation order)."""
    with dist.guard():
        return _fisher_traces(model, mods, batches, criterion, chunk, task)


def _fisher_traces(model: nn.Module, mods: Sequence[tuple[str, nn.Module]],
                   batches: Sequence[Any], criterion: Callable | None, chunk: int | None,
                   task: Task | str | Callable | None) -> np.ndarray:
    from torch.func import grad_and_value, vmap

    task, _ = resolve_task(task, criterion, model)
    check_fisher_task(task)
    pname = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    weights = [layer_weight(m) for _, m in mods]
    keys = [pname[id(w)] for w in weights]
    sel = {k: w.detach() for k, w in zip(keys, weights)}
    rest = {k: p.detach() for k, p in model.named_parameters() if k not in sel}
    n_params = sum(t.numel() for t in sel.values())
    chunk = chunk or max(1, CHUNK_BYTES // (4 * n_params))
    device = next(iter(sel.values())).device

    def loss_one(p: dict, sample: Any, dims: Any) -> torch.Tensor:
        b1 = _unsqueeze(sample, dims)
        return _scalar(task.loss(task.forward(_WithParams(model, {**rest, **p}), b1), b1), task)

    def sq_norms(p: dict, sample: Any, dims: Any) -> tuple[torch.Tensor, torch.Tensor]:
        g, loss = grad_and_value(loss_one)(p, sample, dims)
        return torch.stack([g[k].pow(2).sum() for k in keys]), loss

    use_vmap = True
    total = torch.zeros(len(keys), dtype=torch.float64)
    n = 0
    batches = list(batches)
    starts = np.cumsum([0] + [batch_len(b) for b in batches])  # first sample of each batch
    with attention_safe(model):  # no fused attention fast path; twice-differentiable SDPA
        for bi in dist.shard(range(len(batches))):
            n = int(starts[bi])  # sample numbering as in one process
            for piece in split_batch(batches[bi], chunk):
                piece = batch_to(piece, device)
                dims = _vmap_dims(piece)
                sq = losses = None
                if use_vmap and dims is not None:
                    try:
                        sq, losses = vmap(lambda p, s: sq_norms(p, s, dims),
                                          in_dims=(None, dims))(sel, piece)
                    except (RuntimeError, DataError) as exc:
                        warnings.warn(f"per-sample gradients by vmap failed ({str(exc)[:160]}); "
                                      "using a per-sample loop (slower, same result)", stacklevel=2)
                        use_vmap = False
                if sq is None:
                    sq, losses = _loop(model, weights, task, piece)
                bad = (~torch.isfinite(losses)).nonzero()
                if len(bad):
                    raise NumericalError(f"loss is {losses[bad[0, 0]].item()} for sample "
                                         f"{n + int(bad[0, 0])} at batch {bi}: check the inputs "
                                         "for NaN/inf")
                total += sq.detach().double().sum(0).cpu()
                n += batch_len(piece)
    total = dist.all_reduce_sum(total)  # no-op in a single process
    return (total / int(starts[-1])).numpy()


def _loop(model: nn.Module, weights: list[torch.Tensor], task: Task, batch: Any
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared gradient norms and losses of ``batch``, one sample at a time."""
    sq, losses = [], []
    with torch.enable_grad():
        for b1 in split_batch(batch, 1):
            loss = _scalar(task.loss(task.forward(model, b1), b1), task)
            gs = torch.autograd.grad(loss, weights, allow_unused=True)
            sq.append(torch.stack([torch.zeros((), device=loss.device) if g is None
                                   else g.pow(2).sum() for g in gs]))
            losses.append(loss.detach())
    return torch.stack(sq), torch.stack(losses)
