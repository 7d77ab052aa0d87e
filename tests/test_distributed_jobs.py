"""Independent jobs spread over ranks: 2 gloo ranks on CPU give the single-process result.

Plan refinement (:func:`hawq.post.refine.refine_plan`) measures each round's candidates on
different ranks; the DDPG search (:func:`hawq.maths.ddpg.ddpg_search`) scores each episode with a
:class:`hawq.analysis.channelwise.ChannelRewardModel` whose held-out batches are split over the
ranks. Both must give every rank exactly the single-process moves, plans, values and rewards.
The ranks are started as users start them, through :func:`hawq.ui.launch.maybe_relaunch`
(torchrun, 1 thread each), running this file as the worker module (``python -m
test_distributed_jobs <out> <mode>``); each rank writes ``rank<r>.json``. The data have 5 uneven
batches (6, 6, 6, 6, 2 samples): rank 0 holds 3 of them, rank 1 two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_ranks import launch_ranks
from hawq.base import dist
from hawq.base.errors import HawqError

HERE = Path(__file__).resolve().parent
BATCH = 6
NAMES = ["conv1", "conv2", "fc"]
REFINE_BITS = [2, 3, 4, 8]
CW_BITS = (2, 4, 8)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def make_inputs():
    torch.manual_seed(3)
    m = SmallCNN().eval()
    g = torch.Generator().manual_seed(0)
    return m, torch.randn(26, 2, 6, 6, generator=g), torch.randint(0, 3, (26,), generator=g)


class Calls:
    """Counts the model's forward calls; from call ``nan_after`` on, outputs NaN."""

    def __init__(self, model: nn.Module, nan_after: int | None = None):
        self.n, self.nan_after = 0, nan_after
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.n += 1
        if self.nan_after is not None and self.n > self.nan_after:
            return output * float("nan")
        return None


def refine(model, x, candidates: int = 5):
    from hawq.maths.allocation import allocate
    from hawq.maths.budgets import Budget
    from hawq.post.refine import refine_plan

    params = np.array([model.get_submodule(n).weight.numel() for n in NAMES], dtype=float)
    budget = Budget("avg_bits", 4)
    rng = np.random.default_rng(4)
    start = allocate(rng.random((3, 4)), params, REFINE_BITS, budget, "ilp").choices  # poor
    omega = rng.random((3, 4))
    return refine_plan(model, x, NAMES, REFINE_BITS, omega, start, params, budget,
                       candidates=candidates, max_rounds=4, batch_size=BATCH)


def search(model, data, metric: str, time_budget: float | None = None) -> dict:
    from hawq.analysis.channelwise import ChannelAllocator, ChannelLayer, ChannelRewardModel
    from hawq.maths.budgets import Budget
    from hawq.maths.ddpg import DDPGConfig, ddpg_search

    layers = []
    for n in NAMES:
        w = model.get_submodule(n).weight.detach()
        layers.append(ChannelLayer(n, w.numel(), w.numel(),
                                   w.pow(2).reshape(w.shape[0], -1).sum(1).numpy()))
    alloc = ChannelAllocator(layers, CW_BITS, Budget("avg_bits", 4))
    reward = ChannelRewardModel(model, NAMES, CW_BITS, data, metric=metric, batch_size=BATCH)
    feats = np.array([[i, l.channels, l.params] for i, l in enumerate(layers)], dtype=float)
    res = ddpg_search(feats, 3, reward, make_plan=lambda r: alloc.to_bits(alloc.plan(r)),
                      dynamic=alloc.used_fraction,
                      config=DDPGConfig(episodes=6, warmup=3, hidden=(16, 16), batch_size=8,
                                        seed=2, time_budget=time_budget))
    return {"rewards": res.rewards, "ratios": res.best_ratios.tolist(),
            "plan": res.best_plan, "best_episode": res.best_episode}


def compute(mode: str = "all") -> dict:
    """Refinement and two short DDPG searches on the tiny model; JSON-ready numbers (with the
    model's forward calls per job: each rank's share of the work)."""
    model, x, y = make_inputs()
    before = [p.detach().clone() for p in model.parameters()]
    res: dict = {}
    if mode == "fail":  # rank 1's 11th forward (after the float and start passes) gives NaN
        Calls(model, 2 * 5 if dist.rank() == 1 else None)
        try:
            refine(model, x)
        except Exception as exc:
            res = _error(exc)
        res["restored"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        return res
    calls = Calls(model)
    r = refine(model, x)
    res["refine"] = {k: v for k, v in r.to_dict().items() if k != "allocation"}
    res["refine_calls"] = calls.n
    calls.n = 0
    # the classifier on tensors (output rows gathered) and a task on a loader (sums gathered)
    res["ddpg_pair"] = search(model, (x, y), "kl", time_budget=600.0)
    res["pair_calls"] = calls.n
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    res["ddpg_task"] = search(model, loader, "loss")
    # one batch for two ranks: rank 1 has none and still gets the reward
    from hawq.analysis.channelwise import ChannelRewardModel

    plan = [[2, 4, 8, 8], [8, 4, 2, 2, 4, 8], [4, 8, 2]]
    res["one_batch"] = [ChannelRewardModel(model, NAMES, CW_BITS, (x, y), metric=m,
                                           batch_size=32)(plan) for m in ("kl", "loss")]
    res["restored"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return res


def _error(exc: Exception) -> dict:
    return {"error": type(exc).__name__, "message": str(exc), "hawq": isinstance(exc, HawqError)}


def _worker(argv: list[str]) -> int:
    """One rank (started by torchrun): compute, write rank<r>.json, or the error it raised."""
    from hawq.ui.launch import setup

    out, mode = Path(argv[0]), argv[1]
    setup("cpu")
    try:
        res = compute(mode)
    except Exception as exc:  # what the test checks: which error each rank ends with
        res = _error(exc)
    res["world"] = dist.world()
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(res))
    return 1 if "error" in res else 0


def _launch(tmp_path: Path, mode: str) -> tuple[int, list[dict]]:
    return launch_ranks(tmp_path, mode, "test_distributed_jobs")


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same float32 kernels
    try:
        return compute()
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_refine_and_search_like_one_process(tmp_path, single):
    # the single run is not trivial: refinement moves, the agent's episodes differ
    assert single["refine"]["moves"] and single["refine"]["value"] < \
        single["refine"]["start_value"]
    for job in ("ddpg_pair", "ddpg_task"):
        assert len(set(single[job]["rewards"])) >= 3, single[job]
    assert single["restored"]
    rc, ranks = _launch(tmp_path, "all")
    assert rc == 0 and len(ranks) == 2, ranks
    for r, got in enumerate(ranks):
        assert got["world"] == 2
        # exact: every candidate and every batch sum has one source, added in the same order
        assert got["refine"] == single["refine"], r
        for job in ("ddpg_pair", "ddpg_task"):
            assert got[job] == single[job], (r, job)
        assert got["one_batch"] == single["one_batch"], r
        assert got["restored"], r
    # the work was split: refinement's candidate passes (beyond the float and start passes of
    # 5 batches each, done by every rank) add up to one process's; reward batches likewise
    fixed = 2 * 5
    share = [got["refine_calls"] - fixed for got in ranks]
    assert sum(share) == single["refine_calls"] - fixed and 0 < min(share), share
    assert sum(got["pair_calls"] for got in ranks) == single["pair_calls"]
    assert ranks[0]["pair_calls"] > ranks[1]["pair_calls"] > 0  # 3 batches vs 2


def test_rank_failing_inside_refinement_stops_the_other_naming_it(tmp_path):
    rc, ranks = _launch(tmp_path, "fail")
    assert rc != 0 and len(ranks) == 2, ranks
    r0, r1 = ranks
    assert r1["error"] == "NumericalError" and "NaN" in r1["message"], r1
    assert r0["error"] == "RankFailedError" and r0["hawq"], r0
    assert "rank 1 failed" in r0["message"] and "NumericalError" in r0["message"], r0
    assert r0["restored"] and r1["restored"]  # both put the float weights back


if __name__ == "__main__":  # a rank started by torchrun (see _launch)
    sys.exit(_worker(sys.argv[1:]))
