"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ), for reports.

For each of ``n_vectors`` random unit vectors v, ``n_steps`` Lanczos steps (with full
reorthogonalisation) on the Hessian H of the mean loss w.r.t. the selected weights give a
tridiagonal T = U diag(theta) U^T; the nodes theta_j with weights U_0j^2 form a Gauss quadrature
of the spectral measure seen from v: sum_j w_j f(theta_j) ~ v^T f(H) v, exact for polynomials of
degree < 2 * n_steps. Averaged over v, sum_j w_j f(theta_j) estimates (1/n) tr f(H), so the
weighted nodes approximate the eigenvalue density (Ghorbani et al. 2019; PyHessian's
``density``). Cost: n_vectors * n_steps HVPs on one graph per chunk (see :mod:`hawq.analysis.hessian`),
plus n_steps stored basis vectors (float64) of the size of the selected weights.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hawq.base.errors import NumericalError
from hawq.analysis.hessian import (HessianOperator, check_int, grad_setup, data_chunks, resolve_task,
                          select_layers)
from hawq.modules.qmodules import layer_weight
from hawq.feed.tasks import Task

__all__ = ["SpectralDensity", "lanczos", "spectral_density"]


@dataclass
class SpectralDensity:
    """SLQ result: per random vector, Ritz values (``nodes``) and quadrature ``weights``
    (each run's weights sum to 1); ``dim`` is the number of weights the Hessian acts on."""

    nodes: list[list[float]]
    weights: list[list[float]]
    dim: int
    hvp_count: int
    seconds: float
    version: int = 1

    def density(self, grid: Sequence[float] | np.ndarray, sigma: float | None = None
                ) -> np.ndarray:
        """Gaussian-smoothed density on ``grid`` (integrates to ~1), averaged over runs;
        ``sigma`` defaults to 1% of the node range."""
        grid = np.asarray(grid, dtype=float)
        nodes = np.concatenate([np.asarray(n) for n in self.nodes])
        if sigma is None:
            sigma = 0.01 * max(float(np.ptp(nodes)), 1e-12)
        out = np.zeros_like(grid)
        for n, w in zip(self.nodes, self.weights):
            z = (grid[:, None] - np.asarray(n)[None, :]) / sigma
            out += (np.exp(-0.5 * z**2) * np.asarray(w)[None, :]).sum(1)
        return out / (len(self.nodes) * sigma * np.sqrt(2 * np.pi))

    def trace_estimate(self) -> float:
        """dim * mean over runs of sum_j w_j theta_j: an unbiased estimate of tr(H)."""
        return self.dim * float(np.mean([np.dot(n, w) for n, w in zip(self.nodes, self.weights)]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor,
            n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonalisation from ``v0`` with full reorthogonalisation (twice, classical
    Gram-Schmidt in float64). Returns (alpha, beta) of length m and m-1 (m <= n_steps stops
    early on an invariant subspace). Cost: m calls of ``matvec``."""
    q = (v0 / v0.norm()).double()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(n_steps):
        w = matvec(q.to(v0.dtype)).double()
        a = float(w @ q)
        alphas.append(a)
        if j == n_steps - 1:
            break
        Q = torch.stack(basis)
        for _ in range(2):
            w = w - Q.T @ (Q @ w)
        b = float(w.norm())
        scale = max(abs(a), max(betas, default=0.0), 1e-30)
        if b <= 1e-10 * scale:
            break
        betas.append(b)
        q = w / b
        basis.append(q)
    return np.array(alphas), np.array(betas)


def spectral_density(model: nn.Module, data: Any, criterion: Callable | None = None,
                     layers: Sequence[str] | None = None, n_steps: int = 50,
                     n_vectors: int = 1, seed: int = 0, batch_size: int | None = None,
                     max_graph_bytes: float | None = None,
                     progress: bool = False,
                     task: Task | str | Callable | None = None) -> SpectralDensity:
    """SLQ spectral density of the Hessian of the mean loss w.r.t. the selected weights jointly
    (``data``, ``batch_size``, ``task``, ``criterion`` and ``layers`` as in
    :func:`hawq.analysis.hessian.analyze`: the task, default ``classification``, gives each chunk's
    loss). Returns a :class:`SpectralDensity`.
    Cost: n_vectors * min(n_steps, dim) HVPs (each one double-backward per chunk) after one
    graph-building pass per chunk; memory n_steps * dim float64 for the Lanczos basis."""
    check_int("n_steps", n_steps, 1)
    check_int("n_vectors", n_vectors, 1)
    check_int("seed", seed, 0)
    task, _ = resolve_task(task, criterion, model)
    mods = select_layers(model, layers)
    params = [layer_weight(m) for _, m in mods]
    sizes = [p.numel() for p in params]
    dim = sum(sizes)
    batches = data_chunks(data, batch_size, task)
    task.check(model, iter(batches))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    nodes, weights = [], []
    with grad_setup(model, params, False):
        op = HessianOperator(model, mods, batches, criterion, "weights", max_graph_bytes,
                             task=None if criterion is not None else task)
        dtype, device = params[0].dtype, params[0].device

        def matvec(v: torch.Tensor) -> torch.Tensor:
            vs = [t.view_as(p) for t, p in zip(v.split(sizes), params)]
            return torch.cat([h.reshape(-1) for h in op.hvp(vs)])

        for _ in tqdm(range(n_vectors), desc="Lanczos", disable=not progress, leave=False):
            v0 = torch.randint(0, 2, (dim,), generator=gen).to(device=device, dtype=dtype) * 2 - 1
            alpha, beta = lanczos(matvec, v0, min(n_steps, dim))
            if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
                raise NumericalError("Lanczos produced non-finite values: the Hessian-vector "
                                     "products overflow; check the model and data")
            T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            theta, U = np.linalg.eigh(T)
            nodes.append(theta.tolist())
            weights.append((U[0] ** 2).tolist())
    return SpectralDensity(nodes, weights, dim, op.hvp_count, time.perf_counter() - t0)
