"""Plots: valid PNGs written atomically, nothing partial left behind on error."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hawq.maths.allocation import Budget, allocate, pareto_frontier, uniform_points
from hawq.maths.budgets import size_limit_bits
from hawq.base.errors import ConfigError
from hawq.base.plots import plot_frontier, plot_layer_bits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def problem(L=12, seed=0):
    rng = np.random.default_rng(seed)
    params = rng.integers(100, 5000, L).astype(float)
    bits = np.array([2, 4, 8])
    omega = rng.uniform(0.1, 10, L)[:, None] * params[:, None] * 4.0 ** -bits[None, :]
    return omega, params, bits


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    from matplotlib.image import imread
    assert imread(path).ndim == 3


def test_plot_frontier_writes_png(tmp_path):
    omega, params, bits = problem()
    front = pareto_frontier(omega, params, bits)
    budget = Budget("compression", 8)
    chosen = allocate(omega, params, bits, budget)
    out = plot_frontier(front, tmp_path / "sub" / "frontier.png", chosen=chosen,
                        uniform=uniform_points(omega, params, bits),
                        size_limit=size_limit_bits(budget, params, bits), title="test")
    assert out == tmp_path / "sub" / "frontier.png"
    assert_png(out)
    assert sorted(os.listdir(tmp_path / "sub")) == ["frontier.png"]  # no temporary left
    # zero omegas (linear axis) and another unit
    omega[:, -1] = 0.0
    out = plot_frontier(pareto_frontier(omega, params, bits), str(tmp_path / "f2.png"),
                        size_unit="bits")
    assert_png(out)


def test_plot_layer_bits_writes_png(tmp_path):
    omega, params, bits = problem(L=90, seed=1)
    a = allocate(omega, params, bits, Budget("avg_bits", 4))
    sens = omega[:, 0] / params
    names = [f"layer{i}.conv" for i in range(90)]
    assert_png(plot_layer_bits(names, sens, a.bits, tmp_path / "bits.png", title="bits"))
    assert_png(plot_layer_bits(["a", "b"], [0.0, 1.0], [4, 4], tmp_path / "two.png"))


def test_plot_argument_errors(tmp_path):
    omega, params, bits = problem()
    front = pareto_frontier(omega, params, bits)
    with pytest.raises(ConfigError, match="size_unit"):
        plot_frontier(front, tmp_path / "x.png", size_unit="GiB")
    with pytest.raises(ConfigError, match="one entry per layer"):
        plot_layer_bits(["a"], [1.0, 2.0], [4, 8], tmp_path / "y.png")
    assert not list(tmp_path.iterdir())


def test_no_partial_file_on_error(tmp_path, monkeypatch):
    omega, params, bits = problem()
    front = pareto_frontier(omega, params, bits)
    target = tmp_path / "frontier.png"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        plot_frontier(front, target)
    assert target.read_bytes() == b"old"  # untouched
    assert sorted(os.listdir(tmp_path)) == ["frontier.png"]  # temporary removed
    monkeypatch.undo()

    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="render failed"):
        plot_layer_bits(["a", "b"], [1.0, 2.0], [4, 8], tmp_path / "bits.png")
    assert sorted(os.listdir(tmp_path)) == ["frontier.png"]
