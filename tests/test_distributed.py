"""Data-parallel analysis: 2 gloo ranks on CPU give the single-process numbers.

The ranks are started the way users start them, through :func:`hawq.ui.launch.maybe_relaunch`
(``python -m torch.distributed.run --standalone --nproc-per-node 2``), running this file as the
worker module (``python -m test_distributed <out> <mode>``, 1 thread each). Every rank writes
what it computed to ``rank<r>.json``; the test compares both ranks with the same computation
done here in one process (no process group): per-layer traces (joint and per-layer probes with
tol-based stopping, channel traces, activation traces), eigenvalues, Fisher traces, measured
single-layer losses, ZeroQ's KL sensitivities and the allocated plans. The data have 5 uneven
chunks (6, 6, 6, 6, 2 samples), so rank 0 holds 14 samples and rank 1 12: a wrong sample
weighting shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_ranks import launch_ranks
from hawq.base import dist
from hawq.base.errors import ConfigError, HawqError

HERE = Path(__file__).resolve().parent
BATCH = 6
BITS = [2, 4, 8]
RUNS = {  # name -> analyze() arguments (batch_size=BATCH, seed=1 for all)
    "joint": dict(metric="trace", probe_mode="joint", tol=0.15, max_probes=16, min_probes=3),
    "gn": dict(metric="trace", probe_mode="gn", tol=0.15, max_probes=16, min_probes=3),
    "layer": dict(metric="trace", probe_mode="layer", tol=0.15, max_probes=16, min_probes=3),
    "channel": dict(metric="channel", tol=0.0, max_probes=3, probe_batch=2),
    "activation": dict(metric="activation", tol=0.0, max_probes=3),
    "eigen": dict(metric="eigen", top_k=2, tol=1e-6, max_iter=25),
    "fisher": dict(metric="fisher"),
}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def make_inputs(nan_chunk: int | None = None):
    torch.manual_seed(3)
    m = SmallCNN()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(26, 2, 6, 6, generator=g), torch.randint(0, 3, (26,), generator=g)
    if nan_chunk is not None:
        x[nan_chunk * BATCH] = float("nan")
    return m.eval(), x, y


def compute(out: Path | None = None, stop_after: str | None = None) -> dict:
    """Every distributed analysis on the tiny model; JSON-ready numbers."""
    from hawq.analysis.hessian import analyze
    from hawq.analysis.sensitivity import measured_loss_increase, omega_matrix, weight_errors
    from hawq.maths.allocation import allocate
    from hawq.maths.budgets import Budget

    model, x, y = make_inputs(1 if stop_after == "nan" else None)
    if stop_after == "differ" and dist.rank() == 1:  # a rank that loaded other weights
        with torch.no_grad():
            model.fc.weight[0, 0] += 1e-3
    res = {}
    for name, kw in RUNS.items():
        r = analyze(model, (x, y), batch_size=BATCH, seed=1, **kw)
        if name == "joint" and out is not None:
            r.to_json(out / f"written_by_rank{dist.rank()}.json")  # rank 0 only
        d = r.to_dict()
        d.pop("seconds")
        res[name] = d
        if stop_after in (name, "nan", "differ"):
            return res
    names = [lh["name"] for lh in res["joint"]["layers"]]
    params = [lh["params"] for lh in res["joint"]["layers"]]
    measured = measured_loss_increase(model, (x, y), names, BITS, batch_size=BATCH)
    res["measured"] = measured.tolist()
    from hawq.analysis.zeroq import kl_sensitivity

    res["kl"] = kl_sensitivity(model, x, names, BITS, batch_size=BATCH).tolist()
    omega = omega_matrix([lh["avg_trace"] for lh in res["layer"]["layers"]],
                         weight_errors(model, names, BITS))
    res["plan_v2"] = allocate(omega, params, BITS, Budget("compression", 6)).choices
    res["plan_measured"] = allocate(np.maximum(measured, 0), params, BITS,
                                    Budget("compression", 6)).choices
    return res


def _worker(argv: list[str]) -> int:
    """One rank (started by torchrun): compute, write rank<r>.json, or the error it raised."""
    from hawq.ui.launch import setup

    out, mode = Path(argv[0]), argv[1]
    setup("cpu")
    r = dist.rank()
    try:
        res = compute(out, None if mode == "all" else mode)
    except Exception as exc:  # what the test checks: which error each rank ends with
        res = {"error": type(exc).__name__, "message": str(exc),
               "hawq": isinstance(exc, HawqError)}
    res["world"] = dist.world()  # 2: the ranks really formed one group
    (out / f"rank{r}.json").write_text(json.dumps(res))
    return 1 if "error" in res else 0


def _launch(tmp_path: Path, mode: str) -> tuple[int, list[dict]]:
    return launch_ranks(tmp_path, mode, "test_distributed")


def _close(a, b, what: str, rtol: float = 1e-5, atol: float = 1e-9) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}", rtol, atol)
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _close(u, v, f"{what}[{i}]", rtol, atol)
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=rtol, abs=atol), what
    else:
        assert a == b, what


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: same float32 kernels
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def test_two_gloo_ranks_equal_one_process(tmp_path, single):
    rc, ranks = _launch(tmp_path, "all")
    assert rc == 0 and len(ranks) == 2, ranks
    assert [got["world"] for got in ranks] == [2, 2]
    for r, got in enumerate(ranks):
        for name in RUNS:
            want = dict(single[name])
            passes = want.pop("passes")
            have = dict(got[name])
            # graph builds are counted over all ranks: the same total as one process here
            # (each chunk built once and cached), except Fisher's one vmapped pass per run
            assert have.pop("passes") == passes, (r, name)
            _close(want, have, f"rank {r} {name}")
        _close(single["measured"], got["measured"], f"rank {r} measured", atol=1e-7)
        _close(single["kl"], got["kl"], f"rank {r} ZeroQ KL", atol=1e-9)
        assert got["plan_v2"] == single["plan_v2"]
        assert got["plan_measured"] == single["plan_measured"]
    # the tol rule stopped early, identically on every rank and layer by layer in layer mode
    probes = [lh["probes"] for lh in single["layer"]["layers"]]
    assert min(probes) < RUNS["layer"]["max_probes"], probes
    assert [lh["probes"] for lh in ranks[1]["layer"]["layers"]] == probes
    # only rank 0 wrote the result file
    assert (tmp_path / "written_by_rank0.json").exists()
    assert not (tmp_path / "written_by_rank1.json").exists()


def test_failing_rank_stops_the_other_naming_it(tmp_path):
    rc, ranks = _launch(tmp_path, "nan")  # a NaN sample in chunk 1, which rank 1 holds
    assert rc != 0 and len(ranks) == 2, ranks
    r0, r1 = ranks
    assert r1["error"] == "NumericalError" and "batch 1" in r1["message"], r1
    assert r0["error"] == "RankFailedError" and r0["hawq"], r0
    assert "rank 1 failed" in r0["message"] and "NumericalError" in r0["message"], r0
    assert not list(tmp_path.glob("written_by_*")), "a failed run wrote its result"


def test_ranks_with_different_weights_refuse(tmp_path):
    rc, ranks = _launch(tmp_path, "differ")
    assert rc != 0 and len(ranks) == 2, ranks
    for got in ranks:  # both ranks, the same ConfigError
        assert got["error"] == "ConfigError", got
        assert "differ between ranks" in got["message"], got


def test_single_process_helpers_are_no_ops():
    from hawq.ui.launch import maybe_relaunch, relaunch_command, strip_nproc

    assert (dist.world(), dist.rank(), dist.is_main(), dist.is_distributed()) == (1, 0, True,
                                                                                 False)
    t = torch.arange(3.0)
    assert dist.all_reduce_sum(t) is t
    assert dist.shard(range(5)) == [0, 1, 2, 3, 4]
    with dist.guard():
        dist.check_same([1.0, 2.0], "x")
    with pytest.raises(ValueError), dist.guard():
        raise ValueError("passes through unchanged")
    assert dist.device_for("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            dist.device_for("cuda:0")
    with pytest.raises(ConfigError, match="device='tpu'"):
        dist.device_for("tpu")
    assert strip_nproc(["analyze", "--nproc", "2", "--nproc=3", "--model", "m"]) == \
        ["analyze", "--model", "m"]
    cmd = relaunch_command(4, ["compress", "--nproc", "4", "--model", "resnet20"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                       "-m", "hawq", "compress", "--model", "resnet20"]
    assert maybe_relaunch(None) is None and maybe_relaunch(1) is None
    with pytest.raises(ConfigError, match="--nproc 0"):
        maybe_relaunch(0)


if __name__ == "__main__":  # a rank started by torchrun (see _launch)
    sys.exit(_worker(sys.argv[1:]))


def test_cli_nproc_compress_equals_one_process(tmp_path):
    """``hawq compress --nproc 2`` (the CLI relaunching itself under torchrun): the same plan
    and, to float tolerance, the same per-layer traces as one process; rank 0 alone prints the
    tables and writes the run folder; ``--nproc 0`` is refused at parse time."""
    from hawq.ui.cli import main

    flags = ["compress", "--hessian-samples", "64", "--max-probes", "8", "--test-samples",
             "200", "--calib-samples", "128"]
    assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "hawq", *flags, "--out", str(tmp_path / "two"),
                           "--nproc", "2"], capture_output=True, text=True, env=env,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("uniform 4-bit (same size)") == 1  # one table: rank 0's
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((one / "plan.json").read_text()) == json.loads(
        (two / "plan.json").read_text())
    t1 = [lh["trace"] for lh in json.loads((one / "sensitivity.json").read_text())
          ["hessian"]["layers"]]
    t2 = [lh["trace"] for lh in json.loads((two / "sensitivity.json").read_text())
          ["hessian"]["layers"]]
    np.testing.assert_allclose(t2, t1, rtol=1e-4)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    with pytest.raises(SystemExit) as exc:  # argparse refuses it (one 'hawq: error:' line)
        main([*flags, "--nproc", "0"])
    assert exc.value.code == 2
