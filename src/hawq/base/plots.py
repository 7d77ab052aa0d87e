"""Plots for bit allocation: the (size, omega) Pareto frontier and per-layer bits.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly (no pyplot,
no global backend state), rendered to memory, and written atomically (temporary file beside the
target, then ``os.replace``), so a failure never leaves a partial PNG behind.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hawq.base.errors import ConfigError
from hawq.base.io import atomic_write_bytes

__all__ = ["plot_distill", "plot_frontier", "plot_layer_bits"]

_UNIT_BITS = {"bits": 1.0, "bytes": 8.0, "KB": 8e3, "MB": 8e6}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def plot_frontier(frontier: Any, path: str | os.PathLike, chosen: Any = None,
                  uniform: Mapping[Any, tuple[float, float]] | None = None,
                  size_unit: str = "MB", title: str | None = None,
                  size_limit: float | None = None) -> Path:
    """Total omega versus model size along ``frontier`` (a :class:`hawq.maths.allocation.Frontier`).

    ``chosen`` (an :class:`~hawq.maths.allocation.Allocation`) is marked with a star, ``uniform``
    ({bits: (size bits, omega)}, e.g. from :func:`hawq.maths.allocation.uniform_points`) with labelled
    dots, and ``size_limit`` (bits) with a vertical line. Sizes are shown in ``size_unit``
    ("MB" = 10^6 bytes, "KB", "bytes" or "bits"); the omega axis is logarithmic when all plotted
    omegas are positive. Writes a PNG atomically and returns its path.
    """
    if size_unit not in _UNIT_BITS:
        raise ConfigError(f"size_unit={size_unit!r}: use one of {sorted(_UNIT_BITS)}")
    scale = _UNIT_BITS[size_unit]
    sizes = np.asarray(getattr(frontier, "sizes", None), dtype=float)
    omegas = np.asarray(getattr(frontier, "omegas", None), dtype=float)
    if sizes.ndim != 1 or sizes.size == 0 or sizes.shape != omegas.shape:
        raise ConfigError("frontier must have 1-D sizes and omegas of equal, non-zero length: "
                          "give the result of hawq.maths.allocation.pareto_frontier")
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(sizes / scale, omegas, where="post", color="tab:blue", lw=1.5,
            label=f"Pareto frontier ({sizes.size} plans)")
    ys = [omegas]
    if uniform:
        for bw, (s, w) in sorted(uniform.items(), key=lambda item: item[1][0]):
            ax.scatter([s / scale], [w], color="tab:orange", zorder=3)
            ax.annotate(f"{bw}-bit", (s / scale, w), textcoords="offset points", xytext=(5, 5),
                        fontsize=9)
            ys.append(np.array([w], dtype=float))
    if chosen is not None:
        ax.scatter([float(chosen.size_bits) / scale], [chosen.total_omega], marker="*", s=180,
                   color="tab:red", zorder=4, label=f"chosen ({chosen.avg_bits:.2f} avg bits)")
        ys.append(np.array([chosen.total_omega], dtype=float))
    if size_limit is not None:
        ax.axvline(float(size_limit) / scale, color="gray", ls="--", lw=1, label="budget")
    allys = np.concatenate(ys)
    if np.all(allys[np.isfinite(allys)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel(f"weight size ({size_unit})")
    ax.set_ylabel("total omega (sum over layers)")
    ax.set_title(title or "Bit allocation: omega vs size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_bits(names: Sequence[str], sensitivity: Sequence[float], bits: Sequence[float],
                    path: str | os.PathLike, title: str | None = None) -> Path:
    """Per-layer chart: bars of ``sensitivity`` (log scale when all positive), coloured by the
    layer's chosen ``bits``, with the bits also drawn as a step line on a second axis.
    Writes a PNG atomically and returns its path."""
    sens = np.asarray(sensitivity, dtype=float)
    bw = np.asarray(bits, dtype=float)
    names = [str(n) for n in names]
    if sens.ndim != 1 or sens.size == 0 or sens.shape != bw.shape or len(names) != sens.size:
        raise ConfigError(f"names ({len(names)}), sensitivity {sens.shape} and bits {bw.shape} "
                          "must be non-empty and have one entry per layer")
    from matplotlib import colormaps

    L = sens.size
    fig = _figure(max(7.0, min(0.18 * L + 3, 30.0)), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    levels = np.unique(bw)
    cmap = colormaps["viridis"]
    colours = {v: cmap(i / max(1, levels.size - 1)) for i, v in enumerate(levels)}
    x = np.arange(L)
    for v in levels:
        m = bw == v
        ax.bar(x[m], sens[m], color=colours[v], label=f"{v:g}-bit")
    if np.all(sens > 0):
        ax.set_yscale("log")
    ax.set_ylabel("sensitivity")
    step = max(1, L // 40)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(names[::step], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, L - 0.4)
    ax2 = ax.twinx()
    ax2.step(x, bw, where="mid", color="tab:red", lw=1.2)
    ax2.set_ylabel("bits", color="tab:red")
    ax2.set_yticks(levels)
    ax2.set_ylim(0, levels.max() * 1.15)
    ax.legend(loc="upper left", fontsize=8, title="chosen bits")
    ax.set_title(title or "Per-layer sensitivity and bits")
    fig.tight_layout()
    return _save(fig, path)


def plot_distill(record: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Plot ZeroQ's distillation loss curve (``record``: :meth:`hawq.analysis.distill.DistillResult.to_dict`
    with ``losses``, ``initial_loss``, ``final_loss``, ``reduction``) to ``path`` (PNG, written
    atomically); returns the path."""
    import math

    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(len(record["losses"])), record["losses"], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("BatchNorm-statistics loss")
    red = record["reduction"]
    ax.set_title(f"ZeroQ distillation: {record['initial_loss']:.3g} -> "
                 f"{record['final_loss']:.3g} ({red:.0f}x)" if math.isfinite(red)
                 else "ZeroQ distillation")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
