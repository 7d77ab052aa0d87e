"""Per-layer Hessian traces through the Gauss-Newton split: an exact (or low-variance sampled)
Gauss-Newton trace plus a Hutchinson estimate of the remainder only.

For a loss l(z) of the model's output z, the diagonal block of layer i splits as
H_ii = GN_ii + R_ii with GN_ii = J_i^T (d^2 l / dz^2) J_i (J_i = dz / dW_i) and
R_ii = sum_c (dl/dz_c) d^2 z_c / dW_i^2. The output is piecewise linear in any *single* layer's
weights in networks built from conv/linear, ReLU, eval-mode BatchNorm, residual additions and
average pooling (the CIFAR ResNets), so there R_ii = 0 and Tr(H_ii) = Tr(GN_ii) exactly; with
GELU, softmax attention or LayerNorm R_ii is not zero but usually small.

Gauss-Newton part. For cross-entropy, d^2 l / dz^2 = diag(p) - p p^T = sum_c a_c a_c^T with
a_c = sqrt(p_c) (e_c - p), so Tr(GN_ii) = mean over samples of sum_c ||grad_{W_i} (a_c . z_s)||^2:
per-sample gradients (``torch.func.vmap`` of a ``vjp``, one forward and C backwards per sample,
all layers at once, no probes): :func:`gn_traces` (``exact``). With more than ``exact_max``
classes, or several predictions per sample (token classification), the rows are sampled instead:
labels drawn from the model's own softmax, a = e_yhat - p per position ("true Fisher", equal to
GN for cross-entropy in expectation), ``draws`` per sample per round; its Monte-Carlo standard
error comes from the spread of the draws within each sample.

Remainder. R_ii is the Hessian of the scalar g . z(W) with g = dl/dz held fixed (detached), so
:func:`remainder_task` gives a task whose "loss" is that scalar and the ordinary per-layer block
Hutchinson (:meth:`hawq.analysis.hessian.HessianOperator.probe` with ``mode="layer"``) estimates
Tr(R_ii) alone. On a piecewise-linear network its samples are exactly 0 and stop at the
minimum probe count.

Supported tasks (:func:`supports_gn`): the built-in ``classification`` task with its own
cross-entropy (no ``loss_fn`` and no ``criterion``); logits (N, C) or (N, ..., C), targets -100
ignored. Other tasks use plain Hutchinson (:func:`hawq.analysis.hessian.analyze` picks).

Distributed (:mod:`hawq.base.dist`): rank r takes chunks r, r+N, ...; sampled labels come from a
generator seeded per chunk and round (so they do not depend on the rank), and the per-layer sums
are all-reduced once per round (a few times L numbers).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from hawq.analysis.fisher import CHUNK_BYTES, WithParams, one_sample, vmap_dims
from hawq.base import dist
from hawq.base.errors import DataError, NumericalError
from hawq.feed.tasks import (ClassificationTask, Task, batch_len, batch_to, logits_of,
                             split_batch)
from hawq.modules.attention import attention_safe
from hawq.modules.qmodules import layer_weight

__all__ = ["GN_EXACT_MAX", "GNEstimate", "ce_parts", "gn_traces", "remainder_task",
           "supports_gn"]

#: classes up to which the Gauss-Newton trace is computed exactly (one backward per class)
GN_EXACT_MAX = 64
IGNORE_INDEX = -100


def supports_gn(task: Task) -> bool:
    """True when ``task``'s loss is the built-in cross-entropy on logits (the ``classification``
    task without a ``loss_fn``): its output Hessian is known in closed form."""
    return isinstance(task, ClassificationTask) and task.loss_fn is None


def ce_parts(logits: torch.Tensor, targets: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor, int]:
    """Softmax ``p`` (M', C), validity mask (M',), safe targets (M',) and the number of valid
    targets M of ``F.cross_entropy(logits.reshape(-1, C), targets.reshape(-1))`` (mean over the
    targets that are not -100). Raises :class:`DataError` without targets."""
    if not torch.is_tensor(targets):
        raise DataError("the Gauss-Newton trace needs integer labels with the batch "
                        "((inputs, labels) pairs or dicts with 'labels')")
    C = logits.shape[-1]
    z = logits.detach().reshape(-1, C).float()
    y = targets.reshape(-1).long()
    valid = y != IGNORE_INDEX
    return F.softmax(z, -1), valid, torch.where(valid, y, torch.zeros_like(y)), int(valid.sum())


def remainder_task(task: Task) -> Task:
    """A copy of ``task`` whose loss is g . z with z the logits and g = d(loss)/dz evaluated
    and detached: its Hessian w.r.t. the weights is the remainder R = H - GN of ``task``'s loss
    (its value and gradient equal the loss's gradient terms, not the loss)."""

    def linearised(output: Any, batch: Any) -> torch.Tensor:
        z = logits_of(output).float()
        p, valid, y, m = ce_parts(z, task.targets(batch))
        g = (p - F.one_hot(y, z.shape[-1]).to(p)) * valid[:, None].to(p) / max(m, 1)
        return (g * z.reshape(-1, z.shape[-1])).sum()

    return dataclasses.replace(task, loss_fn=linearised)


@dataclass
class GNEstimate:
    """Per-layer Gauss-Newton traces (float64), their Monte-Carlo standard errors (zeros when
    ``exact``), label draws per sample (0 when exact) and forward passes over chunks."""

    trace: np.ndarray
    stderr: np.ndarray
    exact: bool
    draws: int
    passes: int


def _rows(z: torch.Tensor, valid: torch.Tensor, p: torch.Tensor, scale: float, exact: bool,
          draws: int, gen: torch.Generator | None) -> torch.Tensor:
    """Factor rows of the output Hessian per sample: (n, K, *z_s.shape) with
    sum_k a_k a_k^T = scale * (diag(p) - p p^T) per valid position (exact) or, per draw,
    a = sqrt(scale) (e_yhat - p) with yhat ~ p (sampled; unscaled by the number of draws)."""
    n, C = z.shape[0], z.shape[-1]
    pv = p * valid[:, None].to(p)
    if exact:  # z is (n, C)
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        a = pv.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
        return a * math.sqrt(scale)
    yhat = torch.multinomial(p.cpu().double(), draws, replacement=True, generator=gen)
    onehot = F.one_hot(yhat.to(p.device).T, C).to(p)  # (draws, positions, C)
    a = (onehot - p[None]) * valid[None, :, None].to(p) * math.sqrt(scale)
    return a.reshape(draws, n, *z.shape[1:]).transpose(0, 1)


def gn_traces(model: nn.Module, mods: Sequence[tuple[str, nn.Module]], batches: Sequence[Any],
              task: Task, gen: torch.Generator, tol: float = 1e-2, max_rounds: int = 100,
              exact_max: int = GN_EXACT_MAX, draws: int = 2,
              chunk: int | None = None) -> GNEstimate:
    """Per-layer Tr(GN_ii) of the mean cross-entropy over ``batches`` (weights of ``mods``).

    Exact when every sample has one prediction over at most ``exact_max`` classes: cost one
    forward plus C vmapped backwards per sample (C = classes), all layers at once. Otherwise
    sampled: rounds of ``draws`` labels per prediction position from the model's softmax (cost
    one forward plus ``draws`` backwards per sample per round) until every layer's standard
    error is <= 0.7 * ``tol`` * |trace| (tol 0: all ``max_rounds``). One seed is drawn from
    ``gen``. ``model`` in eval mode. Memory: per-sample gradients of a piece of the chunk (about
    256 MiB; ``chunk`` samples if given). Raises :class:`NumericalError` on non-finite values."""
    from torch.func import vjp, vmap

    pname = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    weights = [layer_weight(m) for _, m in mods]
    keys = [pname[id(w)] for w in weights]
    sel = {k: w.detach() for k, w in zip(keys, weights)}
    rest = {k: p.detach() for k, p in model.named_parameters() if k not in sel}
    n_params = sum(t.numel() for t in sel.values())
    device = weights[0].device
    total_n = sum(batch_len(b) for b in batches)
    own = dist.shard(range(len(batches)))
    base = int(torch.randint(0, 2**62, (1,), generator=gen))
    L = len(mods)
    state = {"vmap": True, "passes": 0}

    def z_of(out: Any) -> torch.Tensor:
        return logits_of(out).float()

    def per_sample(params: dict, sample: Any, a: torch.Tensor, dims: Any) -> torch.Tensor:
        b1 = one_sample(sample, dims)

        def zf(pp: dict) -> torch.Tensor:
            return z_of(task.forward(WithParams(model, {**rest, **pp}), b1))[0]

        _, fn = vjp(zf, params)
        g = vmap(fn)(a)[0]
        return torch.stack([g[k].pow(2).flatten(1).sum(1, dtype=torch.float64) for k in keys])

    def loop(piece: Any, a: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.enable_grad():
            for s, b1 in enumerate(split_batch(piece, 1)):
                z = z_of(task.forward(model, b1))[0]
                rows = []
                for row in a[s]:
                    gs = torch.autograd.grad((z * row).sum(), weights, retain_graph=True,
                                             allow_unused=True)
                    rows.append(torch.stack([torch.zeros((), dtype=torch.float64) if g is None
                                             else g.double().pow(2).sum().cpu() for g in gs]))
                out.append(torch.stack(rows, 1))
        return torch.stack(out)

    def one_round(r: int, exact: bool, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        tot = torch.zeros(L, dtype=torch.float64)
        var = torch.zeros(L, dtype=torch.float64)
        size = chunk or max(1, CHUNK_BYTES // (4 * n_params * K))
        for k in own:
            batch = batch_to(batches[k], device)
            m = ce_parts(torch.zeros(1, 1), task.targets(batch))[3]
            if m == 0:
                continue
            scale = batch_len(batch) / total_n / m  # chunk weight x (1 / valid targets)
            g = torch.Generator().manual_seed((base + 1_000_003 * k + 7919 * r) % 2**62)
            for sub in split_batch(batch, size):
                with torch.no_grad():
                    z = z_of(task.forward(model, sub))
                p, valid, _, _ = ce_parts(z, task.targets(sub))
                a = _rows(z, valid, p, scale, exact, K, g)
                sq = None
                dims = vmap_dims(sub)
                if state["vmap"] and dims is not None:
                    try:
                        sq = vmap(lambda pp, s, aa: per_sample(pp, s, aa, dims),
                                  in_dims=(None, dims, 0))(sel, sub, a)
                    except (RuntimeError, DataError) as exc:
                        warnings.warn(f"per-sample gradients by vmap failed ({str(exc)[:160]}); "
                                      "using a per-sample loop (slower, same result)",
                                      stacklevel=3)
                        state["vmap"] = False
                if sq is None:
                    sq = loop(sub, a)
                sq = sq.detach().double().cpu()  # (n, L, K)
                if not bool(torch.isfinite(sq).all()):
                    raise NumericalError(f"Gauss-Newton trace is not finite in batch {k}: "
                                         "check the data for NaN/inf")
                if exact:
                    tot += sq.sum((0, 2))
                else:
                    tot += sq.mean(2).sum(0)
                    var += (sq.var(2, correction=1) / K).sum(0)
            state["passes"] += 1
        both = dist.all_reduce_sum(torch.cat([tot, var]))
        return both[:L], both[L:]

    with attention_safe(model), torch.no_grad():  # the output's shape, from one sample
        z0 = z_of(task.forward(model, batch_to(split_batch(batches[0], 1)[0], device)))
    if z0.dim() == 2 and z0.shape[-1] <= exact_max:
        t, _ = one_round(0, True, z0.shape[-1])
        return GNEstimate(t.numpy(), np.zeros(L), True, 0, state["passes"])
    draws = max(2, draws)
    ts, vs = [], []
    for r in range(max(1, max_rounds)):
        t, v = one_round(r, False, draws)
        ts.append(t)
        vs.append(v)
        mean = torch.stack(ts).mean(0)
        se = torch.stack(vs).sum(0).sqrt() / len(ts)
        if tol > 0 and bool((se <= 0.7 * tol * mean.abs()).all()):
            break
    return GNEstimate(mean.numpy(), se.numpy(), False, draws * len(ts), state["passes"])
