"""Exact, probe-free empirical-Fisher trace per layer from per-sample gradients.

Tr(F_ii) = (1/N) sum_s ||grad_{W_i} loss_s||^2, with loss_s the loss of sample s under its true
label (the *empirical* Fisher; the true Fisher/Gauss-Newton matrix would sample labels from the
model instead). It has the scale of the Hessian of the mean loss and is positive semi-definite,
so its trace is a cheap, noise-free stand-in for the Hessian trace (the two agree only near a
minimum and only in expectation; measure their rank agreement before substituting one for the
other; ``benchmarks/hessian_speed.py`` does so on ResNet-20).

Cost: one forward + backward over the data, vectorised over samples with
``torch.func.vmap(grad(...))`` on ``functional_call`` (BatchNorm in eval mode works: buffers
are read, not updated). Memory: the per-sample gradients of one chunk, chunk * n_params floats
(chunks are sized to about 256 MiB). Where an op has no vmap rule (e.g. a custom autograd
Function without ``setup_context``/``vmap``), it falls back to a per-sample loop with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from hawq.errors import NumericalError

CHUNK_BYTES = 256 * 2**20


def _per_sample_loss(criterion: Callable, out: torch.Tensor, y: Any) -> torch.Tensor:
    loss = criterion(out, y)
    return loss.sum() if loss.dim() else loss


def fisher_traces(model: nn.Module, mods: Sequence[tuple[str, nn.Module]],
                  batches: Sequence[tuple[torch.Tensor, Any]], criterion: Callable,
                  chunk: int | None = None) -> np.ndarray:
    """Per-layer Tr(F_ii) = mean over samples of ||grad_{W_i} loss_s||^2 (float64, one entry per
    module in ``mods``). ``model`` should be in eval mode. Cost: one vmapped forward+backward per
    chunk of ``chunk`` samples (default: about 256 MiB of per-sample gradients); no HVPs."""
    from torch.func import functional_call, grad_and_value, vmap

    pname = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    keys = [pname[id(m.weight)] for _, m in mods]
    sel = {k: m.weight.detach() for k, (_, m) in zip(keys, mods)}
    rest = {k: p.detach() for k, p in model.named_parameters() if k not in sel}
    n_params = sum(t.numel() for t in sel.values())
    chunk = chunk or max(1, CHUNK_BYTES // (4 * n_params))
    device = next(iter(sel.values())).device

    def loss_one(p: dict, x: torch.Tensor, y: Any) -> torch.Tensor:
        out = functional_call(model, {**rest, **p}, (x.unsqueeze(0),))
        return _per_sample_loss(criterion, out, y.unsqueeze(0))

    def sq_norms(p: dict, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        g, loss = grad_and_value(loss_one)(p, x, y)
        return torch.stack([g[k].pow(2).sum() for k in keys]), loss

    batched = vmap(sq_norms, in_dims=(None, 0, 0))
    use_vmap = True
    total = torch.zeros(len(keys), dtype=torch.float64)
    n = 0
    for bi, (x, y) in enumerate(batches):
        for xs, ys in zip(x.split(chunk), y.split(chunk)):
            xs, ys = xs.to(device), ys.to(device)
            sq = losses = None
            if use_vmap:
                try:
                    sq, losses = batched(sel, xs, ys)
                except RuntimeError as exc:
                    warnings.warn(f"per-sample gradients by vmap failed ({str(exc)[:160]}); "
                                  "using a per-sample loop (slower, same result)", stacklevel=2)
                    use_vmap = False
            if not use_vmap:
                sq, losses = _loop(model, [m.weight for _, m in mods], criterion, xs, ys)
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                raise NumericalError(f"loss is {losses[bad[0, 0]].item()} for sample "
                                     f"{n + int(bad[0, 0])} at batch {bi}: check the inputs "
                                     "for NaN/inf")
            total += sq.detach().double().sum(0).cpu()
            n += len(xs)
    return (total / n).numpy()


def _loop(model: nn.Module, weights: list[torch.Tensor], criterion: Callable, xs: torch.Tensor,
          ys: Any) -> tuple[torch.Tensor, torch.Tensor]:
    sq, losses = [], []
    with torch.enable_grad():
        for i in range(len(xs)):
            loss = _per_sample_loss(criterion, model(xs[i:i + 1]), ys[i:i + 1])
            gs = torch.autograd.grad(loss, weights, allow_unused=True)
            sq.append(torch.stack([torch.zeros((), device=loss.device) if g is None
                                   else g.pow(2).sum() for g in gs]))
            losses.append(loss.detach())
    return torch.stack(sq), torch.stack(losses)
