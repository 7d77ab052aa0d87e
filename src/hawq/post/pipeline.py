"""Allocation steps of the workflows (:mod:`hawq.workflows.workflow`): the size budget, pinned layers and
BOPs/latency limits a config names, the configured allocator, whether a plan is refined, and the
device a job runs on.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from hawq.post.config import CompressConfig  # re-exported: they live in hawq.post.config
from hawq.maths.allocation import omega_allocators
from hawq.base.errors import ConfigError

__all__ = ["allocate_plan", "allocation_limits", "budget_from_config", "load_latency_table",
           "refine_applies", "refine_wanted", "resolve_device"]

log = logging.getLogger(__name__)


def refine_wanted(cfg: CompressConfig) -> bool:
    """Whether ``cfg`` may refine its plan: ``refine=True``, or ``"auto"`` with the hybrid
    sensitivity and a frontier/ILP allocator (the plan's bits decide, :func:`refine_applies`)."""
    return cfg.refine is True or (cfg.refine == "auto" and cfg.sensitivity == "hybrid"
                                  and cfg.allocator in omega_allocators())


def refine_applies(cfg: CompressConfig, bits: Sequence[float], params: np.ndarray) -> bool:
    """Whether ``cfg`` refines an allocated plan of weight ``bits``: always with ``refine=True``;
    with ``"auto"`` when :func:`refine_wanted` and :func:`hawq.post.refine.auto_refines` (the plan
    averages at most ``AUTO_REFINE_MAX_BITS`` bits per weight)."""
    from hawq.post.refine import auto_refines

    return cfg.refine is True or (refine_wanted(cfg) and auto_refines(bits, params))


def budget_from_config(cfg: CompressConfig):
    """The size :class:`hawq.maths.budgets.Budget` named by ``cfg`` (None when only BOPs/latency)."""
    from hawq.maths.budgets import Budget

    for kind, value in (("compression", cfg.target_compression), ("avg_bits", cfg.target_avg_bits),
                        ("bytes", cfg.target_bytes), ("fraction", cfg.target_fraction)):
        if value is not None:
            return Budget(kind, value)
    return None


def load_latency_table(path: str, names: list[str], bits: tuple[int, ...]) -> np.ndarray:
    """Read ``{layer: {bits: latency}}`` JSON into an (L, B) matrix; every cell must be there."""
    from hawq.base.io import read_json

    table = read_json(path, "latency table")
    out = np.zeros((len(names), len(bits)))
    for i, name in enumerate(names):
        row = table.get(name) if isinstance(table, dict) else None
        if not isinstance(row, dict):
            raise ConfigError(f"latency table {path!r} has no entry for layer {name!r}: give "
                              "{layer: {bits: latency}} for every quantizable layer")
        for j, b in enumerate(bits):
            if str(b) not in row:
                raise ConfigError(f"latency table {path!r}, layer {name!r}: no latency for {b} "
                                  f"bits (have {sorted(row)})")
            out[i, j] = float(row[str(b)])
    return out


def allocation_limits(cfg: CompressConfig, names: list[str], macs: np.ndarray) -> dict[str, Any]:
    """The keyword arguments of :func:`hawq.maths.allocation.allocate` that ``cfg`` sets besides the
    size budget: ``pinned`` and the BOPs/latency matrices and limits (also used to refine)."""
    bits = np.array(cfg.bits)
    pinned = None
    if cfg.pin_first_last is not None:
        if cfg.pin_first_last not in cfg.bits:
            raise ConfigError(f"pin_first_last={cfg.pin_first_last}: must be one of bits "
                              f"{cfg.bits}")
        j = cfg.bits.index(cfg.pin_first_last)
        pinned = {0: j, len(names) - 1: j}
    latency = None
    if cfg.latency_table:
        latency = load_latency_table(cfg.latency_table, names, cfg.bits)
    elif cfg.latency_limit is not None:
        raise ConfigError("latency_limit needs latency_table (JSON: {layer: {bits: latency}})")
    return {"pinned": pinned, "bops": macs[:, None] * bits[None, :] * cfg.a_bits,
            "bops_limit": None if cfg.bops_limit is None else cfg.bops_limit * 1e9,
            "latency": latency, "latency_limit": cfg.latency_limit}


def allocate_plan(cfg: CompressConfig, names: list[str], params: np.ndarray, macs: np.ndarray,
                  omega: np.ndarray, stats: dict[str, Any], limits: dict[str, Any] | None = None):
    """Run the configured allocator; returns the :class:`hawq.maths.allocation.Allocation`.
    ``limits``: :func:`allocation_limits` of ``cfg`` when the caller already has them."""
    from hawq.maths.allocation import allocate, hawq_v1_allocate

    bits = np.array(cfg.bits)
    budget = budget_from_config(cfg)
    limits = limits if limits is not None else allocation_limits(cfg, names, macs)
    if cfg.allocator == "v1-rule":
        if budget is None:
            raise ConfigError("the HAWQ-V1 rule needs a size target (e.g. target_compression)")
        layers = stats["hessian"]["layers"]
        eig = [lh["eigenvalue"] if np.isscalar(lh["eigenvalue"]) else lh["eigenvalue"][0]
               for lh in layers]
        return hawq_v1_allocate(np.array(eig) / params, params, bits, budget, omega=omega)
    return allocate(omega, params, bits, budget, cfg.allocator, **limits)


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a ConfigError that says what to pass when it is unusable."""
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a device ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: this PyTorch sees no CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r}: only cpu and cuda are supported")
    return dev


